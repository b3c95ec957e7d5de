"""What `--resume` checks and says: the command that continues a run (`resume_command`), why a resume or a
fresh start is refused, a checkpoint a resume cannot go on from (another kind, model, seed, optimizer
settings, discriminator shape or classes: `check_resumable`, `check_same_classes`), and the settings that
changed since the run started (`warn_of_changed_settings`). `train-* --dry-run --resume` runs them too.
"""

from __future__ import annotations

import logging
import shlex
from contextlib import contextmanager
from pathlib import Path

from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt
from smapctl.train.layout import RUN_RECIPE

log = logging.getLogger("smapctl.train")


def resume_command(kind: str, run_dir: Path) -> str:
    """The command that continues a run: its own recipe.yaml (the recipe as resolved, with every --set
    and --max-steps it was started with) into its folder, with --resume."""
    run = shlex.quote(str(run_dir))
    recipe = shlex.quote(str(Path(run_dir) / RUN_RECIPE))
    return f"smapctl train-{kind} {recipe} --out {run} --resume"


@contextmanager
def past_a_damaged(path: Path):
    """A damaged file of the checkpoint `path` (`DamagedCheckpoint`) would stop --resume with no way past
    it: the message says which checkpoint a resume can start from instead, once this one is moved
    aside (`train-*` and its `--dry-run --resume`)."""
    try:
        yield
    except ckpt.DamagedCheckpoint as e:
        path = Path(path)
        earlier = [p for p in ckpt.list_checkpoints(ckpt.run_of(path)) if p != path]
        if earlier:
            advice = (
                f"move {path.name} out of {path.parent} to resume from {earlier[-1].name}, the newest "
                "before it"
            )
        else:
            advice = f"it is the run's only checkpoint: remove {ckpt.run_of(path)} to start the run again"
        raise type(e)(f"{e}; {advice}") from None


def nothing_to_resume(run_dir: Path) -> str:
    """Why --resume is refused in `run_dir`: no complete checkpoint; of a run that started (its recipe.yaml
    is there) and stopped before its first one, what to do (saying no more would be a dead end)."""
    said = f"--resume: no complete checkpoint in {Path(run_dir) / ckpt.CHECKPOINTS}"
    if (Path(run_dir) / RUN_RECIPE).is_file():
        return f"{said}: the run stopped before its first one; start it again without --resume"
    return said


def holds_checkpoints(run_dir: Path) -> str:
    """Why a new run is refused in `run_dir`: it holds an earlier run's checkpoints."""
    return (
        f"{run_dir} already holds checkpoints; pass --resume to continue it, or --out to start a new run "
        "elsewhere"
    )


def check_resumable(recipe, kind: str, path: Path, meta: dict, command: str) -> None:
    """--resume from the checkpoint `path` (its `meta`) with `recipe`: the same kind and model, seed,
    optimizer settings and discriminator shape, or a one-line UserError (`train-* --dry-run --resume`
    runs it too)."""
    from smapctl.config import to_dict

    if meta.get("kind") != kind:
        raise UserError(f"--resume: {path} is a {meta.get('kind')} checkpoint, not a {kind} one")
    saved = with_defaults(type(recipe.model), (meta.get("recipe") or {}).get("model"))
    if saved != to_dict(recipe.model):
        diff = _first_difference(saved or {}, to_dict(recipe.model), "model")
        own = ckpt.run_of(path) / RUN_RECIPE
        if _own_model(type(recipe.model), own) != saved:  # the advice would repeat what failed
            raise UserError(
                f"--resume: {path} was trained with another model ({diff}), and the run's own {own} no "
                f"longer says which (edited or removed since): the recipe it was trained with is under "
                f'"recipe" in {path / ckpt.META}; put that model back, or use another --out'
            )
        raise UserError(
            f"--resume: {path} was trained with another model ({diff}); use another --out, or go on "
            f"with the run's own recipe: {command}"
        )
    then = meta.get("recipe") or {}
    seed = (then.get("train") or {}).get("seed")
    if seed is not None and seed != recipe.train.seed:
        raise UserError(
            f"--resume: train.seed was {seed!r} in {path}, the recipe says {recipe.train.seed!r};"
            " the data order of a resumed run goes on from where it stopped in the order of its seed (a"
            " new seed would repeat and skip images): start a new run with --out to change it"
        )
    # The restored optimizer and scheduler states carry these; a new value would be silently ignored.
    for section, keys in OPTIMIZER_STATE_KEYS.items():
        cfg = getattr(recipe, section, None)
        if cfg is None:  # a generator has no `loss:`
            continue
        saved = with_defaults(type(cfg), (meta.get("recipe") or {}).get(section)) or {}
        now = to_dict(cfg)
        if section == "loss" and not (now["gan_weight"] and saved.get("gan_weight", 1)):
            continue  # no discriminator now, or none then: no state that carries disc_lr
        for key in keys:
            if key in saved and saved[key] != now[key]:
                raise UserError(
                    f"--resume: {section}.{key} was {saved[key]!r} in {path}, the recipe says "
                    f"{now[key]!r}; a resumed run keeps its optimizers' settings, so start a new run "
                    "with --out to change it"
                )
        if section == "loss" and "discriminator" in _files(meta):
            for key in DISCRIMINATOR_KEYS:  # its saved weights have that shape
                if key in saved and saved[key] != now[key]:
                    raise UserError(
                        f"--resume: loss.{key} was {saved[key]!r} in {path}, the recipe says "
                        f"{now[key]!r}; the saved discriminator has the old shape: start a new run"
                        " with --out to change it"
                    )


# Settings `warn_of_changed_settings` leaves out: --max-steps is how a run is lengthened; the datasets
# and held-out fraction are checked (`train/tokenizer.py`), and the workers change no sample or augmentation.
_RESUME_SAYS_NOTHING_OF = {"train.max_steps", "data.dataset", "data.val_dataset", "data.val_fraction"}
_RESUME_SAYS_NOTHING_OF |= {"data.num_workers", "train.log_with"}  # (nor do trackers change the training)


def warn_of_changed_settings(recipe, meta: dict, command: str) -> None:
    """After `check_resumable`: a warning naming each train.*, loss.*, data.* (a tokenizer's
    augmentation) and sample.* (a generator's previews and the sampling settings its checkpoints keep)
    setting of `recipe` other than in the run's saved recipe (in `meta`). Allowed (a longer warm-up, a
    later GAN start), but not in passing: a resume from the recipe file the run started from would undo
    its --set values without a word."""
    from smapctl.config import to_dict

    then, changed = meta.get("recipe") or {}, []
    for section in ("train", "loss", "data", "sample"):
        cfg = getattr(recipe, section, None)
        saved = with_defaults(type(cfg), then.get(section)) if cfg is not None else None
        if not isinstance(saved, dict):
            continue
        now = to_dict(cfg)
        for key in now:
            if f"{section}.{key}" in _RESUME_SAYS_NOTHING_OF:
                continue
            if key in saved and saved[key] != now[key]:
                changed.append(f"{section}.{key} {saved[key]!r} -> {now[key]!r}")
    if changed:
        log.warning(
            "--resume: %s differ from the run's own recipe; the run goes on with the recipe's values (to "
            "keep the run's: %s)",
            ", ".join(changed),
            command,
        )


def _own_model(cls, own: Path) -> dict | None:
    """The model section of a run's own recipe.yaml as `with_defaults` reads a checkpoint's (None when
    the file is missing or unreadable)."""
    from smapctl.config import ConfigError, read_yaml

    try:
        model = read_yaml(own).get("model")
    except (ConfigError, OSError):
        return None
    return with_defaults(cls, model)


def with_defaults(cls, saved: dict | None) -> dict | None:
    """A saved model config with the fields added since it was written filled in by their defaults,
    so that a checkpoint of an older smapctl still resumes; unreadable ones are returned as they are."""
    from smapctl.config import ConfigError, build, to_dict

    if not isinstance(saved, dict):
        return saved
    try:
        return to_dict(build(cls, saved))
    except ConfigError:
        return saved


# train.* values that live in the optimizer's and scheduler's saved states (param groups, base lrs).
# Per recipe section: the settings that the saved optimizer and scheduler states carry.
OPTIMIZER_STATE_KEYS = {"train": ("lr", "weight_decay", "betas"), "loss": ("disc_lr",)}
DISCRIMINATOR_KEYS = ("disc_width", "disc_layers")  # the shape of the saved discriminator


def _files(meta: dict) -> list[str]:
    """The weight names a checkpoint's meta.json lists ("model", "ema", "discriminator", ...)."""
    return [f.removesuffix(".safetensors") for f in meta.get("files", []) if f.endswith(".safetensors")]


def _first_difference(a: dict, b: dict, where: str) -> str:
    """The first key path where two nested dicts differ ("kind" first: it decides the other keys)."""
    for key in sorted(set(a) | set(b), key=lambda k: (k != "kind", k)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{where}.{key}")
            return f"{where}.{key} was {a.get(key)!r}, the recipe says {b.get(key)!r}"
    return where


def check_same_classes(path: Path, meta: dict, now: list[str]) -> None:
    """--resume from `path` (its `meta`) on data whose classes are `now`: the same classes in the same
    order (names in either Unicode form, `class_key`), or a one-line UserError."""
    from smapctl.data.folder import same_classes

    saved = meta.get("class_names")
    if saved is not None and not same_classes(list(saved), now):
        diff = _class_difference(list(saved), now)
        raise UserError(f"--resume: {path} was trained on other classes ({diff}); use another --out")


def _class_difference(saved: list[str], now: list[str]) -> str:
    from smapctl.data.folder import class_key

    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if class_key(a) != class_key(b):  # a name in the other Unicode form is no difference
            return f"class {i} was {a!r}, the data now gives {b!r}"
    return f"{len(saved)} classes, the data now gives {len(now)}"
