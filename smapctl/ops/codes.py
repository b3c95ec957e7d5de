"""Token files ("codes files"): what `smapctl tokenize` writes and `smapctl decode` reads.

A token file holds, for N images, the first k latent tokens of each under one tokenizer: indices (N, k)
int64 for VQ, latents (N, k, C) float32 for KL and SoftVQ, plus the labels, the images' relative paths and
the tokenizer's fingerprint, so decoding with another tokenizer is refused. It is a plain dict that
`torch.load(path, weights_only=True)` reads (`.pt`), or a safetensors file with the tensors as tensors and
every other field as JSON in the string metadata (`.safetensors`). README "Token files" describes the
fields; a file edited or made by hand is checked field by field before anything decodes it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from smapctl.data.images import IMAGE_EXTENSIONS
from smapctl.errors import UserError, describe, refused_pickle, torch_load_reason
from smapctl.io import loads_json, utf8_path

CODES_FORMAT = "smapctl-codes"
CODES_VERSION = 1
CODES_SUFFIXES = (".pt", ".pth", ".safetensors")
UNKNOWN_LABEL = -1  # only for tokenizers without class conditioning, whose decoder ignores labels

Precision = Literal["fp32", "bf16"]


@dataclass
class Codes:
    """The content of a token file."""

    tokens: torch.Tensor  # (N, k) int64 indices (VQ) or (N, k, C) float32 latents (KL, SoftVQ)
    labels: torch.Tensor  # (N,) int64 class ids
    paths: list[str]  # N relative paths, '/'-separated
    prefix: int  # k, the number of leading latent tokens kept
    num_tokens: int  # K, the tokenizer's full token count
    regularizer: str  # "vq", "kl" or "softvq"
    image_size: int
    fingerprint: str  # LoadedTokenizer.fingerprint of the tokenizer that made them
    checkpoint: str  # that tokenizer's checkpoint folder (absolute)
    weights: str  # "ema" or "model": which weights of the checkpoint
    class_names: list[str]
    # The encoder's precision, "fp32" or "bf16" (whose latents are not fp32's): a run repeating the file
    # needs it. None in a file of an earlier smapctl, which did not record it.
    precision: Precision | None = None
    version: int = CODES_VERSION

    @property
    def discrete(self) -> bool:
        return not self.tokens.is_floating_point()

    @property
    def tensor_key(self) -> str:
        return "indices" if self.discrete else "latents"

    def to_dict(self) -> dict:
        """The file's dict: tensors and plain data only (`torch.load(weights_only=True)` reads it)."""
        d = {"format": CODES_FORMAT, "version": self.version, self.tensor_key: self.tokens}
        d["labels"] = self.labels
        for name in (*_PLAIN_FIELDS, *_LATER_FIELDS):
            d[name] = getattr(self, name)
        return d


_PLAIN_FIELDS = (
    "paths",
    "prefix",
    "num_tokens",
    "regularizer",
    "image_size",
    "fingerprint",
    "checkpoint",
    "weights",
    "class_names",
)


_LATER_FIELDS = ("precision",)  # fields an earlier smapctl did not write: its files read them as None


def skipped_list_path(out: Path) -> Path:
    """Where tokenize lists the images it skipped: `codes.pt` -> `codes.pt.skipped.txt`."""
    return out.with_name(f"{out.name}.skipped.txt")


def check_codes_suffix(path: Path) -> None:
    if path.suffix.lower() not in CODES_SUFFIXES:
        raise UserError(f"{path}: a token file is named .pt or .pth (torch), or .safetensors")


def check_codes_out(out: Path, overwrite: bool) -> None:
    """Refuse an `-o` that cannot take a token file, before the images are encoded: a folder, a place a
    file blocks or that cannot be written, another kind of file, or a token file without `overwrite`."""
    from smapctl.io import file_in_the_way
    from smapctl.train.checkpoint import refuse_output_in_checkpoints

    refuse_output_in_checkpoints(out)
    if out.is_dir():
        raise UserError(f"-o {out}: a folder; give the token file's name (e.g. {out / 'codes.pt'})")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise UserError(f"{out}: could not write the token file: {blocker} is a file, not a folder")
    folder = next((p for p in out.absolute().parents if p.exists()), None)  # where it is created
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        why = f"no permission to write in {folder}"
        if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:  # (os.access: no to both)
            why = f"{folder} is on a read-only file system"
        raise UserError(f"{out}: could not write the token file: {why}")
    if out.exists():
        # Not a regular file (a named pipe, a device): reading it to tell would block, or worse.
        if not out.is_file() or not _is_codes_file(out):
            raise UserError(
                f"-o {out}: exists and is not a token file; it is not replaced: choose another -o"
            )
        if not overwrite:
            raise UserError(f"-o {out}: a token file exists there; pass --overwrite to replace it")
    listing = skipped_list_path(out)  # written (or an earlier one removed) after the token file
    if listing.exists() and not listing.is_file():
        raise UserError(
            f"-o {out}: {listing}, where it lists the images it skips, is not a file; move it or choose"
            " another -o"
        )


def _is_codes_file(path: Path) -> bool:
    """Whether `path` is a token file, without reading its tokens (an ImageNet file holds gigabytes): the
    safetensors header, or the `.pt` dict memory-mapped."""
    import warnings

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with utf8_path(path) as readable, safe_open(readable, "pt") as f:
                return (f.metadata() or {}).get("format") == json.dumps(CODES_FORMAT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with utf8_path(path) as readable:
                data = torch.load(readable, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(data, dict) and data.get("format") == CODES_FORMAT
    except Exception:  # unreadable, foreign, a pickle of objects: not a token file
        return False


def save_codes(codes: Codes, path: str | os.PathLike) -> Path:
    """Write a token file atomically (`smapctl.io`: a temp file renamed over it): `.safetensors` keeps
    the tensors as tensors and every other field JSON-encoded in the string metadata; any other suffix is
    a `torch.save`d dict. A failed write (disk full) is a UserError and leaves any earlier file intact."""
    from smapctl.io import atomic_output, atomic_path
    from smapctl.safetensors_io import write_safetensors

    path = Path(path)
    check_codes_suffix(path)
    data = codes.to_dict()
    if path.suffix.lower() == ".safetensors":
        tensors = {name: data.pop(name).contiguous() for name in (codes.tensor_key, "labels")}
        with atomic_path(path, "the token file") as tmp:
            write_safetensors(tmp, tensors, {name: json.dumps(v) for name, v in data.items()})
    else:
        with atomic_output(path, "the token file") as f:
            torch.save(data, f)
    return path


def load_codes(path: str | os.PathLike) -> Codes:
    """Read a token file (either format); anything else is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a token file' if path.is_dir() else 'no such token file'}")
    if path.suffix.lower() in IMAGE_EXTENSIONS:  # (`tokenize` names a token file .pt, .pth or .safetensors)
        raise UserError(f"{path}: an image, not a token file (`smapctl tokenize` makes one of images)")
    data = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_torch(path)
    if not isinstance(data, dict) or data.get("format") != CODES_FORMAT:
        raise UserError(f"{path}: not a smapctl token file (made by `smapctl tokenize`?)")
    version = data.get("version")
    if version != CODES_VERSION or type(version) is not int:
        newer = type(version) is int and version > CODES_VERSION
        raise UserError(
            f"{path}: token file version {version!r}; this smapctl reads {CODES_VERSION}"
            + (" (a newer smapctl wrote it: upgrade smapctl to read it)" if newer else "")
        )
    try:
        key = "indices" if "indices" in data else "latents"
        later = {n: data[n] for n in _LATER_FIELDS if n in data}
        codes = Codes(tokens=data[key], labels=data["labels"], **{n: data[n] for n in _PLAIN_FIELDS}, **later)
    except KeyError as e:
        raise UserError(f"{path}: incomplete token file (no {e.args[0]!r})") from None
    _check_field_types(path, codes)
    if codes.tokens.is_floating_point() and codes.tokens.dtype != torch.float32:
        codes.tokens = codes.tokens.float()  # latents stored in fp16/bf16/fp64 (to save space, say)
    n = len(codes.labels)
    if codes.tokens.ndim < 2 or len(codes.tokens) != n or len(codes.paths) != n:
        rows = f"{key} of shape {tuple(codes.tokens.shape)}"  # one row of tokens per image
        raise UserError(f"{path}: inconsistent token file ({rows}, {n} labels, {len(codes.paths)} paths)")
    # A file edited by hand must not decode as something else: its shapes and labels are what it says.
    if codes.tokens.shape[1] != codes.prefix or not 0 <= codes.prefix <= codes.num_tokens:
        raise UserError(
            f"{path}: inconsistent token file ({codes.tokens.shape[1]} tokens per image, prefix"
            f" {codes.prefix} of {codes.num_tokens})"
        )
    # UNKNOWN_LABEL: the images of a tokenizer without class conditioning have no class.
    if n and not UNKNOWN_LABEL <= int(codes.labels.min()) <= int(codes.labels.max()) < len(codes.class_names):
        raise UserError(
            f"{path}: inconsistent token file (labels {int(codes.labels.min())}..{int(codes.labels.max())},"
            f" {len(codes.class_names)} classes)"
        )
    return codes


def _check_field_types(path: Path, codes: Codes) -> None:
    """A file edited or made by hand: its fields must be of the kinds `tokenize` writes (a float tensor of
    labels, a path list that is one string, a path given twice each decoded to the wrong images)."""
    tokens, labels, paths = codes.tokens, codes.labels, codes.paths
    floating = _plain_tensor(tokens) and tokens.dtype in _FLOATS
    integer = _plain_tensor(tokens) and tokens.dtype in (torch.int64, torch.int32)
    key = "latents" if isinstance(tokens, torch.Tensor) and tokens.is_floating_point() else "indices"
    if not (floating or integer) or (floating and tokens.ndim != 3) or (integer and tokens.ndim != 2):
        what = _tensor_kind(tokens)
        raise UserError(
            f"{path}: inconsistent token file ({key}: {what}; expected int64 indices (N, k) or float"
            " latents (N, k, C))"
        )
    bad = first_not_finite(tokens) if floating else None
    if bad is not None:
        where = repr(paths[bad]) if isinstance(paths, list) and bad < len(paths) else f"image {bad}"
        raise UserError(
            f"{path}: inconsistent token file (the latents of {where} are not finite: nan or inf)"
        )
    if not _plain_tensor(labels) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        what = _tensor_kind(labels)
        raise UserError(f"{path}: inconsistent token file (labels: {what}; expected int64 (N,))")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "\0" not in p for p in paths):
        raise UserError(f"{path}: inconsistent token file (paths: expected a list of relative paths)")
    twice = next((p for p, n in Counter(paths).items() if n > 1), None)
    if twice is not None:
        raise UserError(f"{path}: inconsistent token file (the path {twice!r} is there twice)")
    for name in ("prefix", "num_tokens", "image_size"):
        if type(getattr(codes, name)) is not int:
            raise UserError(f"{path}: inconsistent token file ({name}: {getattr(codes, name)!r})")
    if not isinstance(codes.class_names, list) or not all(isinstance(c, str) for c in codes.class_names):
        raise UserError(f"{path}: inconsistent token file (class_names: expected a list of names)")
    for name, allowed in (
        ("regularizer", ("vq", "kl", "softvq")),
        ("weights", ("ema", "model")),
        ("precision", (None, "fp32", "bf16")),
    ):
        if getattr(codes, name) not in allowed:
            raise UserError(f"{path}: inconsistent token file ({name}: {getattr(codes, name)!r})")
    for name in ("fingerprint", "checkpoint"):  # a string, and a path for `checkpoint`
        value = getattr(codes, name)
        if not isinstance(value, str) or not value or "\0" in value:
            raise UserError(f"{path}: inconsistent token file ({name}: {value!r})")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the latents a token file may hold


def _plain_tensor(value) -> bool:
    """A dense tensor in memory: a sparse one, or one on the `meta` device (which `torch.load` keeps
    there), would give a traceback from torch when its values are checked or decoded."""
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == "cpu"


def _tensor_kind(value) -> str:
    """A token file's field as its errors name it: `torch.int64 (7, 8)`, `... sparse`, `... on meta`."""
    if not isinstance(value, torch.Tensor):
        return str(type(value))
    where = "" if value.device.type == "cpu" else f" on {value.device.type}"
    layout = "" if value.layout == torch.strided else f" {str(value.layout).removeprefix('torch.')}"
    return f"{value.dtype} {tuple(value.shape)}{layout}{where}"


def first_not_finite(tokens: torch.Tensor, rows: int = 65536) -> int | None:
    """The first image (row of `tokens` (N, k, C)) holding a value that is not finite, or None; checked
    `rows` at a time (the check's mask of ImageNet's latents whole would take 2.6 GB)."""
    for start in range(0, len(tokens), rows):
        bad = (~torch.isfinite(tokens[start : start + rows])).flatten(1).any(1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
    return None


def _read_torch(path: Path):
    """The dict of a `.pt` token file, its tensors mapped from the file rather than read (ImageNet's
    latents: 10.5 GB of page cache the kernel can drop, not of the process's memory, for `decode`), as
    safetensors maps a `.safetensors` one; a file in torch's legacy format, which cannot be mapped, read."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's note on an old pickle protocol: the error says it all
            warnings.simplefilter("ignore")
            try:
                with utf8_path(path) as readable:
                    return torch.load(readable, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated or foreign file: RuntimeError, EOFError, ...
        if refused_pickle(e):
            raise UserError(
                f"{path}: refused to load: it holds Python objects other than tensors and data"
            ) from None
        raise UserError(f"{path}: not a readable token file ({torch_load_reason(e)})") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with utf8_path(path) as readable, safe_open(readable, "pt") as f:
            data = {name: f.get_tensor(name) for name in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable token file ({describe(e, _NOT_SAFETENSORS)})") from None
    try:
        data |= {name: loads_json(value) for name, value in meta.items()}
    except ValueError:  # json.JSONDecodeError: e.g. model weights ({"format": "pt"})
        if {"fingerprint", "dataset"} <= meta.keys():
            raise UserError(
                f"{path}: a generator's token cache (train-generator's, of a whole dataset), not a token"
                " file of `smapctl tokenize`"
            ) from None
        raise UserError(
            f"{path}: a safetensors file, but not a token file of `smapctl tokenize` (model weights?)"
        ) from None
    return data


_NOT_SAFETENSORS = "not a safetensors file, or damaged"
