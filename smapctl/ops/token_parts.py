"""What an interrupted `tokenize` keeps, so `--resume` goes on where it stopped (`PartFolder`, the folder
of parts, also keeps the work of a generator's token cache being built: `smapctl.data.latents`).

Beside the token file `OUT` the run keeps a folder `OUT.partial/` while it works: `plan.json` (what the
run is: a digest of its images and their labels, of the files' sizes and times, the prefix, the
tokenizer's fingerprint, the weights and the precision) and parts, `START-END.safetensors`, the tokens of
the input images START..END-1 that could be read (`index` says which) and, in the metadata, those that
could not (with `--on-error skip`). A part is written atomically about once a minute and when the run
stops (Ctrl-C, SIGTERM, an unreadable image with `--on-error fail`, a token file that cannot be written),
so a kill without warning loses at most a minute of encoding. The folder and its plan come with the first
part (a run of under a minute that is not stopped writes neither); a finished run writes the token file
and removes the folder.

`--resume` reads the parts back only into a run with the same plan (another prefix or tokenizer would mix
two kinds of tokens in one file), and starts afresh without a partial folder; a run without it refuses
to start beside one (only the user removes it). A lock file beside the folder (`PartFolder.claim`) keeps
two runs from writing one folder.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
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
from smapctl.io import loads_json, utf8_path

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


def files_digest(paths: list) -> str:
    """sha256 of each file's size and modification time, in order: an image rewritten since an interrupted
    run (one `stat` a file; ImageNet's 1.28M take seconds, so only when a plan is written or checked). A
    file that cannot be looked at (a broken symbolic link, an image removed since the listing) counts as
    `-`, as the run skips it: its `stat` error ended a `--on-error skip` run at its first part, a minute
    in, and a stop at it with `--on-error fail` kept no part for --resume."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            h.update(b"-\n")
            continue
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_partial(out: Path, resume: bool) -> None:
    """Before the tokenizer is loaded: a run without `--resume` does not start beside an interrupted one's
    folder (nothing removes it but the user: `--overwrite` is about the token file)."""
    from smapctl.io import TEMP_NAME

    folder = partial_folder(out)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder}, where tokenize keeps its work, is not a folder; move it")
    if folder.is_dir():
        names = [p.name for p in folder.iterdir()]
        if any(n != PLAN and not PART_NAME.fullmatch(n) and not TEMP_NAME.match(n) for n in names):
            raise UserError(f"{folder}, where tokenize keeps its work, holds other files; move it")
    if not resume and _has_plan(folder):
        raise UserError(
            f"{folder} holds the work of an interrupted tokenize to {out}: --resume goes on from it; to "
            "start again, remove that folder"
        )


class PartFolder:
    """A folder of parts, each `START-END.safetensors` holding the work on units START..END-1 (input
    images for `tokenize`, batches for the generator's token cache), and `plan.json`, what the run that
    wrote them was. The plan comes with the first part; `write` adds the part that follows on from the
    last (`saved` units covered)."""

    def __init__(self, folder: Path, plan: dict, what: str, later: dict | None = None):
        self.folder = folder
        self.plan = {"version": PLAN_VERSION, **plan}
        self.later = later or {}  # plan entries worked out when the plan is written: name -> function
        self.what = what  # in messages: "the tokens", "the token cache"
        self.saved = 0
        self.last = time.monotonic()
        self.has_plan = False  # this run wrote the plan, or found it its own (the caller says so)
        self.failed = False  # a part could not be written
        self._lock: int | None = None  # `claim`
        self._unguarded = False  # `claim` found no locks on the file system, and holds none

    def plan_then(self) -> dict | None:
        """The plan in the folder; None when there is none, or it cannot be read or is another version's."""
        try:
            then = loads_json((self.folder / PLAN).read_text())
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
        """The parts that follow on from unit 0, up to `limit` units (those beyond are left: the parts
        written from there on replace them); the others are removed (one removed by hand leaves a gap: what
        follows it is done again). Their end becomes `saved`."""
        from smapctl.io import remove_temp_files

        remove_temp_files(self.folder)  # a part a kill cut short
        chain, at, dropped = [], 0, 0
        for start, end, path in self.parts():
            if start == at and end > start and limit is not None and end > limit:
                break
            if start != at or end <= start:
                path.unlink(missing_ok=True)
                dropped += 1
                continue
            chain.append((start, end, path))
            at = end
        if dropped:
            logger.warning(
                "%s: %d parts after a gap removed (their work is done again)", self.folder, dropped
            )
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
        from smapctl.io import atomic_path, write_text_atomic
        from smapctl.safetensors_io import write_safetensors

        if end <= self.saved:
            return
        try:
            if not self.has_plan:
                try:  # (a failure to write it leaves no folder)
                    self.plan |= {name: work() for name, work in self.later.items()}
                    text = json.dumps(self.plan, indent=1) + "\n"
                    write_text_atomic(self.folder / PLAN, text, f"the plan of {self.what}", kept="")
                except BaseException:
                    self.remove()
                    raise
                self.has_plan = True
            path = self.folder / f"{self.saved:010d}-{end:010d}.safetensors"
            data = {name: t.contiguous() for name, t in tensors.items()}
            with atomic_path(path, f"a part of {self.what}", kept="") as tmp:
                write_safetensors(tmp, data, metadata)
        except Exception:
            self.failed = True
            raise
        self.saved, self.last = end, time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def lock(self) -> Path:
        return self.folder.with_name(f"{self.folder.name}.lock")

    def claim(self) -> bool:
        """Hold the lock of the file `lock` beside the folder until `release` (which removes the file) or
        the process's end; False when another process holds it (it is doing the same work). Where the
        file system has no locks (some network mounts) nothing is held, as for a run folder, and the
        work goes on unguarded. A lock file that cannot be made (no permission, no room, a folder there)
        or opened is a UserError naming it, not "another tokenize is writing", which would refuse every
        tokenize into a folder on a mount without locks."""
        from smapctl.io import open_locked, write_error

        try:
            os.close(os.open(self.lock, os.O_WRONLY | os.O_CREAT, 0o644))
            fd = open_locked(self.lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # no locks here: nothing keeps a second run out
                logger.warning("%s: could not lock it (%s); nothing keeps a second run out", self.lock, e)
                self._unguarded = True
                return True
            raise write_error(self.lock, e, f"the lock file of {self.what}", kept="") from e
        if os.fstat(fd).st_ino != _inode(self.lock):  # its holder removed it meanwhile
            os.close(fd)
            return False
        self._lock = fd
        return True

    def release(self) -> None:
        from smapctl import io

        if self._unguarded:
            self._unguarded = False
            with contextlib.suppress(OSError):
                self.lock.unlink()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.lock.unlink()  # while still held: whoever opened it since sees another inode
            os.close(self._lock)
            self._lock = None
            if io._WINDOWS:  # an open file cannot be removed there (nor was it locked): removed once closed
                with contextlib.suppress(OSError):
                    self.lock.unlink()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class Parts(PartFolder):
    """The parts of one `tokenize` run (see the module docstring): units are input images. `files`: the
    images' paths, whose sizes and times the plan records when it is written (`files_digest`)."""

    def __init__(self, folder: Path, plan: dict, files: list):
        super().__init__(folder, plan, "the tokens", {"files": lambda: files_digest(files)})
        self.resumed = False  # the folder is an interrupted run's, whose parts are kept whatever happens

    def start(self, resume: bool) -> None:
        """A fresh run: nothing to do (the folder and its plan come with the first part; `check_partial`
        refused an earlier run's). A resumed one: its plan checked against this run's (a one-line
        UserError naming what differs); `resume` without an interrupted run starts afresh, saying so."""
        if not resume:
            self.clear()  # a folder without a plan: a run stopped before its first part was written
            return
        if not _has_plan(self.folder):
            logger.warning(
                "--resume: no interrupted tokenize in %s; starting from the first image", self.folder
            )
            self.clear()
            return
        self.resumed = True
        self._check_plan()

    def _check_plan(self) -> None:
        again = f"remove {self.folder} to start again"
        then = self.plan_then()
        if then is None:
            raise UserError(f"--resume: {self.folder / PLAN} is not a tokenize plan it can read; {again}")
        what = {
            "images": "its images (their paths, order or labels) differ from this run's",
            "fingerprint": "its tokenizer differs from this run's",
            "files": "some of its images were rewritten since (their sizes or modification times differ)",
        }
        # The options first: the tokenizer's fingerprint differs with --weights too.
        for key in ("prefix", "weights", "precision", "images", "fingerprint", "files"):
            now = self.later[key]() if key in self.later else self.plan.get(key)
            if then.get(key) != now:
                differs = what.get(key) or f"its --{key} was {then.get(key)!r}, not {now!r}"
                raise UserError(
                    f"--resume: {differs} (the interrupted run in {self.folder}); run it as it was, or "
                    f"{again}"
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
                with utf8_path(path) as readable, safe_open(readable, "pt") as f:
                    index = f.get_tensor("index")
                    rows = f.get_tensor("tokens")
                    skips = json.loads((f.metadata() or {}).get("skipped", "[]"))
            except Exception as e:  # noqa: BLE001 (a damaged part: safetensors raises its own errors)
                raise self._unusable(path, f"could not be read ({e})") from e
            shape_ok = rows.shape[1:] == tokens.shape[1:] and rows.dtype == tokens.dtype
            # Every image of START..END-1 once: kept (in order) or skipped.
            covered = sorted([*index.tolist(), *(int(i) for i, _ in skips)]) == list(range(start, end))
            in_order = len(index) < 2 or bool((index[1:] > index[:-1]).all())
            if not shape_ok or len(index) != len(rows) or not covered or not in_order or end > len(tokens):
                raise self._unusable(path, "is not a part of this run")
            tokens[len(kept) : len(kept) + len(rows)] = rows
            kept.extend(index.tolist())
            bad.extend((int(i), str(reason)) for i, reason in skips)
        return self.saved

    def _unusable(self, path: Path, why: str) -> UserError:
        """The error of a part `load` cannot read back, which says what to do. None of the parts counts as
        kept: otherwise `_say_kept` would say the run can go on from them with `--resume`, which stops
        there again."""
        self.saved = 0
        return UserError(
            f"--resume: {path} {why}; remove it (its images and those after it are encoded again), or "
            f"{self.folder} to start again"
        )

    def save(self, tokens: torch.Tensor, kept: list[int], bad: list[tuple[int, str]], done: int) -> None:
        """Write the part of input images `saved..done-1`: the rows of `tokens` of those kept (`kept` is
        in input order, so their rows are contiguous) and the reasons of those in `bad`."""
        if done <= self.saved:
            return
        lo, hi = bisect.bisect_left(kept, self.saved), bisect.bisect_left(kept, done)
        skips = [(i, reason) for i, reason in bad if self.saved <= i < done]
        index = torch.from_numpy(np.asarray(kept[lo:hi], dtype=np.int64))
        self.write(done, {"tokens": tokens[lo:hi], "index": index}, {"skipped": json.dumps(skips)})
