"""safetensors files written the same bytes for the same tensors (`write_safetensors`), or filled in place
through a memory map (`MappedSafetensors`: a token cache of tens of gigabytes built in the page cache),
both through `smapctl.io`'s atomic temp files."""

from __future__ import annotations

import json
import math
import os
import sys

from smapctl import io  # (its names read at call time: the tests stand in a Windows or a full disk)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """The bytes of `safetensors.torch.save_file`, but with the header's metadata in sorted key order:
    the library writes it in the order of a Rust HashMap, which differs from run to run, so the same
    tensors and fields would give files of other bytes (a checksum of two identical token files would
    differ). Meant for `atomic_path`'s temp path, and written into that file itself (`_layout`, as
    `MappedSafetensors` lays one out; each tensor from its own memory: `save`, which builds the file in
    memory, takes twice the tensors' size on top of them): save_file makes a new file and renames it over
    the path, so the lock `atomic_path` holds on its temp file was left on the file it replaced, and a
    command of a sweep whose first write went into the same folder (two `evaluate`s caching one dataset,
    two `tokenize`s into one folder) took the full, unlocked temp file for a killed writer's and removed
    it (`remove_orphans`): "could not write ... (No such file or directory)". A big-endian machine
    (safetensors' bytes are little-endian) or a dtype not laid out here: save_file, its header
    reordered in place."""
    import torch

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    if sys.byteorder != "little" or any(_dtype_name(d) not in _SAFETENSORS_DTYPES for _, d in specs.values()):
        _save_file_sorted(path, tensors, metadata)
        return
    head, offsets, _ = _layout(specs, metadata)
    with open(path, "wb") as f:  # (truncated: the same file, its lock kept)
        f.write(head)
        for name in offsets:
            if tensors[name].numel():
                f.write(tensors[name].reshape(-1).view(torch.uint8).numpy())


def _save_file_sorted(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """`save_file`, then the header's metadata rewritten in place in sorted key order. The reordered
    header is as long as the library's (the same entries in the same JSON; its padding is spaces, as the
    library's); were it longer, the library's is kept."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never seen: JSON of the same entries; the library's header is kept then
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def _layout(specs: dict, metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """(the 8-byte length and header safetensors writes for tensors `specs` (name -> (shape, torch
    dtype)) and `metadata`, each name's offset in the file in the order their bytes follow the header,
    the bytes of all of them): the
    library's order (by its dtypes' order, `_SAFETENSORS_DTYPES`, then by name), its JSON, its padding of
    the header with spaces to 8 bytes."""
    names = sorted(specs, key=lambda k: (-_SAFETENSORS_ORDER[_dtype_name(specs[k][1])], k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    start = 0
    for name in names:
        shape, dtype = specs[name]
        end = start + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[_dtype_name(dtype)]}
        header[name] |= {"shape": list(shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    return head, {name: len(head) + header[name]["data_offsets"][0] for name in names}, start


# safetensors' names of the dtypes a `MappedSafetensors` holds, in the library's order of its `Dtype` enum,
# which it lays tensors out by (the last first): not the item size alone, so that of two tensors of one size
# an I64 comes before an F64, a BF16 before an F16, an F32 before an I32 (sorted by size and name, their
# files differed from `write_safetensors`'s)
_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
}
_SAFETENSORS_ORDER = {name: i for i, name in enumerate(_SAFETENSORS_DTYPES)}


class MappedSafetensors:
    """A safetensors file filled in place: its header is written first, and `tensors` are views of the
    rest of the file through a shared memory map, zeros until they are written. Tensors of tens of
    gigabytes (an ImageNet token cache with its mirror images: 21 GB) are then built in the page cache,
    which the kernel writes back to the disk and can drop, instead of in the process's own memory, and
    are not copied once more to be written. The file is a `TempFile` beside `path` until `commit`
    flushes it and renames it over `path`; `close` removes it when it was not committed. The room for
    the whole file is taken when it is made (`reserve`), so a disk without it is said then
    (a `write_error`), not hours of work later. Its bytes are those `write_safetensors` writes for the
    same tensors and metadata (tested): the library's order (by its dtypes' order, `_SAFETENSORS_DTYPES`,
    then by name), its JSON, its padding of the header with spaces to 8 bytes. On a big-endian machine it
    is a NotImplementedError, before any file is made: the map holds the machine's bytes, and safetensors'
    are little-endian (`save_file` swaps them there, and `load_file` back). So it is on Windows, where a
    mapped file can be neither renamed into place nor removed (its callers make the rows in memory).

    `specs`: name -> (shape, torch dtype)."""

    def __init__(self, path: str | os.PathLike, specs: dict, metadata: dict[str, str], what: str = "file"):
        import mmap

        if sys.byteorder != "little":  # (the tensors would be written as the machine holds them)
            raise NotImplementedError("a safetensors file filled in place needs a little-endian machine")
        if io._WINDOWS:
            raise NotImplementedError("a mapped file cannot be renamed or removed on Windows")
        self._temp = io.TempFile(path, what)
        self._specs = specs
        try:
            head, self._offsets, start = _layout(specs, metadata)
            with open(self._temp.tmp, "r+b") as f:
                f.write(head)
                f.flush()
                io.reserve(f.fileno(), len(head) + start, start=len(head))
                self._map = mmap.mmap(f.fileno(), len(head) + start) if start else None
            self.tensors = {}
            for name in self._offsets:
                shape, dtype = specs[name]
                self.tensors[name] = self.rows(name, shape[0] if shape else 1).view(shape)
        except OSError as e:
            self._temp.close()
            raise self._temp.error(e) from e
        except BaseException:
            self._temp.close()
            raise

    def rows(self, name: str, n: int):
        """The first `n` rows of tensor `name` (along its first dimension) as a tensor of their own
        storage, not a view of the whole one (`torch.save` writes a view's whole storage)."""
        import torch

        shape, dtype = self._specs[name]
        row = math.prod(shape[1:])
        if n * row == 0:  # (torch.frombuffer takes no empty view)
            return torch.empty((n, *shape[1:]), dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=n * row, offset=self._offsets[name]).view(
            n, *shape[1:]
        )

    def commit(self) -> None:
        """The tensors as they are now, flushed to the disk, become the file at `path`."""
        if self._map is not None:
            try:
                self._map.flush()
            except OSError as e:
                raise self._temp.error(e) from e
        self._temp.commit()

    def close(self) -> None:
        """The temp file goes, when it was not committed (the tensors stay readable while referenced)."""
        self._temp.close()


def _dtype_name(dtype) -> str:
    """torch.float32 -> "float32" (a key of `_SAFETENSORS_DTYPES`)."""
    return str(dtype).removeprefix("torch.")
