"""`smapctl/io.py`: atomic writes get the usual file mode, and a write that cannot happen is one line
naming the file, never a traceback from the clean-up."""

import contextlib
import errno
import gc
import os
import shutil
import stat
import weakref
from pathlib import Path

import pytest
import torch
from faults import fill_disk, temp_files
from safetensors.torch import save_file

from smapctl.errors import UserError
from smapctl.io import atomic_output, atomic_path, ensure_dir, file_identity, utf8_path, write_text_atomic


@pytest.fixture
def umask():
    """Set the process's umask for one test (restored afterwards)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=lambda m: f"umask-{m:03o}")
def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path, umask, mask):
    """0o666 minus the umask, as `open()` gives: also for safetensors' `save_file`, which creates 0600."""
    umask(mask)
    with atomic_path(tmp_path / "weights.safetensors", "the weights") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    with atomic_output(tmp_path / "data.pt", "the data") as f:
        torch.save({"x": 1}, f)
    write_text_atomic(tmp_path / "meta.json", "{}\n", "the metadata")
    modes = {p.name: _mode(p) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["weights.safetensors", "data.pt", "meta.json"], 0o666 & ~mask)


def test_an_atomic_write_fsyncs_its_file_once_and_then_its_folder(tmp_path, monkeypatch):
    # Per file, as `decode` and `sample` write tens of thousands: the temp file was fsynced as it was
    # closed and again as it was committed (3 fsyncs a PNG, the second one for nothing).
    import smapctl.io

    synced = []  # (inode, is a folder) of each fsync
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(smapctl.io.os, "fsync", fsync)
    with atomic_output(tmp_path / "a.bin") as f:
        f.write(b"data")
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    file_inode, folder_inode = (tmp_path / "a.bin").stat().st_ino, tmp_path.stat().st_ino
    assert synced == [(file_inode, False), (folder_inode, True)]


def test_an_atomic_write_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A rename before the fsync could leave, after a crash, a file of the new name with none of its data."""
    import smapctl.io

    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    seen = []  # the file at `target` as each fsync of a file happens
    real = os.fsync

    def fsync(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(target.read_bytes())
        real(fd)

    monkeypatch.setattr(smapctl.io.os, "fsync", fsync)
    with atomic_output(target) as f:
        f.write(b"new")
    assert seen == [b"old"] and target.read_bytes() == b"new"


def test_a_file_where_the_parent_folder_should_be_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for target in (afile / "x.pt", afile / "sub" / "x.pt"):
        with pytest.raises(UserError) as e:
            write_text_atomic(target, "data", "the token file")
        assert str(e.value) == f"{target}: could not write the token file: {afile} is a file, not a folder"
    with pytest.raises(UserError) as e:
        ensure_dir(afile, "the output folder")
    assert str(e.value) == f"{afile}: could not write the output folder: {afile} is a file, not a folder"
    assert afile.read_text() == "not a folder\n"


def test_a_parent_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    target = tmp_path / "locked" / "x.pt"
    with pytest.raises(UserError) as e:
        write_text_atomic(target, "data", "the token file")
    assert (
        str(e.value)
        == f"{target}: could not write the token file (Permission denied): write somewhere you may"
    )


def test_a_failing_clean_up_does_not_hide_the_write_error(tmp_path, monkeypatch):
    """The temp file cannot be removed either (say the folder went read-only): the error still says why
    the write failed."""
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    target = tmp_path / "x.pt"
    with pytest.raises(UserError) as e, atomic_output(target, "the token file") as f:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"{target}: could not write the token file (No space left on device)")
    assert len(temp_files(tmp_path)) == 1 and not target.exists()  # the one it could not remove


def test_a_failed_write_leaves_no_cycle_holding_its_callers(tmp_path, monkeypatch):
    """Once its error is let go, what the writing frames held is freed at once, without waiting for the
    collector: `atomic_path` kept the OSError in a local, and its traceback holds that frame, so through
    the callers' frames all they held (a sampling's generator and tokenizer, a training's model) stayed in
    memory until Python's next full collection."""
    fill_disk(monkeypatch, free=10, only="x.png")
    held = torch.nn.Linear(2, 2)  # what the caller's frame holds
    gone = weakref.ref(held)

    def write(model):
        with atomic_output(tmp_path / "x.png", "the image") as f:
            f.write(b"x" * 64)

    gc.disable()
    try:
        with pytest.raises(UserError, match="No space left on device"):
            write(held)
        del held
        assert gone() is None
    finally:
        gc.enable()


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A writer killed outright (SIGKILL, an OOM kill) left its temp file, a token file's gigabytes, for
    good; the next write into that folder removes it, at once when it holds data (its writer had locked
    it: a run started again right after an OOM kill). A live writer's stays (its lock says so, in any PID
    namespace), and so does a young empty one (its writer may be about to lock it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from smapctl.io import ORPHAN_AGE_S

    writer = (
        "import sys, time\n"
        "from smapctl.io import atomic_output\n"
        "with atomic_output(sys.argv[1], 'the token file') as f:\n"
        "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )

    def start(name):
        p = subprocess.Popen(
            [sys.executable, "-c", writer, str(tmp_path / name)], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout.readline() == "writing\n"
        [temp] = tmp_path.glob(f".{name}.*.tmp")
        return p, temp

    alive, held = start("other.pt")
    try:
        killed, orphan = start("codes.pt")  # (its start found the live writer's file locked)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        killed.stdout.close()
        young, old = tmp_path / ".third.pt.0123456789ab.tmp", tmp_path / ".fourth.pt.0123456789ab.tmp"
        young.write_bytes(b"")
        old.write_bytes(b"")
        then = time.time() - 2 * ORPHAN_AGE_S
        os.utime(old, (then, then))
        assert orphan.exists()
        write_text_atomic(tmp_path / "codes.pt", "x", "the token file")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["codes.pt", held.name, young.name])
    finally:
        alive.kill()
        alive.wait()
        alive.stdout.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_quota_or_file_size_limit_is_a_full_disk(tmp_path, code):
    from smapctl.io import is_disk_full, write_error

    e = OSError(code, os.strerror(code))
    assert is_disk_full(e)
    assert "the disk is full; free some space" in str(write_error(tmp_path / "x.pt", e))


def test_a_folder_held_for_writing_refuses_another_writer_and_keeps_its_folder(tmp_path, monkeypatch):
    """Two commands writing one folder at once: the second is refused in one line and removes nothing
    (it saw the folder missing as it started, and removed the one the first had just made and held), and
    a failed first one removes the folders it made while it still holds them."""
    from smapctl import io

    out = tmp_path / "new" / "out"
    make = io.ensure_dir

    def another_takes_it_first(folder, what="folder"):  # between our look and our lock
        monkeypatch.setattr(io, "ensure_dir", make)
        held.enter_context(io.writing_into(out))
        return make(folder, what)

    with contextlib.ExitStack() as held:
        monkeypatch.setattr(io, "ensure_dir", another_takes_it_first)
        with pytest.raises(UserError, match="another smapctl command .* is writing into it"):
            with io.writing_into(out):
                pass
        assert out.is_dir()  # the first one's, still held
    removed_while_held = []
    real_remove = io.remove_empty_folders

    def remove(folders):
        removed_while_held.append(io.try_lock(out) is None)  # another process could not take it yet
        real_remove(folders)

    monkeypatch.setattr(io, "remove_empty_folders", remove)
    shutil.rmtree(tmp_path / "new")
    with pytest.raises(RuntimeError), io.writing_into(out):
        raise RuntimeError("failed before writing")
    assert removed_while_held == [True] and not (tmp_path / "new").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_worker_does_not_keep_a_held_folder(tmp_path):
    """A command's forked data workers shared its folder lock: after a `kill -9` of the command the folder
    stayed held until they exited."""
    import time

    from smapctl.io import writing_into

    out = tmp_path / "out"
    started, go = os.pipe()
    with writing_into(out):
        child = os.fork()
        if child == 0:  # a DataLoader worker, outliving its parent's hold
            os.write(go, b"x")  # (running: the fork's handlers have run)
            time.sleep(3)
            os._exit(0)
        os.read(started, 1)
    os.close(started)
    os.close(go)
    try:
        with writing_into(out):  # taken at once (else a one-line UserError): the worker's copy was let go
            assert os.waitpid(child, os.WNOHANG) == (0, 0)  # while the worker still runs
    finally:
        os.waitpid(child, 0)


def test_a_forked_child_forgets_the_folders_it_let_go(tmp_path):
    """The child closes its copies of the held folders' descriptors and forgets them: a number kept would
    be closed again in its own child, by then perhaps another file's descriptor."""
    from smapctl import io

    with io.writing_into(tmp_path / "out"):
        assert len(io._HELD_FDS) == 1
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(write, str(len(io._HELD_FDS)).encode())
            os._exit(0)
        os.close(write)
        held_in_child = os.read(read, 16)
        os.close(read)
        os.waitpid(child, 0)
    assert held_in_child == b"0" and not io._HELD_FDS


def test_a_file_written_over_atomically_has_another_identity(tmp_path):
    """`file_identity` tells whether the rename of an atomic write happened (tokenize, decode and evaluate
    read it after a signal): the same text written again is another file; one left alone is the same."""
    path = tmp_path / "metrics.json"
    assert file_identity(path) is None
    write_text_atomic(path, "{}\n", "the metrics")
    first = file_identity(path)
    assert first is not None and file_identity(path) == first
    write_text_atomic(path, "{}\n", "the metrics")
    assert file_identity(path) != first


def test_the_first_rows_of_a_mapped_tensor_are_a_tensor_of_their_own(tmp_path):
    """`MappedSafetensors.rows(name, n)`: the first n rows, sharing the file's memory, with a storage of
    just those rows (a view's storage is the whole tensor's, and `torch.save` writes it whole)."""
    from smapctl.safetensors_io import MappedSafetensors

    f = MappedSafetensors(
        tmp_path / "t.safetensors", {"a": ((5, 3), torch.int64), "b": ((4,), torch.float32)}, {}
    )
    f.tensors["a"].copy_(torch.arange(15).view(5, 3))
    head = f.rows("a", 2)
    assert torch.equal(head, torch.arange(6).view(2, 3)) and head.untyped_storage().nbytes() == 6 * 8
    f.tensors["a"][0, 0] = 99  # the same memory
    assert head[0, 0] == 99 and f.rows("a", 0).shape == (0, 3) and f.rows("b", 4).shape == (4,)
    f.close()


def test_atomic_writes_follow_windows_file_rules(tmp_path, monkeypatch):
    """On Windows every atomic write failed: the folder's fsync opened the folder, the file's fsync went
    through a read-only descriptor, and the temp file was renamed into place with a descriptor still open
    on it. A file filled through a memory map is not made there (its callers make the rows in memory)."""
    from faults import windows_file_rules

    from smapctl.safetensors_io import MappedSafetensors

    windows_file_rules(monkeypatch)
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "first", "the metrics")
    write_text_atomic(path, "second", "the metrics")  # over the first
    with atomic_output(tmp_path / "codes.pt", "the token file") as f:
        torch.save({"x": torch.arange(3)}, f)
    assert path.read_text() == "second"
    assert torch.equal(torch.load(tmp_path / "codes.pt", weights_only=True)["x"], torch.arange(3))
    with pytest.raises(NotImplementedError, match="Windows"):
        MappedSafetensors(tmp_path / "cache.safetensors", {"t": ((2, 3), torch.float32)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.pt", "metrics.json"]


def test_json_nested_too_deep_is_malformed_json_wherever_it_is_read(tmp_path, caplog):
    """JSON nested past Python's recursion limit (`[[[[...`) in a file from elsewhere: a sample folder's
    sampling.json (evaluate), a run's metrics.jsonl (a resumed run's checks), an -o folder's metrics.json
    (sample) ended the command in a RecursionError traceback; it is malformed JSON like any other."""
    from smapctl.eval.generation import _sampled_with
    from smapctl.io import loads_json
    from smapctl.ops.sample import _scores_of
    from smapctl.train.logging import read_metrics

    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(ValueError, match="nested too deep"):
        loads_json(deep)
    (tmp_path / "sampling.json").write_text(deep)
    assert (
        _sampled_with(tmp_path) is None and "sampling.json: unreadable (JSON nested too deep" in caplog.text
    )
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1}}\n{deep}\n')
    skipped = []
    assert read_metrics(tmp_path / "metrics.jsonl", skipped) == [{"step": 1}] and skipped == [2]
    (tmp_path / "metrics.json").write_text(deep)
    assert _scores_of(tmp_path) == []


def test_a_folder_fsync_that_fails_for_another_reason_than_no_support_is_said(tmp_path, monkeypatch):
    """File systems that cannot fsync a folder are let be; an I/O error is not."""
    import smapctl.io

    def failing(code):
        def fsync_path(path):
            raise OSError(code, os.strerror(code))

        return fsync_path

    monkeypatch.setattr(smapctl.io, "_WINDOWS", False)  # (where no folder is fsynced)
    monkeypatch.setattr(smapctl.io, "fsync_path", failing(errno.EINVAL))
    smapctl.io.fsync_dir(tmp_path)
    monkeypatch.setattr(smapctl.io, "fsync_path", failing(errno.EIO))
    with pytest.raises(OSError) as e:
        smapctl.io.fsync_dir(tmp_path)
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_write_that_is_not_allowed_says_to_write_elsewhere(tmp_path, code):
    from smapctl.io import write_error

    error = write_error(tmp_path / "a.png", OSError(code, os.strerror(code)), "the image")
    assert str(error) == (
        f"{tmp_path / 'a.png'}: could not write the image ({os.strerror(code)}): write somewhere you may;"
        " any earlier a.png is unchanged"
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR | os.O_APPEND | os.O_CREAT], ids=["read", "append"])
def test_open_file_only_refuses_a_named_pipe(tmp_path, flags):
    """A named pipe where a file is read or added to (a checkpoint's pin list): opened without blocking, it
    was unchecked that it is then refused, so letting it through passed: a pin appended into it would be
    lost, and the list read from it empty (its checkpoint unpinned). An OSError naming the path."""
    from smapctl.io import open_file_only

    pipe = tmp_path / "pins"
    os.mkfifo(pipe)
    with pytest.raises(OSError, match="not a regular file") as caught:
        os.close(open_file_only(pipe, flags))
    assert caught.value.errno == errno.EINVAL and caught.value.filename == str(pipe)


def test_a_folder_is_swept_for_orphan_temp_files_once_per_process(tmp_path, monkeypatch):
    """Every atomic write first removes killed writers' temp files from its folder (`remove_orphans`),
    which reads the folder whole: once per folder and process. Only that orphans are removed was checked,
    so a sweep at every write passed, a read of the whole folder per PNG (a decode of 30,000 PNGs into a
    folder: 30,000 listings of up to 30,000 names). A folder not swept yet is swept at its first write."""
    from smapctl import io

    real, listed = os.scandir, []

    def counted(path=".", *args):
        listed.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(io.os, "scandir", counted)
    for i in range(3):
        write_text_atomic(tmp_path / "a" / f"{i}.txt", "x")
    write_text_atomic(tmp_path / "b" / "0.txt", "x")
    assert listed == [tmp_path / "a", tmp_path / "b"]


def test_utf8_path_hands_readers_a_name_that_is_not_utf8_as_the_open_file(tmp_path):
    # safetensors and torch's memory-mapped load take UTF-8 paths only; a Latin-1 name (lone surrogates in
    # Python) reaches them as /proc/self/fd/N of the file, open while they read it.
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"plain")
    with utf8_path(plain) as readable:
        assert readable == str(plain)
    latin = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.bin"))
    with open(latin, "wb") as f:
        f.write(b"latin")
    with utf8_path(latin) as readable:
        readable.encode("utf-8")
        with open(readable, "rb") as f:
            assert f.read() == b"latin"
    with pytest.raises(OSError):  # the descriptor is closed afterwards
        os.stat(readable)
    with pytest.raises(FileNotFoundError), utf8_path(latin + "-missing"):
        pass
