"""A run folder: the lock a training holds on it for its life (`lock_folder`; `training_holder` says who
holds it), what a run writes there as it starts, the folders it writes into and the temp files a killed run
left behind, and where a run goes by default (`default_run_dir`) and may not go (`refuse_run_in_data`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt
from smapctl.train.layout import RUN_RECIPE

log = logging.getLogger("smapctl.train")


LOCK_FILE = ".lock"


def in_use(folder: Path, holder: str) -> str:
    """The refusal of a run folder another training holds."""
    return (
        f"{folder} is in use by another training ({holder}); wait for it to end or stop it (Ctrl-C, or "
        "`kill` its process: it saves a checkpoint first), or train in another folder (--out; for "
        "`reproduce`, --work)"
    )


def is_scaffolding(path: Path) -> bool:
    """What a training run writes as it starts: its lock file, recipe.yaml and an empty metrics.jsonl."""
    if path.name in (LOCK_FILE, RUN_RECIPE):
        return True
    return path.name == "metrics.jsonl" and path.stat().st_size == 0


def lock_folder(folder: Path):
    """Take `folder`'s lock: (the open lock file, None), or (None, who holds it) when another process
    does, as "process PID on HOST since TIME". Without `fcntl` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None, None
    from smapctl.io import hold_in_this_process, write_error

    path = folder / LOCK_FILE
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's life
    except OSError as e:
        raise write_error(path, e, "the run folder's lock file", kept="") from e
    try:
        _past_readers(lambda: fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not said which"
        handle.close()
        return None, holder
    except OSError as e:  # a file system without locks (some network mounts)
        log.warning("%s: could not lock the run folder (%s); nothing keeps a second training out", path, e)
        handle.close()
        return None, None
    import socket

    try:
        still_the_folders = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        still_the_folders = False
    if not still_the_folders:
        # A training that failed as it started removes the folder it made, lock file and all, before it
        # lets go: this process locked a file that is no longer the folder's.
        handle.close()
        return None, "a training that was ending as this one started; try again"
    try:
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {since}\n")
        handle.flush()
    except OSError as e:  # a full disk: no half-written lock file stays behind
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()
        raise write_error(path, e, "the run folder's lock file", kept="") from e
    hold_in_this_process(handle)  # (a forked DataLoader worker closes its copy)
    return handle, None


# `training_holder` (a command reading a run folder's checkpoints) holds the lock shared for a moment; a
# training holds it for its life.
_READER_TRIES = 5


def _past_readers(take: Callable[[], None]) -> None:
    """`take()` (an flock that does not wait), tried again 10 ms apart while the lock is held: otherwise a
    training started as a command looks for one in the folder would be refused, naming the training before
    it (the lock file's text). BlockingIOError when it is still held (by a training)."""
    for tries_left in reversed(range(_READER_TRIES)):
        try:
            return take()
        except BlockingIOError:
            if not tries_left:
                raise
            time.sleep(0.01)


def training_holder(folder: Path) -> str | None:
    """Who trains in the run folder `folder` now ("process PID on HOST since TIME", as `lock_folder`
    wrote it), or None: no lock file, nobody holds it, or no locks (Windows, some network mounts). The
    lock is only tried (shared, and let go at once), never written."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no training has held the folder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip() or "a process that has not said which"
    except OSError:  # a file system without locks
        pass
    os.close(fd)  # (closing lets go of the shared lock)
    return None


def check_the_folders_it_writes(run_dir: Path) -> None:
    """A file where the run's checkpoints/ or samples/ folder goes would stop the run only at its first
    checkpoint or preview (train.ckpt_every steps in: hours, all lost), and a checkpoint's as
    "could not write checkpoint (File exists)": it is refused as the run starts, naming it."""
    from smapctl.io import file_in_the_way

    for folder in (run_dir / ckpt.CHECKPOINTS, run_dir / "samples"):
        blocker = file_in_the_way(folder)
        if blocker is not None:
            raise UserError(
                f"{folder}: could not write the run's {folder.name}: {blocker} is a file, not a folder"
            )


def remove_stale_temp_files(run_dir: Path) -> None:
    """The temp files of atomic writes a killed run left in its folder and in `samples/` (its
    checkpoints' temp folders go with the next save)."""
    from smapctl.io import remove_temp_files

    for folder in (run_dir, run_dir / "samples"):
        remove_temp_files(folder)


def refuse_run_in_data(run_dir: Path, folders: dict[str, str | None]) -> None:
    """A run folder inside one of the image folders the run reads (`--out data/train`) is refused: its
    sample PNGs would join the dataset (a `samples` class for the next training on it); so is one inside
    another run's checkpoints, which that run deletes as it goes."""
    from smapctl.data.config import refuse_output_in_images

    ckpt.refuse_output_in_checkpoints(run_dir)  # nor inside another run's checkpoints, pruned as it goes
    refuse_output_in_images(run_dir, folders, "the run reads; choose a run folder elsewhere")


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / recipe_name
