"""What an interrupted `tokenize` keeps, so `--resume` goes on where it stopped (`PartFolder`, the folder
of parts, also keeps the work of a generator's token cache being built: `smapctl.data.latents`).

Beside the token file `OUT` the run keeps a folder `OUT.partial/` while it works: `plan.json` (what the
run is: a digest of its images and their labels, the prefix, the tokenizer's fingerprint, the weights
and the precision) and parts, `START-END.safetensors`, the tokens of the input images START..END-1 that
could be read (`index` says which) and, in the metadata, those that could not (with `--on-error skip`).
A part is written atomically about once a minute and when the run stops (Ctrl-C, SIGTERM, an unreadable
image with `--on-error fail`, a token file that cannot be written), so a kill without warning loses at
most a minute of encoding. The folder and its plan come with the first part (a run of under a minute that
is not stopped writes neither); a finished run writes the token file and removes the folder.

`--resume` reads the parts back only into a run with the same plan (another prefix or tokenizer would mix
two kinds of tokens in one file); a run without it refuses to start beside a partial folder, unless
`--overwrite`, which starts again.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from smapctl.errors import UserError

logger = logging.getLogger("smapctl")

PLAN = "plan.json"
PART_NAME = re.compile(r"(\d+)-(\d+)\.safetensors")
SAVE_EVERY = 60.0  # seconds between parts: what a kill without warning (SIGKILL, a power cut) can lose
PLAN_VERSION = 1


def partial_folder(out: Path) -> Path:
    """Where a run writing `out` keeps its parts: `codes.pt` -> `codes.pt.partial/`."""
    return out.with_name(f"{out.name}.partial")


def inputs_digest(relative: list[str], base: Path, labels: torch.Tensor) -> str:
    """sha256 of the images (their folder and paths, in order) and their labels: the same inputs give the
    same rows in the same order."""
    h = hashlib.sha256(str(base).encode("utf-8", "surrogateescape"))
    h.update("\0".join(relative).encode("utf-8", "surrogateescape"))
    h.update(labels.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _has_plan(folder: Path) -> bool:
    """Whether `folder` holds a run's work (a folder without its plan, or left empty by a run stopped
    before it wrote one, holds nothing to go on with)."""
    return (folder / PLAN).is_file()


def check_partial(out: Path, resume: bool, overwrite: bool) -> None:
    """Before the tokenizer is loaded: `--resume` needs a partial folder, and a run without it does not
    start beside one unless `--overwrite` (the folder is removed when that run starts encoding)."""
    from smapctl.io import TEMP_NAME

    folder = partial_folder(out)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder}, where tokenize keeps its work, is not a folder; move it")
    if folder.is_dir():
        names = [p.name for p in folder.iterdir()]
        if any(n != PLAN and not PART_NAME.fullmatch(n) and not TEMP_NAME.match(n) for n in names):
            raise UserError(f"{folder}, where tokenize keeps its work, holds other files; move it")
    if resume and not _has_plan(folder):
        finished = f"; {out} is a finished token file" if out.is_file() else ""
        raise UserError(f"--resume: no interrupted tokenize to go on with (no {folder / PLAN}{finished})")
    if not resume and not overwrite and _has_plan(folder):
        raise UserError(
            f"{folder} holds the work of an interrupted tokenize to {out}: --resume goes on from it, "
            "--overwrite starts again (and removes it)"
        )


class PartFolder:
    """A folder of parts, each `START-END.safetensors` holding the work on units START..END-1 (input
    images for `tokenize`, batches for the generator's token cache), and `plan.json`, what the run that
    wrote them was. The plan comes with the first part; `write` adds the part that follows on from the
    last (`saved` units covered)."""

    def __init__(self, folder: Path, plan: dict, what: str):
        self.folder = folder
        self.plan = {"version": PLAN_VERSION, **plan}
        self.what = what  # in messages: "the tokens", "the token cache"
        self.saved = 0
        self.last = time.monotonic()
        self.has_plan = False  # this run wrote the plan, or found it its own (the caller says so)
        self._lock: int | None = None  # `claim`

    def plan_then(self) -> dict | None:
        """The plan in the folder; None when there is none, or it cannot be read or is another version's."""
        try:
            then = json.loads((self.folder / PLAN).read_text())
        except (OSError, ValueError):
            return None
        return then if isinstance(then, dict) and then.get("version") == PLAN_VERSION else None

    def parts(self) -> list[tuple[int, int, Path]]:
        """(start, end, path) of every part, in order."""
        found = []
        with contextlib.suppress(OSError):
            for p in self.folder.iterdir():
                if m := PART_NAME.fullmatch(p.name):
                    found.append((int(m[1]), int(m[2]), p))
        return sorted(found)

    def following_on(self, limit: int | None = None) -> list[tuple[int, int, Path]]:
        """The parts that follow on from unit 0 (up to `limit` units); the others are removed (one removed
        by hand leaves a gap: what follows it is done again). Their end becomes `saved`."""
        from smapctl.io import remove_temp_files

        remove_temp_files(self.folder)  # a part a kill cut short
        chain, at = [], 0
        for start, end, path in self.parts():
            if start != at or end <= start or (limit is not None and end > limit):
                path.unlink(missing_ok=True)
                continue
            chain.append((start, end, path))
            at = end
        self.saved = at
        return chain

    def clear(self) -> int:
        """Remove the folder; -> the number of parts it held."""
        n = len(self.parts()) if self.folder.is_dir() else 0
        self.remove()
        self.saved, self.has_plan = 0, False
        return n

    def due(self) -> bool:
        return time.monotonic() - self.last >= SAVE_EVERY

    def write(self, end: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the part of units `saved..end-1` atomically (the plan first, with the first part)."""
        from safetensors.torch import save

        from smapctl.io import atomic_output, write_text_atomic

        if end <= self.saved:
            return
        if not self.has_plan:
            try:  # (a failure to write it leaves no folder)
                text = json.dumps(self.plan, indent=1) + "\n"
                write_text_atomic(self.folder / PLAN, text, f"the plan of {self.what}", kept="")
            except BaseException:
                self.remove()
                raise
            self.has_plan = True
        path = self.folder / f"{self.saved:010d}-{end:010d}.safetensors"
        data = {name: t.contiguous() for name, t in tensors.items()}
        with atomic_output(path, f"a part of {self.what}", kept="") as f:
            f.write(save(data, metadata=metadata))
        self.saved, self.last = end, time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def claim(self) -> bool:
        """Hold the lock of `<folder>.lock` (a file beside the folder, left there) until `release` or the
        process's end; False when another process holds it (it is doing the same work)."""
        from smapctl.io import try_lock

        lock = self.folder.with_name(f"{self.folder.name}.lock")
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            return False
        self._lock = try_lock(lock)
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class Parts(PartFolder):
    """The parts of one `tokenize` run (see the module docstring): units are input images."""

    def __init__(self, folder: Path, plan: dict):
        super().__init__(folder, plan, "the tokens")
        self.resumed = False  # the folder is an interrupted run's, whose parts are kept whatever happens

    def start(self, resume: bool) -> None:
        """A fresh run: any earlier folder removed (the plan is written with the first part). A resumed
        one: its plan checked against this run's (a one-line UserError naming what differs)."""
        if resume:
            self.resumed = True
            self._check_plan()
            return
        n = self.clear()  # the folder holds only a plan, parts and temp files (`check_partial`)
        if n:
            logger.warning("--overwrite: removed %s (%d parts of an interrupted tokenize)", self.folder, n)

    def _check_plan(self) -> None:
        then = self.plan_then()
        if then is None:
            raise UserError(
                f"--resume: {self.folder / PLAN} is not a tokenize plan it can read; --overwrite starts again"
            )
        what = {
            "images": "its images (their paths, order or labels) differ from this run's",
            "fingerprint": "its tokenizer differs from this run's",
        }
        # The options first: the tokenizer's fingerprint differs with --weights too.
        for key in ("prefix", "weights", "precision", "images", "fingerprint"):
            if then.get(key) != self.plan.get(key):
                differs = what.get(key) or f"its --{key} was {then.get(key)!r}, not {self.plan.get(key)!r}"
                raise UserError(
                    f"--resume: {differs} (the interrupted run in {self.folder}); run it as it was, or "
                    "--overwrite to start again"
                )

    def load(self, tokens: torch.Tensor, kept: list[int], bad: list[tuple[int, str]]) -> int:
        """Fill the first rows of `tokens`, `kept` and `bad` ((input index, reason) of the images that could
        not be read) from the parts that follow on from image 0; -> the number of input images they
        cover."""
        from safetensors import safe_open

        if not self.resumed:
            return 0
        self.has_plan = True  # checked by `start`
        for start, end, path in self.following_on():
            try:
                with safe_open(str(path), "pt") as f:
                    index = f.get_tensor("index")
                    rows = f.get_tensor("tokens")
                    skips = json.loads((f.metadata() or {}).get("skipped", "[]"))
            except Exception as e:  # noqa: BLE001 (a damaged part: safetensors raises its own errors)
                raise UserError(f"--resume: {path} could not be read ({e}); --overwrite starts again") from e
            shape_ok = rows.shape[1:] == tokens.shape[1:] and rows.dtype == tokens.dtype
            index_ok = len(index) == len(rows) and (
                len(index) == 0 or (start <= index.min() <= index.max() < end)
            )
            if not shape_ok or not index_ok or end > len(tokens):
                raise UserError(f"--resume: {path} is not a part of this run; --overwrite starts again")
            tokens[len(kept) : len(kept) + len(rows)] = rows
            kept.extend(index.tolist())
            bad.extend((int(i), str(reason)) for i, reason in skips)
        return self.saved

    def save(self, tokens: torch.Tensor, kept: list[int], bad: list[tuple[int, str]], done: int) -> None:
        """Write the part of input images `saved..done-1`: the rows of `tokens` of those kept (`kept` is
        in input order, so their rows are contiguous) and the reasons of those in `bad`."""
        if done <= self.saved:
            return
        lo, hi = bisect.bisect_left(kept, self.saved), bisect.bisect_left(kept, done)
        skips = [(i, reason) for i, reason in bad if self.saved <= i < done]
        index = torch.from_numpy(np.asarray(kept[lo:hi], dtype=np.int64))
        self.write(done, {"tokens": tokens[lo:hi], "index": index}, {"skipped": json.dumps(skips)})
