"""Writing files so that a crash or a full disk never leaves half of one behind (issue 8).

Every output smapctl writes (token files, PNGs, `.npz`, `metrics.json`, plots, caches, checkpoint files)
goes through this module:

    with atomic_output(path, "token file") as f:   # a binary file object
        torch.save(data, f)

The data goes to a hidden temp file next to `path`, is fsynced, and only then renamed over `path`, so a
reader sees the old file or the new one, never a mix; a failure removes the temp file and leaves any
earlier `path` as it was. An `OSError` (disk full, permission denied, read-only file system) becomes a
one-line `UserError` naming `path` and saying what to do, also when the writing library wrapped it in an
exception of its own (a failed write inside `torch.save` surfaces as a RuntimeError "unexpected pos";
safetensors reports "... (os error 28)").

Checkpoints are folders made atomic as a whole (`train/checkpoint.py`); each of their files is written
with `open_output`, which has the same error handling without the rename.

safetensors files are written by `smapctl.safetensors_io` (the same bytes for the same tensors, or filled
in place through a memory map) onto this module's temp files.

Every finished file gets the mode `open()` gives a new one, 0o666 minus the umask (`finish_file`):
safetensors' `save_file` creates its files 0600, which would hide weights from the rest of a group that
can read the metadata next to them.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import re
import stat
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from smapctl.errors import SURROGATE, UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Windows' rules for files: a folder cannot be opened (nor so fsynced: NTFS journals a rename itself), a file
# is flushed only through a descriptor that may write it (FlushFileBuffers), and a file with a descriptor
# or a memory map open on it cannot be renamed or removed. Every write here meets one of them there.
_WINDOWS = os.name == "nt"
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


# ------------------------------------------------------------------------------------------ errors


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: `e` itself, or the one a safetensors error carries as "os error N"."""
    if isinstance(e, OSError):
        return e
    from safetensors import SafetensorError

    code = re.search(r"os error (\d+)", str(e)) if isinstance(e, SafetensorError) else None
    if code is None:
        return None
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))))


def is_disk_full(e: OSError) -> bool:
    """True when `e` says the disk (or the user's quota, or the file size limit) is full."""
    return e.errno in _DISK_FULL


def is_not_allowed(e: OSError) -> bool:
    """True when `e` says the file may not be written there (permissions, a read-only file system)."""
    return e.errno in _NOT_ALLOWED


def write_error(
    path: str | os.PathLike, e: OSError, what: str = "file", kept: str | None = None
) -> UserError:
    """One line for a failed write: `<path>: could not write <what> (<reason>)<: advice>; <kept>`.
    `kept` says what is still intact (default: any earlier file of that name); "" leaves it out."""
    path = Path(path)
    reason = e.strerror or str(e) or type(e).__name__
    if is_disk_full(e):
        advice = ": the disk is full; free some space or write elsewhere"
    elif e.errno in _NOT_ALLOWED:
        advice = ": write somewhere you may"
    else:
        advice = ""
    kept = f"any earlier {path.name} is unchanged" if kept is None else kept
    return UserError(f"{path}: could not write {what} ({reason}){advice}" + (f"; {kept}" if kept else ""))


@contextmanager
def removed_if_left_empty(folder: str | os.PathLike) -> Iterator[None]:
    """A folder that a command creates early (to fail before its long work if it cannot) is removed again
    when the command fails before writing anything into it, with the parents `mkdir -p` made for it
    (`--out new/a/b` left new/a behind); folders that existed before are kept. (A training run's folder
    is `TrainingRun.close`'s to remove, under the run folder's lock.)"""
    new = missing_folders(folder)
    try:
        yield
    except BaseException:
        remove_empty_folders(new)
        raise


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """`folder` and its parents that do not exist yet, innermost first: what `mkdir -p` would make."""
    folder = Path(folder).absolute()
    new = []
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        new.append(path)
    return new


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (`missing_folders` of a command that failed) innermost first, up to the first
    that is not empty: it is kept as it is, and so are its parents."""
    for path in folders:
        try:
            path.rmdir()
        except FileNotFoundError:  # never made (the failure came first)
            continue
        except OSError:  # not empty
            break


def make_folders(path: Path) -> None:
    """`path.mkdir(parents=True, exist_ok=True)` without recursion: pathlib recurses once per missing
    folder, and a decode of a token file whose images lie 1,000 folders deep ended with a RecursionError
    traceback. Errors are mkdir's (a file in the way: FileExistsError or NotADirectoryError)."""
    missing = []
    while not path.is_dir() and path.parent != path:  # (False under a file: up to the file itself)
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process, or a file
            if not folder.is_dir():
                raise


def ensure_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """`mkdir -p path`, with a failure (no permission, disk full, a file in the way) as a one-line
    UserError naming `path`."""
    path = Path(path)
    try:
        make_folders(path)
    except OSError as e:
        raise mkdir_error(path, path, e, what) from e
    return path


def mkdir_error(path: str | os.PathLike, folder: Path, e: OSError, what: str = "file") -> UserError:
    """One line for `path` when creating `folder` (`path` or its parent) failed: a file where a folder
    should be is named as such (mkdir says only "File exists" or "Not a directory"), anything else is
    `write_error`."""
    blocker = file_in_the_way(folder)
    if blocker is not None:
        return UserError(f"{path}: could not write {what}: {blocker} is a file, not a folder")
    return write_error(path, e, what, kept="")


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing one of `folder` and its parents when it is not a folder, else None."""
    for p in (folder, *folder.parents):
        if p.exists():  # False under a file too (ENOTDIR), so the walk goes on up to the file itself
            return None if p.is_dir() else p
    return None


@contextmanager
def writing_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder` (made if it is missing) while a command writes into it: another command writing
    the same folder at the same time is refused in one line. Two `sample`s started together each found
    the folder free of earlier images and left a mix of both runs' (exit 0 both); two `evaluate`s a
    metrics.json of one and a plot of the other. The lock is the kernel's `flock` on the folder itself:
    it goes with its process however that ends (not with its forked data workers), and leaves no file.
    Where nothing can be locked (Windows, some network file systems) nothing is held. The folders made
    for it are removed again, still held, when the block fails before writing into them. A folder there
    already that this process may not write into (its permissions, a read-only mount) is a UserError at
    once, as `tokenize` says of its -o: `evaluate --samples` scored every sample (an Inception pass of
    hours on a CPU) before metrics.json found it could not be written."""
    new = missing_folders(folder)
    folder = ensure_dir(folder, "the output folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        # (os.access says no to both; statvfs tells a read-only mount)
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
        code = errno.EROFS if read_only else errno.EACCES
        raise write_error(folder, PermissionError(code, os.strerror(code)), "the output folder", kept="")
    try:
        fd = open_locked(folder, os.O_RDONLY)
    except BlockingIOError:
        raise UserError(
            f"{folder}: another smapctl command (a sample, decode or evaluate) is writing into it; wait for"
            " it to end, or choose another -o"
        ) from None
    except OSError:  # a folder that cannot be read, or a file system without locks: not held
        fd = None
    if fd is not None:
        _HELD_FDS.add(fd)
    try:
        yield folder
    except BaseException:
        remove_empty_folders(new)
        raise
    finally:
        if fd is not None:
            _HELD_FDS.discard(fd)
            os.close(fd)


_HELD_FDS: set[int] = set()  # the folders `writing_into` holds
_HELD_FILES: weakref.WeakSet = weakref.WeakSet()  # the lock files `hold_in_this_process` was given


def hold_in_this_process(lock_file) -> None:
    """An open file whose lock this process holds (a run folder's, `train.run_folder.lock_folder`): a
    forked child closes its copy at once, as it does `writing_into`'s."""
    _HELD_FILES.add(lock_file)


def _let_go_in_a_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's locks: its copies are closed, so that a
    lock goes with the parent alone (otherwise a `kill -9`ed command's workers keep its folder held)."""
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()
    for handle in list(_HELD_FILES):
        with contextlib.suppress(Exception):  # whatever one does, the others are closed too
            handle.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_a_child)


# ------------------------------------------------------------------------------------------ syncing


def file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What tells a file from the one written over it (inode, modification time, size), or None: a file
    replaced atomically (`atomic_path`) has another one afterwards."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDWR if _WINDOWS else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_file(path: str | os.PathLike) -> None:
    """Give a written file the mode a new file gets from `open()` (0o666 minus the umask, whatever its
    writer chose) and flush its data to the disk."""
    os.chmod(path, 0o666 & ~_umask())
    fsync_path(path)


def _umask() -> int:
    """The process's umask, read from /proc where Linux shows it: setting it to read it and setting it
    back would race with other threads creating files."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable; file systems that cannot fsync a folder are let be."""
    if _WINDOWS:  # (a folder cannot be opened there)
        return
    try:
        fsync_path(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise


# ------------------------------------------------------------------------------------------ writing


class _Sink:
    """A binary file that remembers the first OSError one of its writes raised, so that the error can be
    recovered when a library turns it into its own exception. It has no `fileno`: PIL would otherwise
    write through the descriptor and report a failure without its errno."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextmanager
def open_output(path: str | os.PathLike, sync: bool = True) -> Iterator[BinaryIO]:
    """Open `path` for binary writing in place; on success the data is flushed and, with `sync`, fsynced.
    A failed write comes out as its OSError, whatever the writing library wrapped it in."""
    with open(path, "wb") as file:
        sink = _Sink(file)
        try:
            yield sink
            file.flush()
            if sync:
                os.fsync(file.fileno())
        except Exception as e:
            # Taken from the sink, and a copy raised: the error's traceback holds the frames that wrote
            # (the caller's, a training's model among them), and torch.save's C++ writer holds the sink, a
            # cycle Python's collector cannot see (all of it stayed to the end of the process); torch.save's
            # own exit holds the error too (its arguments, in a frame the raised error's traceback holds),
            # a cycle that stayed until the collector's next full pass.
            error, sink.error = sink.error, None
            if error is not None and e is not error:
                raise copy.copy(error) from e
            raise


TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # the temp file of `atomic_path`
TEMP_NAME_EXTRA = len(".") + len(".0123456789ab.tmp")  # what that name adds to the file's (`TempFile`)
ORPHAN_AGE_S = 60.0  # a temp file untouched this long, and locked by nobody, is an orphan
_SWEPT: set[str] = set()  # folders whose orphans this process has removed (once: the scan reads them whole)


def loads_json(text: str | bytes):
    """`json.loads`, with a document nested deeper than Python's recursion limit (`[[[[...`, in a file from
    elsewhere) a ValueError as other malformed JSON is, not a RecursionError (a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep to read") from None


@contextmanager
def utf8_path(path: str | os.PathLike) -> Iterator[str]:
    """`path` for the readers that take UTF-8 paths only (safetensors' `safe_open` and `load_file`,
    torch's memory-mapped load): itself, or for a name that is not UTF-8 the file opened here, as
    /proc/self/fd/N. A Linux name is bytes, and Python holds a Latin-1 folder's as lone surrogates, which
    those readers refuse: a run trained into such a folder could not be loaded. Without /proc (not Linux),
    the path goes on as it is."""
    path = os.fspath(path)
    if not SURROGATE.search(path) or not os.path.isdir("/proc/self/fd"):
        yield path
        return
    fd = os.open(path, os.O_RDONLY)  # (a missing file: FileNotFoundError, as from the reader)
    try:
        yield f"/proc/self/fd/{fd}"  # (the readers open the file again through it: their own descriptor)
    finally:
        os.close(fd)


def open_file_only(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """`os.open(path, flags, mode)` of a regular file only, never through a symbolic link: for a file
    smapctl reads or adds to in a folder others may have filled (a tokenizer checkpoint shared by another
    team, which a generator run pins). A link there to a file elsewhere would get a line appended to that
    file; a named pipe would hang its reader. Either is an OSError naming `path`, saying what is there."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):  # (O_NOFOLLOW's error: "too many levels")
            raise OSError(errno.ELOOP, "a symbolic link, which is not followed", os.fspath(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive `flock` on the file or folder `path`, held until the returned descriptor is closed
    (the process's end closes it, however it ends: in any PID namespace or container); None when
    another process holds it, or `path` cannot be opened or locked. Without locks (Windows) the
    descriptor, unlocked."""
    try:
        return open_locked(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None


def open_locked(path: str | os.PathLike, flags: int) -> int:
    """`path` opened with `flags`, its exclusive `flock` taken (without locks, Windows: not taken).
    BlockingIOError when another process holds it; another OSError when it cannot be opened or locked."""
    fd = os.open(path, flags)
    try:
        import fcntl
    except ImportError:  # Windows
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _hold(tmp: Path) -> int | None:
    """Create `tmp` and hold its lock (`try_lock`) while it is written, which tells `remove_orphans`
    that it is not an orphan; on a file system without locks the file is only young. On Windows nothing
    is held: there is no lock, and the descriptor would keep the file from being renamed into place."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return None if _WINDOWS else try_lock(tmp)


def remove_orphans(folder: Path) -> None:
    """The temp files in `folder` of writers killed outright (SIGKILL, an OOM kill: a token file's can be
    gigabytes), once per folder and process: a temp file whose lock (`_hold`) can be taken, and which
    holds data or is untouched for `ORPHAN_AGE_S`. A live writer's keeps its lock (taken before its first
    byte: an empty young one may be about to be locked). Without locks (Windows) nothing is removed.
    A run killed while making its token cache (21 GB for ImageNet) and started again at once, as a job
    scheduler does after an OOM kill, then makes the cache without the killed run's file beside it."""
    key = os.fspath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    try:
        import fcntl  # noqa: F401  (without locks, a live writer's file cannot be told from an orphan)

        entries = list(os.scandir(folder))
    except (ImportError, OSError):
        return
    now = time.time()
    for entry in entries:
        if not TEMP_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or (
                st.st_size == 0 and now - st.st_mtime < ORPHAN_AGE_S
            ):
                continue
        except OSError:
            continue
        fd = try_lock(entry.path)
        if fd is None:  # held by its writer, or gone
            continue
        try:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)  # under the lock: no writer holds it
        finally:
            os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> None:
    """The temp files `atomic_path` writers left in `folder` when they were killed (for a folder with
    one writer, before it writes again)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMP_NAME.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()


class TempFile:
    """A temp file next to `path` (TEMP_NAME), created and locked while it is written (`_hold`), which
    `commit` gives the usual mode (`finish_file`), fsyncs and renames over `path`, and `close` removes
    if it is still there. Parent folders are created (one that cannot be is a `mkdir_error` naming
    `path`); those of killed writers in the folder are removed first (`remove_orphans`). An OSError of
    its own becomes `write_error(path, ...)`. `atomic_path` is the usual way to use it; a writer whose
    work between creating and committing can fail for reasons of its own (`MappedSafetensors`) holds
    one, so that those failures are not taken for failed writes."""

    def __init__(self, path: str | os.PathLike, what: str = "file", kept: str | None = None):
        self.path, self.what, self.kept = Path(path), what, kept
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")  # TEMP_NAME
        try:
            make_folders(self.path.parent)
        except OSError as e:
            raise mkdir_error(self.path, self.path.parent, e, what) from e
        remove_orphans(self.path.parent)
        self._held = None
        try:
            self._held = _hold(self.tmp)
        except OSError as e:
            self.close()
            raise self.error(e) from e

    def error(self, e: OSError) -> UserError:
        return write_error(self.path, e, self.what, self.kept)

    def commit(self, sync_folder: bool = True) -> None:
        try:
            finish_file(self.tmp)
            os.replace(self.tmp, self.path)
            if sync_folder:
                fsync_dir(self.path.parent)
        except OSError as e:
            raise self.error(e) from e

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed clean-up must not hide why the write failed
            self.tmp.unlink(missing_ok=True)
        if self._held is not None:
            os.close(self._held)
            self._held = None


@contextmanager
def atomic_path(
    path: str | os.PathLike, what: str = "file", kept: str | None = None, sync_folder: bool = True
) -> Iterator[Path]:
    """A temp path next to `path` for writers that want a file name (safetensors' `save_file`); when the
    block ends without error it gets the usual mode (`finish_file`), is fsynced and renamed over `path`
    (`TempFile`), and its folder is fsynced (without `sync_folder`, the caller's to do, once for many
    files). Any failure removes the temp file; an OSError, also one a writing library wrapped
    (`as_os_error`), becomes `write_error(path, ...)`."""
    temp = TempFile(path, what, kept)
    try:
        yield temp.tmp
        temp.commit(sync_folder)
    except Exception as e:
        # No local holds the OSError: its traceback holds this frame, a cycle that kept the callers' frames
        # (a sampling's models) in memory until Python's next full collection.
        if as_os_error(e) is None:
            raise
        raise temp.error(as_os_error(e)) from e
    finally:
        temp.close()


@contextmanager
def atomic_output(
    path: str | os.PathLike, what: str = "file", kept: str | None = None, sync_folder: bool = True
) -> Iterator[BinaryIO]:
    """`atomic_path` with the temp file opened for binary writing (see the module docstring)."""
    # The temp file is fsynced once, by `atomic_path` as it is committed: fsynced here too, every PNG of a
    # `decode` or `sample` would take three fsyncs (the file twice, then its folder) instead of two.
    with atomic_path(path, what, kept, sync_folder) as tmp, open_output(tmp, sync=False) as f:
        yield f


def write_text_atomic(
    path: str | os.PathLike, text: str, what: str = "file", kept: str | None = None
) -> Path:
    """Write `text` (UTF-8) to `path` through `atomic_output`; returns the path."""
    with atomic_output(path, what, kept) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def reserve(fd: int, size: int, start: int = 0) -> None:
    """The file `fd` grown to `size` bytes with its blocks taken now: a full disk fails here (an
    OSError), and not as a SIGBUS when a write through a memory map of it finds no block. Where
    `os.posix_fallocate` is missing (macOS, Windows) or refused by the file system, bytes `start`..`size`
    are written as zeros instead (the bytes before `start`, a header already written, are kept; those
    after it must be zeros or not yet written): slower, but the blocks are as surely taken (a file system
    that stores runs of zeros as holes, as a compressing one may, can still leave them to be taken as
    the data is written)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:  # (macOS, Windows)
        pass
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = memoryview(bytes(8 << 20))
    offset = start
    while offset < size:
        written = _write_at(fd, zeros[: min(len(zeros), size - offset)], offset)
        if not written:  # (a full disk that says nothing)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        offset += written
    if os.fstat(fd).st_size < size:  # (nothing was written: size <= start)
        os.ftruncate(fd, size)


def _write_at(fd: int, data, offset: int) -> int:
    """`os.pwrite`, or a seek and a write where the system has no pwrite (Windows)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)
