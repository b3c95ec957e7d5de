"""Run-folder checkpoints that describe themselves (STYLE habit 5).

Layout of one checkpoint::

    RUN/checkpoints/step_000001000/
        model.safetensors           the raw model weights
        ema.safetensors             (optional) the EMA weights, same keys as the model
        discriminator.safetensors   (optional) any further named state dict
        state.pt                    optimiser / scheduler / RNG / step: tensors and plain data only
        meta.json                   version, kind, class names, the resolved recipe, step, extras

A checkpoint is written into `RUN/checkpoints/.tmp-*`, every file is fsynced, `meta.json` is written last,
and the folder is renamed into place: a `step_*` folder with a `meta.json` is complete, anything else is
ignored. Weights are read with safetensors and the state with `torch.load(weights_only=True)`, so opening a
checkpoint never runs code from it. Only the main process should call `save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import smapctl
from smapctl.config import to_dict
from smapctl.errors import UserError, refused_pickle, torch_load_reason
from smapctl.io import (
    as_os_error,
    atomic_output,
    finish_file,
    fsync_dir,
    loads_json,
    make_folders,
    open_file_only,
    open_output,
    utf8_path,
    write_error,
)
from smapctl.train.layout import CHECKPOINTS

# Warnings go through logging, as every other of a command's warnings (a `warnings.warn` prints the
# file and source line).
log = logging.getLogger("smapctl.train")

META = "meta.json"
STATE = "state.pt"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
# In a checkpoint folder: the generator runs trained on it, one per line. Pruning keeps such a checkpoint
# (a generator cannot sample without the very tokenizer weights it was trained on).
PINNED = "pinned_by.txt"
# A pin list holds run folders' paths as their own bytes: a folder named in Latin-1 (its bytes held as lone
# surrogates) crashed the generator run that pinned it, and its line must name the folder (`cut` and `ls`
# take it as is).
PIN_ERRORS = "surrogateescape"


# ------------------------------------------------------------------------------------------ finding


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:09d}"


def run_of(checkpoint: str | Path) -> Path | None:
    """The run folder of a checkpoint in it (RUN/checkpoints/NAME -> RUN), the inverse of `checkpoint_dir`;
    None for a checkpoint outside a run's checkpoints folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


class DamagedCheckpoint(UserError):
    """A file of a complete checkpoint that cannot be read (truncated or damaged after it was written, as
    a checkpoint is written whole before its meta.json): `--resume` names the checkpoint before it."""


def is_complete(ckpt: str | Path) -> bool:
    """A checkpoint folder whose name is `step_N` and whose `meta.json` (written last) exists."""
    ckpt = Path(ckpt)
    return bool(_STEP_RE.match(ckpt.name)) and (ckpt / META).is_file()


def same_step(given: Path, recorded: Path) -> Path:
    """The checkpoint a user's `given` folder means for one `recorded` in a file: a run folder's checkpoint
    of the recorded name when it has one (a run trained on since: its newest is another model), else
    `given` as it is (a checkpoint folder, or a run folder meaning its newest)."""
    same = given / CHECKPOINTS / recorded.name
    return same if is_complete(same) else given


def is_run_or_checkpoint(folder: Path) -> bool:
    """A training run's folder or a checkpoint's; False for a path that cannot be looked at (too long, say:
    reading it says why)."""
    try:
        return (folder / CHECKPOINTS).is_dir() or (folder / META).is_file()
    except OSError:
        return False


def refuse_output_in_checkpoints(path: str | os.PathLike, option: str = "--out") -> None:
    """An output (`--out` of sample, evaluate, decode, tokenize, cross-recon, reproduce; `option` names
    another) that is, or is inside, a training run's checkpoint or its checkpoints/ folder is refused: the
    run deletes its older checkpoints (train.keep_checkpoints), and the files written there with them."""
    path = Path(os.path.normpath(Path(path).expanduser().absolute()))
    for folder in (path, *path.parents):  # (a checkpoint copied out of its run is pruned by nothing)
        if folder.name == CHECKPOINTS and list_checkpoints(folder.parent):
            raise UserError(
                f"{path}: inside {folder}, a training run's checkpoints, which the run deletes as it goes"
                f" (train.keep_checkpoints) with anything written there; choose another {option}"
            )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest step first; temp and incomplete folders are skipped."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, except those pinned by a generator
    (`pin_checkpoint`); returns the deleted folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = list_checkpoints(run_dir)
    old = [p for p in complete[:-keep] if not pinned(p)]
    # A checkpoint is renamed away before it is deleted: deleted in place, a kill after its meta.json
    # goes would leave a folder no listing counts (incomplete), kept for good. The renamed one is a temp
    # folder, which the next save removes. Such folders of earlier runs (below the newest complete
    # step) are removed too.
    newest = _step(complete[-1]) if complete else -1
    root = Path(run_dir) / CHECKPOINTS
    broken = [p for p in root.glob("step_*") if p.is_dir() and not is_complete(p) and 0 <= _step(p) < newest]
    for path in old + broken:
        gone = root / f"{_TMP_PREFIX}pruned-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, gone)
        shutil.rmtree(gone)
    return old


def _step(checkpoint: Path) -> int:
    """The step in a `step_N` folder's name (-1 for another name)."""
    match = _STEP_RE.match(checkpoint.name)
    return int(match.group(1)) if match else -1


_WARNED_GONE: set[str] = set()  # pinned checkpoints kept for a run that is not there, said once each


def pinned(checkpoint: Path) -> bool:
    """Whether the checkpoint's `PINNED` list names a run. One that is not where it was is still a pin:
    a generator run moved or renamed can only be told from one deleted by the user, and it samples only
    with this checkpoint (a generator run that fails at its start takes its line back: `unpin_checkpoint`).
    Such a checkpoint is kept with a warning saying how to let it go."""
    try:
        runs = [run for run in _read_pins(checkpoint / PINNED) if run]
    except OSError:
        return False
    gone = [run for run in runs if not Path(run).exists()]
    if runs and len(gone) == len(runs) and str(checkpoint) not in _WARNED_GONE:
        _WARNED_GONE.add(str(checkpoint))
        log.warning(
            "%s: kept for the generator run %s, which is not there any more (moved or deleted?); if no"
            " generator needs it, delete its %s to let it be pruned",
            checkpoint,
            gone[0],
            PINNED,
        )
    return bool(runs)


def pin_checkpoint(checkpoint: str | Path, by: str | Path) -> bool:
    """Record in `checkpoint` that the run `by` depends on it, so that pruning its own run (a resumed
    tokenizer training) keeps it; True when this call added the line (False: there already, for an
    earlier run of that folder maybe, which `unpin_checkpoint` must then leave). An unwritable checkpoint
    (read-only storage) is left as it is, with a warning: nothing in smapctl would prune it there either."""
    path = Path(checkpoint) / PINNED
    line = f"{Path(by).resolve()}\n"
    # (never through a symbolic link: a shared checkpoint's pointing elsewhere would get the line appended)
    try:
        fd = open_file_only(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "r+", encoding="utf-8", errors=PIN_ERRORS) as f:
            if line in f.read().splitlines(keepends=True):
                return False
            f.write(line)
    except OSError as e:
        log.warning("could not mark %s as used by %s (%s); keep that checkpoint", checkpoint, by, e)
        return False
    return True


def unpin_checkpoint(checkpoint: str | Path, by: str | Path) -> None:
    """Take back `pin_checkpoint(checkpoint, by)`: the run `by` failed at its start and its folder is
    removed, so it holds nothing (a failure to rewrite the list keeps the pin, as is safe)."""
    path = Path(checkpoint) / PINNED
    line = str(Path(by).resolve())
    with contextlib.suppress(OSError, UserError):
        runs = _read_pins(path)
        left = [run for run in runs if run and run != line]
        if len(left) == len([run for run in runs if run]):
            return
        if left:
            with atomic_output(path, "the pin list") as f:
                f.write("".join(f"{run}\n" for run in left).encode("utf-8", PIN_ERRORS))
        else:
            path.unlink()


def _read_pins(path: Path) -> list[str]:
    """The lines of a checkpoint's pin list (`open_file_only`: not through a symbolic link)."""
    with os.fdopen(open_file_only(path, os.O_RDONLY), encoding="utf-8", errors=PIN_ERRORS) as f:
        return f.read().splitlines()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a file inside one, a run folder (its newest checkpoint) or a run's
    `checkpoints/` folder -> the checkpoint folder. A one-line UserError when there is none. A checkpoint
    named explicitly is any folder holding its meta.json (written last): one copied out of its run to
    keep it need not be named `step_N`, which only a run's own listing needs."""
    path = Path(path)
    if not path.exists():
        raise pruned_error(path) or UserError(f"{path}: no such checkpoint or run folder")
    if path.is_file():
        if (path.parent / META).is_file():  # a file inside a checkpoint (its meta.json, a weights file)
            return path.parent
        raise UserError(f"{path}: a file, not a checkpoint or run folder")
    if (path / META).is_file():
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UserError(
            f"{path}: no complete checkpoint here (looked for {path / META} "
            f"and {run_dir / CHECKPOINTS / 'step_*' / META})"
        )
    return found


# ------------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict[str, Any]:
    """The states of python `random`, numpy's global RNG, torch CPU (and CUDA, or Apple's mps) as tensors
    and numbers, so they survive `torch.load(weights_only=True)`."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():  # a Mac's training draws its posterior and flow noise there
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo `capture_rng`: the following random numbers repeat those drawn after the capture."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ------------------------------------------------------------------------------------------ saving


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    kind: str,
    recipe: Any,
    weights: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `RUN/checkpoints/step_{step:09d}` atomically and return its path.

    weights: name -> an nn.Module, an object with `state_dict()` (e.g. `EMA`) or a dict of tensors; each
        becomes `name.safetensors`. "model" is required and must be the bare nn.Module.
    recipe:  the resolved recipe (a config dataclass or a plain dict), stored in meta.json.
    state:   optimiser/scheduler/... state dicts (tensors and plain data only); `step` and `rng`
        (`capture_rng()`) are added unless given.
    meta:    extra JSON-able entries for meta.json (e.g. latent statistics).
    keep:    afterwards, prune to the newest `keep` checkpoints.
    An OSError while writing (disk full, permissions) removes the partial folder, leaves the previous
    checkpoints as they were and raises a UserError.
    """
    if not isinstance(weights.get("model"), nn.Module):
        raise TypeError("save_checkpoint: weights['model'] must be the (unwrapped) nn.Module")
    files = [*(f"{name}.safetensors" for name in weights), STATE]
    info = _describe(step, kind, recipe, weights, files, meta or {})
    state = {"step": step, "rng": capture_rng(), **(state or {})}
    _check_plain(state, "state")
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        make_folders(root)
        _remove_stale_temps(root)
        tmp.mkdir()
        _write_weights(tmp, weights)
        _write_state(tmp / STATE, state)
        _write_bytes(tmp / META, (json.dumps(info, indent=2) + "\n").encode())  # the completion marker
        fsync_dir(tmp)
        _publish(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, e, "checkpoint", kept="earlier checkpoints are unchanged") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        try:
            prune_checkpoints(run_dir, keep)
        except OSError as e:
            log.warning("could not prune old checkpoints in %s: %s", root, e)
    return final


def _describe(step: int, kind: str, recipe: Any, weights: Mapping, files: list[str], meta: Mapping) -> dict:
    """The content of meta.json."""
    classes = {n: type(w).__name__ for n, w in weights.items() if isinstance(w, nn.Module)}
    info = {
        "format": FORMAT_VERSION,
        "smapctl_version": smapctl.__version__,
        "torch_version": torch.__version__,
        # On the CPU, float rounding follows the thread count: a run repeats bit for bit at the same one.
        "threads": torch.get_num_threads(),
        "kind": kind,
        "model_class": classes["model"],
        "classes": classes,
        "step": step,
        "recipe": _jsonable(recipe),
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    clash = sorted(set(meta) & set(info))
    if clash:
        raise ValueError(f"save_checkpoint: meta may not override {clash}")
    return info | _jsonable(dict(meta))


def _write_weights(folder: Path, weights: Mapping[str, Any]) -> None:
    for name, obj in weights.items():
        tensors = obj if isinstance(obj, Mapping) else obj.state_dict()
        path = folder / f"{name}.safetensors"
        try:
            save_file(_plain_tensors(tensors), str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors are not OSErrors: give them back their errno
            # No local holds the OSError: its traceback holds this frame, a cycle that kept the weights (a
            # training's model) in memory until Python's next full collection.
            if as_os_error(e) is None:
                raise
            raise as_os_error(e) from e
        finish_file(path)  # save_file creates it 0600; the other files of the checkpoint are not


def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) get their own copy,
    which safetensors requires."""
    out, storages = {}, set()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        out[name] = t
    return out


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    with open_output(path) as f:  # a failed write inside torch.save comes out as its OSError
        torch.save(dict(state), f)


def _write_bytes(path: Path, data: bytes) -> None:
    with open_output(path) as f:
        f.write(data)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place (replacing a checkpoint of the same step)."""
    if final.exists():
        old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _remove_stale_temps(root: Path) -> None:
    """Temp folders left by a killed writer (one writer per run folder)."""
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


_PLAIN = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Fail at save time, not at resume, if the state holds something weights_only loading refuses."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"{where}: {type(obj).__name__} cannot be loaded with weights_only=True; "
            "store tensors, numbers, strings, lists and dicts"
        )


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_dict(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor | np.ndarray | np.generic):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


# ------------------------------------------------------------------------------------------ loading


def load_meta(ckpt: str | Path) -> dict[str, Any]:
    """The checkpoint's meta.json as a dict."""
    path = Path(ckpt) / META
    try:
        if not path.is_file():  # (a folder of that name too)
            raise FileNotFoundError(path)
        meta = loads_json(path.read_text())
    except FileNotFoundError:  # (also when pruned between the look and the read)
        raise pruned_error(ckpt) or UserError(
            f"{path}: not found; is {ckpt} a complete checkpoint folder?"
        ) from None
    except ValueError as e:  # (json.JSONDecodeError, UnicodeDecodeError: ValueErrors)
        raise DamagedCheckpoint(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(
            f"{path}: not a checkpoint's meta.json (a JSON {type(meta).__name__}, not an object)"
        )
    version = meta.get("format")
    if type(version) is int and version > FORMAT_VERSION:  # (older ones are read as they are: README)
        raise UserError(
            f"{path}: checkpoint format {version}; this smapctl reads {FORMAT_VERSION} (a newer smapctl wrote"
            " it: upgrade smapctl to read it)"
        )
    return meta


def weight_names(ckpt: str | Path) -> list[str]:
    """The names of the weight files in a checkpoint ("model", "ema", ...); a folder of such a name is none
    (otherwise `ema.safetensors/` would be said to be "not found (this checkpoint has weights: ema,
    model)")."""
    return sorted(
        p.name.removesuffix(".safetensors") for p in Path(ckpt).glob("*.safetensors") if p.is_file()
    )


def load_weights(ckpt: str | Path, name: str = "model") -> dict[str, torch.Tensor]:
    """`name.safetensors` of a checkpoint as a CPU state dict."""
    path = Path(ckpt) / f"{name}.safetensors"
    missing = missing_weights(ckpt, name)
    if missing is not None:
        raise missing
    try:
        with utf8_path(path) as readable:
            return load_file(readable, device="cpu")
    except SafetensorError as e:
        raise DamagedCheckpoint(f"{path}: unreadable safetensors file ({e})") from None
    except FileNotFoundError:  # pruned between the look and the read
        raise pruned_error(ckpt) or UserError(f"{path}: not found") from None


def missing_weights(ckpt: str | Path, name: str) -> UserError | None:
    """Why `name.safetensors` of the checkpoint `ckpt` is not there to read (not found, not a file, the
    checkpoint pruned by its training: `pruned_error`), naming the weights it has; None when it is."""
    path = Path(ckpt) / f"{name}.safetensors"
    if path.is_file():
        return None
    have = ", ".join(weight_names(ckpt)) or "none"
    what = "not a file" if path.exists() else "not found"
    return pruned_error(ckpt) or UserError(f"{path}: {what} (this checkpoint has weights: {have})")


def pruned_error(ckpt: str | Path) -> UserError | None:
    """Why the checkpoint `ckpt` (RUN/checkpoints/step_N) is gone when a training still holds RUN: it
    pruned it (train.keep_checkpoints) while a command that had chosen it (`sample`, `evaluate`: the
    newest so far) loaded it; None otherwise. Said as "not found (this checkpoint has weights: none)",
    it would send the user looking for a broken checkpoint."""
    ckpt, run = Path(ckpt), run_of(ckpt)
    if ckpt.exists() or run is None or _step(ckpt) < 0:
        return None
    from smapctl.train.run_folder import training_holder  # (run_folder imports this module)

    holder = training_holder(run)
    if holder is None:
        return None
    return UserError(
        f"{ckpt}: removed by the training still running in {run} ({holder}) as it saved newer checkpoints"
        " (train.keep_checkpoints) while this command used it; run the command again (it takes the newest"
        " checkpoint), or copy a checkpoint out of the run to keep it"
    )


def load_weights_into(
    module,
    ckpt: str | Path,
    name: str = "model",
    assign: bool = False,
    fits: str = "the model its meta.json describes",
    keep=(),
) -> None:
    """Load `name.safetensors` into `module` (an nn.Module or an EMA; strictly); tensors missing, extra,
    of another shape or of another dtype (a hand-edited or foreign file) are a one-line UserError naming
    the file and saying it does not fit `fits`. The `keep` keys of `module` are left as they are (a
    fine-tuning run's class embedding of other classes: `train/init.py`)."""
    path = Path(ckpt) / f"{name}.safetensors"
    state = load_weights(ckpt, name)
    expected = module.state_dict()
    state |= {key: expected[key] for key in keep}
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and want.dtype != tensor.dtype:
            raise UserError(f"{path}: {key} is {tensor.dtype}, the model's is {want.dtype}")
    try:
        module.load_state_dict(state, assign=True) if assign else module.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        reason = str(e.args[0] if e.args else e).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: does not fit {fits} ({reason})") from None


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """state.pt, read with `torch.load(weights_only=True)`: a file holding anything but tensors and
    plain data (e.g. a pickle that would run code) is refused."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise UserError(f"{path}: not found; is {ckpt} a complete checkpoint folder?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file can be any of RuntimeError, EOFError, OSError, ...
        if refused_pickle(e):
            raise UserError(
                f"{path}: refused to load: it holds Python objects other than tensors and plain data"
            ) from None
        raise DamagedCheckpoint(f"{path}: unreadable ({torch_load_reason(e)})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path}: not a checkpoint's state (a {type(state).__name__}, not a dict)")
    return state
