"""Faults for the reliability tests (issue 8): a disk that fills up under smapctl's writers, image
folders with broken files in them, a run folder another process holds, and signals landing at a chosen
point."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors
import safetensors.torch

import smapctl.io
import smapctl.safetensors_io
import smapctl.train.logging
import smapctl.train.run_folder

# The modules whose `open` writes smapctl's files: every output goes through `smapctl.io` (safetensors
# files through `smapctl.safetensors_io`); the metrics log of a training run appends through its own
# file, and a run folder's lock file is run_folder's.
WRITERS = (smapctl.io, smapctl.safetensors_io, smapctl.train.logging, smapctl.train.run_folder)
# `write_safetensors` writes through safetensors' `save_file`, from Rust: replaced too.
SAVE_FILE = safetensors.torch.save_file


class _FullFile:
    """A file opened for writing on a disk with `left[0]` bytes free: a write past that writes what fits
    and fails with ENOSPC, as `write(2)` does."""

    def __init__(self, file, left: list[int]):
        self._file, self._left = file, left

    def write(self, data):
        size = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if size > self._left[0]:
            fits = self._left[0]
            self._left[0] = 0
            if fits:
                self._file.write(data[:fits])
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left[0] -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


class PicklePayload:
    """A pickled object whose unpickling would create the file `target`: a file that holds one must be
    refused unread (a token file, Inception weights), never run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def fill_disk(monkeypatch, free: int = 0, only: str | None = None, after: int = 0) -> list[Path]:
    """From now on smapctl's writes find `free` bytes left on the disk. With `only`, just files whose
    name contains it are on the full disk, and the first `after` of those still fit. Returns the list
    of the files that were opened on the full disk."""
    left, hits, seen = [free], [], [0]

    def on_full_disk(file, mode: str) -> bool:
        if not any(c in mode for c in "wax") or (only is not None and only not in Path(file).name):
            return False
        seen[0] += 1
        if seen[0] <= after:
            return False
        hits.append(Path(file))
        return True

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FullFile(f, left) if on_full_disk(file, mode) else f

    def fake_save_file(tensors, filename, metadata=None):
        """safetensors writes from Rust: what fits is written, then its error for ENOSPC is raised."""
        if not on_full_disk(filename, "wb"):
            return SAVE_FILE(tensors, filename, metadata=metadata)
        try:
            with _FullFile(builtins.open(filename, "wb"), left) as f:
                f.write(safetensors.torch.save(tensors, metadata=metadata))
        except OSError as e:
            message = f"Error while serializing: I/O error: {e.strerror} (os error {e.errno})"
            raise safetensors.SafetensorError(message) from None

    for module in WRITERS:
        monkeypatch.setattr(module, "open", fake_open, raising=False)
    monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file)
    return hits


def free_disk(monkeypatch) -> None:
    """Undo `fill_disk` (and only it: `monkeypatch.undo()` would also undo the suite's other patches)."""
    for module in WRITERS:
        monkeypatch.setattr(module, "open", builtins.open, raising=False)
    monkeypatch.setattr(safetensors.torch, "save_file", SAVE_FILE)


def add_broken_images(folder: Path) -> list[Path]:
    """A zero-byte `.png` and a text file named `.jpg` in `folder` -> their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    empty, text = folder / "empty.png", folder / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("this is not a picture\n")
    return [empty, text]


def temp_files(folder: Path) -> list[Path]:
    """Temp files smapctl.io would leave behind after a failed write (none, when it works)."""
    return sorted(p for p in Path(folder).rglob(".*.tmp"))


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` and its bytes."""
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# Takes argv[1]'s lock (making the folder when argv[2] says "starting", with the recipe.yaml and empty
# metrics.jsonl of a training that has just started), says so, and holds it until killed.
_HOLDER = """\
import sys, time
from pathlib import Path
from smapctl.train.run_folder import lock_folder
run = Path(sys.argv[1])
if sys.argv[2] == "starting":
    run.mkdir(parents=True, exist_ok=True)
handle, _ = lock_folder(run)
if sys.argv[2] == "starting":
    (run / "recipe.yaml").write_text("kind: tokenizer\\n")
    (run / "metrics.jsonl").touch()
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_elsewhere(run_dir: Path, starting: bool = False) -> Iterator[subprocess.Popen]:
    """Another process holds `run_dir`'s lock, as a training there would (`starting`: one that has just
    made the folder and written its recipe), until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir), "starting" if starting else "running"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held", "the holder did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def interrupt_sampling(monkeypatch, at: int) -> list:
    """Ctrl-C as the generator draws its `at`-th batch (`smapctl.train.generator.generate`); returns the
    list that counts the calls (clear it, or set its length, to count again)."""
    import smapctl.train.generator as generator

    real, calls = generator.generate, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generator, "generate", interrupted)
    return calls


def interrupt_after_write(monkeypatch, module, at: int) -> list:
    """Ctrl-C inside `module.save_png`'s `at`-th call, just after the file is written (as a signal during
    the atomic write's fsync, after its rename); returns the paths written (clear it to count again).
    `module.save_png` is the original again once `monkeypatch` undoes it."""
    real, calls = module.save_png, []

    def interrupted(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        calls.append(path)
        if len(calls) == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_png", interrupted)
    return calls


def signal_after(monkeypatch, owner, name: str, signums: list[int]) -> None:
    """`owner.name` sends this process the next signal of `signums` once it has returned (as a signal
    landing just after a file is renamed into place, or as a command prints its last line): where a
    signal lands, without a race. `signums` is emptied as they are sent."""
    real = getattr(owner, name)

    def then_signalled(*args, **kwargs):
        result = real(*args, **kwargs)
        if signums:
            os.kill(os.getpid(), signums.pop(0))
        return result

    monkeypatch.setattr(owner, name, then_signalled)


class _SwallowsItsSignal:
    """Collected at once, it sends SIGTERM to this process from its `__del__`, where Python cannot raise
    the handler's KeyboardInterrupt ("Exception ignored in ..."), as in a callback for an import's module
    lock, where a review's SIGTERM in a command's first seconds landed."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def sigterm_lost_as_the_command_starts(monkeypatch) -> None:
    """The next CLI command (`smapctl.cli.main`, in this process) receives a SIGTERM as it sets itself up,
    which Python loses: its handler's KeyboardInterrupt is raised where it cannot be. (Mark the test with
    `@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")`: what Python lost.)"""
    import smapctl.cli as cli

    real = cli.setup_logging

    def setting_up():
        real()
        _SwallowsItsSignal()

    monkeypatch.setattr(cli, "setup_logging", setting_up)


@contextlib.contextmanager
def sigterm_caught() -> Iterator[list]:
    """SIGTERM, outside the command that takes it, only counted (in the list yielded): one sent to this
    process by a test would otherwise end pytest."""
    caught: list = []
    previous = signal.signal(signal.SIGTERM, lambda *_: caught.append(1))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)


def windows_file_rules(monkeypatch) -> None:
    """Windows' rules for files, on this Linux machine, for what smapctl does itself: no `fcntl`; a folder
    cannot be opened (EACCES); `fsync` needs a descriptor that may write (FlushFileBuffers); a file that
    this process holds open, by a descriptor or a memory map, cannot be renamed or removed ("[WinError 32]
    The process cannot access the file because it is being used by another process")."""
    import fcntl

    real_open, real_fsync, real_replace, real_unlink = os.open, os.fsync, os.replace, os.unlink

    def held_open(path) -> bool:
        target = os.path.realpath(path)
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    return True
        return False

    def open_(path, flags, *args, **kwargs):
        if os.path.isdir(path) and "dir_fd" not in kwargs:  # (shutil.rmtree's, Linux's own way)
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_fsync(fd)

    def in_use(real):
        def call(path, *args, **kwargs):
            if held_open(path):
                raise PermissionError(errno.EACCES, "[WinError 32] used by another process", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    monkeypatch.setattr(smapctl.io, "_WINDOWS", True, raising=False)  # (older smapctl had none)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", in_use(real_replace))
    monkeypatch.setattr(os, "unlink", in_use(real_unlink))
    monkeypatch.setattr(os, "remove", in_use(real_unlink))


def record_fsyncs(monkeypatch) -> list[tuple[bool, int]]:
    """(is a folder, inode) of each fsync smapctl's writers make from now on (they are made as well)."""
    import stat

    synced, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        real(fd)

    monkeypatch.setattr(smapctl.io.os, "fsync", fsync)
    return synced


class SignalsAsItsSecondWorkerStarts:
    """A dataset base (subclasses give `__getitem__`; 4 items) that sends SIGTERM to this process as it is
    pickled for its second DataLoader worker: a signal while `spawn` or `forkserver` workers start (seconds,
    as each imports torch). Reset `pickled` to 0 before each use."""

    pickled = 0

    def __len__(self):
        return 4

    def __getstate__(self):
        SignalsAsItsSecondWorkerStarts.pickled += 1
        if SignalsAsItsSecondWorkerStarts.pickled == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


class Stop(Exception):
    """Raised by a test's signal handler, to tell its stop from any other exception."""


@contextlib.contextmanager
def stopped_as_the_second_worker_starts(monkeypatch):
    """The block starts two DataLoader workers over a `SignalsAsItsSecondWorkerStarts` dataset; its SIGTERM
    must reach this process's handler once, after both workers started (the handler raises `Stop`, which
    ends the block), with no unraisable exception (torch's, from a half-made iterator) and no worker left.
    Another thread runs meanwhile without the main thread's mask, as torch's do."""
    import gc
    import multiprocessing
    import threading

    unraisable, handled = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(SignalsAsItsSecondWorkerStarts, "pickled", 0)
    before = set(multiprocessing.active_children())  # (this process's before the test's)
    others = len(before)

    def stop(signum, frame):
        handled.append(len(multiprocessing.active_children()) - others)  # the workers started
        raise Stop

    previous = signal.signal(signal.SIGTERM, stop)
    other = threading.Event()
    taker = threading.Thread(target=other.wait)
    taker.start()
    try:
        with pytest.raises(Stop):
            yield
    finally:
        other.set()
        taker.join()
        signal.signal(signal.SIGTERM, previous)
    gc.collect()
    assert handled == [2]  # once, after both workers had started
    assert unraisable == []
    # The workers were told to stop, and exit once they have started and read it. torch's shutdown waits
    # for that 2 x 5 s, then sends SIGTERM, which these workers block: a worker still importing torch
    # (20 s and more on a loaded machine) was alive here, though it exits on its own. Waited for, with a
    # deadline: a worker never told to stop would wait for work for ever.
    for worker in set(multiprocessing.active_children()) - before:
        worker.join(timeout=300)
    assert len(multiprocessing.active_children()) == others


@contextlib.contextmanager
def shallow_recursion_limit(frames: int = 150) -> Iterator[None]:
    """Python's recursion limit `frames` above the caller's depth, for the block: a folder tree a few
    hundred deep is then too deep for code that recurses once per level (as Python 3.11's os.walk, glob's
    `**` and pathlib's `mkdir(parents=True)` do), without making a tree of 1,000 levels."""
    import inspect

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def without_blocking_on(fifo: Path, call, blocked: str):
    """`call()`'s result, run in a thread; a test failure saying `blocked` when it is still waiting after
    30 s, as opening the named pipe `fifo` for reading waits for a writer (one is then opened, so that the
    thread ends)."""
    import threading

    found = []
    thread = threading.Thread(target=lambda: found.append(call()), daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # blocked in the pipe's open: a writer lets it go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(blocked)
    return found[0]
