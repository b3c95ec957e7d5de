"""`smapctl/safetensors_io.py`: safetensors files of the same bytes for the same tensors, written whole or
filled in place through a memory map, taking their disk room first."""

import errno
import os

import pytest
import torch
from faults import temp_files
from safetensors.torch import load_file

from smapctl.errors import UserError
from smapctl.io import atomic_path


def test_safetensors_are_written_from_the_tensors_memory_with_the_metadata_in_one_order(tmp_path):
    """`write_safetensors` gives the same bytes for the same tensors and fields in any order (the
    library's own order changes from call to call), readable by the library, and builds no copy of the
    file in memory (`safetensors.torch.save` did: twice a token file's size, measured)."""
    import tracemalloc

    from safetensors import safe_open

    from smapctl.safetensors_io import write_safetensors

    tensors = {"tokens": torch.randn(1024, 1024), "labels": torch.arange(1024)}
    fields = {f"field{i}": f"value {i}" for i in range(10)}
    files = []
    for order in (sorted(fields), sorted(fields, reverse=True), [f"field{i}" for i in (3, 9, 0, 5, 1)]):
        meta = {k: fields[k] for k in order} | fields  # this order, then the rest
        path = tmp_path / f"{len(files)}.safetensors"
        with atomic_path(path) as tmp:
            tracemalloc.start()
            try:
                write_safetensors(tmp, tensors, meta)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert peak < 2**20  # the tokens alone are 4 MiB
        files.append(path.read_bytes())
    assert files[0] == files[1] == files[2]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == fields
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())


def test_a_file_written_whole_keeps_its_temp_files_lock_from_another_commands_sweep(tmp_path, monkeypatch):
    """safetensors' `save_file` makes a new file and renames it over the temp path, so the lock
    `atomic_path` holds was left on the file it replaced: another command's first write into the folder
    (two `evaluate`s caching one dataset in $SMAPCTL_CACHE) took the full, unlocked temp file for a killed
    writer's and removed it, and the write failed with "No such file or directory". The file written is
    the temp file itself, still locked: the sweep leaves it."""
    from smapctl import io
    from smapctl.safetensors_io import write_safetensors

    path = tmp_path / "digits-16px-v1.safetensors"
    tensors = {"images": torch.arange(64, dtype=torch.uint8), "labels": torch.arange(4)}
    with atomic_path(path, "the dataset cache") as tmp:
        write_safetensors(tmp, tensors, {"class_names": "[]"})
        monkeypatch.setattr(io, "_SWEPT", set())  # another command's first write into the folder
        io.remove_orphans(tmp_path)
    assert torch.equal(load_file(path)["labels"], tensors["labels"]) and not temp_files(tmp_path)


def test_a_file_written_whole_has_the_bytes_of_the_librarys_own(tmp_path):
    """`write_safetensors` lays the file out itself (into its locked temp file): the bytes of the library's
    `save_file` with its metadata sorted, for every dtype a file of smapctl holds, empty and 0-d too."""
    from smapctl.safetensors_io import _save_file_sorted, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(6).view(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    meta = {"format": "pt", "b": "2", "a": "1"}
    write_safetensors(tmp_path / "ours.safetensors", tensors, meta)
    _save_file_sorted(tmp_path / "library.safetensors", tensors, meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16, torch.uint8])
def test_a_safetensors_file_filled_in_place_is_the_one_written_whole(tmp_path, dtype):
    """`MappedSafetensors` (the token cache, filled as it is encoded) gives the bytes `write_safetensors`
    gives for the same tensors and fields, whatever their dtypes and names' order; until `commit` the
    file is a temp file beside its path, and one closed uncommitted is gone."""
    from smapctl.io import TEMP_NAME
    from smapctl.safetensors_io import MappedSafetensors, write_safetensors

    tensors = {
        "tokens": (torch.randn(7, 3, 5) * 9).to(dtype),
        "a_labels": torch.arange(7),
        "empty": torch.ones(0),
    }
    meta = {"version": "2", "fingerprint": "f" * 16}
    write_safetensors(tmp_path / "whole.safetensors", tensors, meta)
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    mapped = MappedSafetensors(tmp_path / "mapped.safetensors", specs, meta, "the cache")
    (temp,) = tmp_path.glob(".mapped.safetensors.*.tmp")
    assert (
        TEMP_NAME.match(temp.name) and temp.stat().st_size == (tmp_path / "whole.safetensors").stat().st_size
    )
    for k, t in tensors.items():
        assert not mapped.tensors[k].any()  # zeros until written
        mapped.tensors[k][...] = t
    mapped.commit()
    mapped.close()
    assert (tmp_path / "mapped.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    MappedSafetensors(tmp_path / "dropped.safetensors", specs, meta).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.safetensors", "whole.safetensors"]


def test_a_safetensors_file_filled_in_place_orders_its_dtypes_as_the_library(tmp_path):
    """Tensors of one item size and other dtypes (I64 and F64, BF16 and F16, F32 and I32, ...) are laid
    out in the library's order of its dtypes, not by name: sorted by item size and name, the mapped file
    put an F64 "a" before an I64 "b", and its bytes were not `write_safetensors`'s."""
    from smapctl.safetensors_io import _SAFETENSORS_DTYPES, MappedSafetensors, write_safetensors

    dtypes = [getattr(torch, name) for name in _SAFETENSORS_DTYPES]
    tensors = {f"{chr(ord('a') + i)}": torch.ones(3, dtype=d) for i, d in enumerate(dtypes)}
    write_safetensors(tmp_path / "whole.safetensors", tensors, {"v": "1"})
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    mapped = MappedSafetensors(tmp_path / "mapped.safetensors", specs, {"v": "1"})
    for k, t in tensors.items():
        mapped.tensors[k][...] = t
    mapped.commit()
    mapped.close()
    assert (tmp_path / "mapped.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_a_safetensors_file_filled_in_place_takes_its_room_first(tmp_path, monkeypatch):
    """A disk without room for the whole file is said when it is made (one line naming it), not when its
    tensors are all computed; the temp file goes."""
    from smapctl.safetensors_io import MappedSafetensors

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError) as e:
        MappedSafetensors(tmp_path / "big.safetensors", {"t": ((4, 4), torch.float32)}, {}, "the token cache")
    assert str(e.value).startswith(f"{tmp_path / 'big.safetensors'}: could not write the token cache (")
    assert "the disk is full" in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fallocate", ["missing", "refused"])
def test_without_fallocate_a_file_filled_in_place_still_takes_its_room(tmp_path, monkeypatch, fallocate):
    """Where `os.posix_fallocate` is missing (macOS) or the file system refuses it, the room is taken by
    writing zeros after the header (the file was left sparse, and a full disk met by a write through the
    map killed the process with SIGBUS): the blocks are there when it is made, the header is kept, the
    file is the library's, and a disk that fills while the zeros are written is a one-line error."""
    from smapctl.safetensors_io import MappedSafetensors, write_safetensors

    if fallocate == "missing":
        monkeypatch.delattr(os, "posix_fallocate")
    else:

        def refused(fd, offset, size):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        monkeypatch.setattr(os, "posix_fallocate", refused)
    tensors = {"codes": torch.arange(3 << 20, dtype=torch.int32).view(-1, 64), "y": torch.arange(5)}
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    mapped = MappedSafetensors(tmp_path / "mapped.safetensors", specs, {"v": "1"})
    (temp,) = temp_files(tmp_path)
    assert temp.stat().st_blocks * 512 >= temp.stat().st_size > 12 << 20  # not sparse
    for k, t in tensors.items():
        mapped.tensors[k][...] = t
    mapped.commit()
    mapped.close()
    write_safetensors(tmp_path / "whole.safetensors", tensors, {"v": "1"})
    assert (tmp_path / "mapped.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()

    writes = []

    def fills(fd, data, offset):
        writes.append(offset)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data) if os.lseek(fd, offset, os.SEEK_SET) == offset else 0

    monkeypatch.setattr(os, "pwrite", fills)
    with pytest.raises(UserError, match=r": could not write the token cache \(.*the disk is full"):
        MappedSafetensors(tmp_path / "big.safetensors", specs, {}, "the token cache")
    assert writes[1] == writes[0] + (8 << 20) and not temp_files(tmp_path)


def test_the_metadata_is_sorted_also_when_the_librarys_header_needs_no_padding(tmp_path):
    """The reordered header fits exactly when the library's has no padding (one length in eight): it is
    written then too, not left in the library's order of the moment."""
    import json

    from smapctl.safetensors_io import write_safetensors

    fields = {f"field{i}": "v" for i in range(8)}
    unpadded = 0
    for extra in range(8):  # one of eight lengths is a multiple of 8
        meta = fields | {"extra": "x" * extra}
        path = tmp_path / f"{extra}.safetensors"
        write_safetensors(path, {"t": torch.zeros(1)}, meta)
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        unpadded += not data[8 + n - 1 : 8 + n].isspace()
        assert list(json.loads(data[8 : 8 + n])["__metadata__"]) == sorted(meta)
    assert unpadded == 1


def test_a_file_filled_in_place_whose_pages_cannot_be_written_back_is_one_line(tmp_path):
    """`commit` flushes the mapped pages before the file takes its name: an error writing them back (EIO,
    a network file system out of room) is one line naming the file, the earlier file of that name intact
    and the temp file gone once closed. Nothing checked that the pages were flushed at all."""
    from smapctl.safetensors_io import MappedSafetensors

    class PagesNotWritten:  # (a mapping's own methods cannot be replaced)
        def __init__(self, mapping):
            self.mapping = mapping

        def flush(self):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"earlier")
    mapped = MappedSafetensors(path, {"t": ((4, 4), torch.float32)}, {}, "the token cache")
    mapped.tensors["t"].fill_(1.5)
    mapped._map = PagesNotWritten(mapped._map)
    with pytest.raises(UserError) as e:
        mapped.commit()
    mapped.close()
    assert str(e.value).startswith(f"{path}: could not write the token cache (")
    assert path.read_bytes() == b"earlier" and temp_files(tmp_path) == []
