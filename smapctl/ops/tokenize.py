"""Images -> a token file (`smapctl tokenize`) and a token file -> images again (`smapctl decode`).

A token file ("codes file") holds, for N images, the first k latent tokens of each under one tokenizer:
indices (N, k) int64 for VQ, latents (N, k, C) float32 for KL and SoftVQ, plus the labels, the images'
relative paths and the tokenizer's fingerprint, so decoding with another tokenizer is refused. It is a
plain dict that `torch.load(path, weights_only=True)` reads (`.pt`), or a safetensors file with the tensors
as tensors and every other field as JSON in the string metadata (`.safetensors`). README "Token files"
describes the fields.

Images are prepared as in training evaluation (`eval_transform`: centre square crop, bicubic resize to
the model's resolution). They travel as uint8 and become floats one batch at a time on the device (a
quarter of the bytes through the loader and to the GPU; on the CPU, 50 instead of 107 us per 64 px
image: benchmarks/README.md). With a GPU they are read in DataLoader workers, so decoding overlaps the
encoder's compute; on the CPU they are read inline, because worker processes take cores from the
encoder's threads (measured slower on 2 cores: benchmarks/RESULTS.md, tokenize_tiny). A built-in dataset
named as the input (`digits:val`, `builtin_input`) is encoded from memory, framed as `evaluate` frames it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from smapctl.data.config import check_embedded_split, embedded_name
from smapctl.data.folder import class_ids, class_key, shown_classes
from smapctl.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    eval_frame,
    find_images,
    load_image,
    save_png,
    say_left_out,
    to_signed_float,
    to_uint8,
)
from smapctl.devices import default_device
from smapctl.errors import UserError, agreed, describe, refused_pickle, torch_load_reason
from smapctl.io import file_identity, loads_json
from smapctl.ops.token_parts import Parts, check_partial, inputs_digest, partial_folder
from smapctl.precision import warn_if_bf16_is_slow
from smapctl.progress import progress

if TYPE_CHECKING:
    from smapctl.data.datasets import EmbeddedSplit

CODES_FORMAT = "smapctl-codes"
CODES_VERSION = 1
CODES_SUFFIXES = (".pt", ".pth", ".safetensors")
DECODED_MARK = ".smapctl-decoded"  # in a folder `decode` wrote PNGs into
UNKNOWN_LABEL = -1  # only for tokenizers without class conditioning, whose decoder ignores labels

OnError = Literal["skip", "fail"]
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


@dataclass
class TokenizeResult:
    out: Path
    codes: Codes | None  # None in the other processes of a launcher (`main` False): the main one writes
    skipped: list[BadImageError] = field(default_factory=list)  # unreadable images (with on_error="skip")
    seconds: float = 0.0  # wall time of reading and encoding (not of loading the model)
    skipped_list: Path | None = None  # `skipped_list_path(out)` when images were skipped
    resumed: int = 0  # images whose tokens an interrupted run had kept (`resume`), not encoded again
    main: bool = True  # False in the other processes of a launcher: the main one writes and reports

    def skip_summary(self) -> str | None:
        """One line naming how many images were skipped, the first few and the list file; or None."""
        from smapctl.data.skipped import skip_summary

        return skip_summary(self.skipped, self.skipped_list) if self.skipped else None

    @property
    def images_per_second(self) -> float:
        """Of the images this run encoded (not those it resumed from)."""
        return (len(self.codes.labels) - self.resumed) / max(self.seconds, 1e-9)


@dataclass
class DecodeResult:
    out_dir: Path
    files: list[Path]
    prefix: int


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class ImageList:
    paths: list[str]  # as `find_images` spells them (a built-in dataset's: `relative`)
    relative: list[str]  # '/'-separated, relative to `base`
    base: Path  # the common folder of the inputs (a built-in dataset's: its name and build version)
    folders: list[str] = field(default_factory=list)  # the inputs that are folders (absolute)
    dataset: EmbeddedSplit | None = None  # the built-in dataset's split whose images these are
    spec: str = ""  # how the input named that dataset (`digits:val`)


def list_inputs(inputs: list[str | os.PathLike]) -> ImageList:
    """Files, folders (recursive) and globs -> image files with paths relative to the inputs' common
    folder (a folder input counts as itself, any other file as its parent folder), so the relative paths
    are unique and a single folder's images keep their layout, e.g. `<class>/<name>.JPEG`."""
    others = Counter()
    paths = find_images(inputs, others)
    say_left_out(", ".join(map(str, inputs)), others, logging.getLogger("smapctl"))
    # Each folder made absolute once, and the common path taken of the folders, not of every file
    # (1.28M ImageNet paths: 13 s of that listing was `commonpath` splitting each).
    absolute, made = [], {}
    for folder, name in map(os.path.split, paths):
        if folder not in made:
            made[folder] = os.path.abspath(folder)
        absolute.append(os.path.join(made[folder], name))
    expanded = [os.path.expanduser(i) for i in map(str, inputs)]
    folders = [os.path.abspath(i) for i in expanded if os.path.isdir(i)]
    try:
        base = os.path.commonpath(folders + list(set(made.values())))
    except ValueError:  # Windows: inputs on two drives (C:, D:) have no folder in common
        raise UserError(
            f"{', '.join(map(str, inputs))}: the inputs are on different drives, and a token file names its"
            " images from one folder that holds them all; tokenize the images of each drive in a run of"
            " its own (`decode` writes their token files into one folder)"
        ) from None
    cut = len(os.path.join(base, ""))  # the base and one separator ("/" already ends with it)
    relative = [p[cut:].replace(os.sep, "/") for p in absolute]
    return ImageList(paths, relative, Path(base), folders)


def builtin_input(inputs: Sequence[str | os.PathLike]) -> str | None:
    """The built-in dataset the inputs name (`digits`, `digits:train`, `digits:val`, `photos`, as `evaluate
    --data` spells them; `digits` is its held-out split), or None for files, folders and patterns. A name
    is the dataset only where no file or folder of that name is: `tokenize digits` beside a folder
    `digits/` reads the folder, as it always did. The dataset is tokenized alone (its paths, named after
    it, have no common folder with files); given with other inputs it is refused, as is an unknown split,
    before the tokenizer is loaded."""
    named = [str(i) for i in inputs if _names_builtin(str(i))]
    if not named:
        return None
    spec = named[0]
    other = next((str(i) for i in inputs if str(i) != spec), None)  # (the name given twice is once)
    if other is not None:
        raise UserError(
            f"{spec}: a built-in dataset is tokenized alone, not with {other}; tokenize each in a run of"
            " its own (`decode` writes their token files into one folder)"
        )
    check_embedded_split(spec)
    return spec


def _names_builtin(item: str) -> bool:
    """Whether `item` names a built-in dataset and no file or folder (a real path wins)."""
    return embedded_name(item) is not None and not os.path.lexists(os.path.expanduser(item))


def builtin_images(spec: str, image_size: int) -> ImageList:
    """The images of the built-in dataset `spec` at `image_size` (those `evaluate --data SPEC` reads),
    named `<dataset>/<split>/<class>/<index>.png`, the index its place in the split
    (`digits/val/3/00026.png`): `decode` writes them as a folder per class."""
    from smapctl.data.datasets import embedded_split
    from smapctl.data.embedded import VERSIONS

    data = embedded_split(spec, image_size)
    width = max(5, len(str(len(data.labels) - 1)))
    names = data.class_names
    relative = [
        f"{data.name}/{data.split}/{names[y]}/{i:0{width}d}.png" for i, y in enumerate(data.labels.tolist())
    ]
    # The base stands for the images in the resume plan's digest (with the paths: the name, split and
    # count): a dataset whose build changed (its version) is other images.
    base = Path(f"built-in {data.name} v{VERSIONS[data.name]}")
    return ImageList(relative, relative, base, dataset=data, spec=spec)


def builtin_labels(images: ImageList, tok) -> list[int]:
    """A built-in dataset's labels as the tokenizer's class ids (`builtin_class_ids`)."""
    ours = builtin_class_ids(images.spec, images.dataset.class_names, tok)
    return [ours[y] for y in images.dataset.labels.tolist()]


def builtin_class_ids(spec: str, class_names: list[str], tok) -> list[int]:
    """The tokenizer's class id of each class of the built-in dataset `spec` (`class_names`), matched by
    name; classes it does not have are refused in one line by a class-conditioned tokenizer (as a folder
    of them is), and are UNKNOWN_LABEL for one without class conditioning."""
    ids = class_ids(tok.class_names)
    ours = [ids.get(class_key(name)) for name in class_names]
    if None in ours:
        if tok.model.cfg.class_condition:
            raise UserError(
                f"{spec}: its classes ({shown_classes(class_names)}) are not the tokenizer's"
                f" ({shown_classes(tok.class_names)}); pass --label NAME_OR_ID to give all its images one"
                " class"
            )
        ours = [UNKNOWN_LABEL if y is None else y for y in ours]
    return ours


def folder_class(
    path: str | os.PathLike,
    class_names: list[str],
    inputs: Sequence[str] = (),
    ids: dict[str, int] | None = None,
) -> int | None:
    """The class of an image from its folders, as training gives it; None when there is none.

    Below an input folder (of `inputs`, the innermost one it is in): an input named after a class is a
    class folder, and gives its class to every image below it (`train/cat`); in any other input, an
    image in a sub-folder named after a class takes that class, the input being the training folder
    (`train/cat/fox/a.png` is a cat, given `train` or `train/cat`), else the nearest class folder below
    the input (`root/train/3/0.png`, given `root`). The folders above an input folder are not looked at:
    they are where the user keeps the input, not classes of its images. Otherwise (a file, a pattern) it
    is the nearest folder it is in whose name is one of `class_names`. `ids`: `class_ids(class_names)`,
    made once by a caller that asks for many images (1000 names: 0.12 ms each time)."""
    ids = class_ids(class_names) if ids is None else ids  # names compared in one Unicode form

    def class_of(name: str) -> int | None:
        return ids.get(class_key(name))

    absolute = os.path.abspath(path)
    for folder in sorted(inputs, key=len, reverse=True):
        rel = os.path.relpath(absolute, folder).split(os.sep)
        if rel[0] == os.pardir:
            continue
        if class_of(os.path.basename(folder)) is not None:
            return class_of(os.path.basename(folder))
        if len(rel) > 1 and class_of(rel[0]) is not None:
            return class_of(rel[0])
        # Else the nearest class folder below the input (`root/train/3/0.png` given `root`); not one
        # above it: `7/inp/foo/a.png` is not a 7 because of `7/`.
        return next((class_of(p) for p in reversed(rel[1:-1]) if class_of(p) is not None), None)
    for folder in Path(absolute).parents:
        if class_of(folder.name) is not None:
            return class_of(folder.name)
    return None


def resolve_labels(images: ImageList, tok, label: str | None) -> list[int]:
    """One class id per image: `label` (a name or id) for all, else from the folder names (a built-in
    dataset's: its own labels, `builtin_labels`)."""
    if label is not None:
        return [tok.class_id(label, "--label")] * len(images.paths)
    if images.dataset is not None:
        return builtin_labels(images, tok)
    labels, ids = [], class_ids(tok.class_names)
    # An image's class is its folder's (`folder_class` looks at nothing else): asked once per folder
    # (ImageNet's 1.28M images: 15 s, one `relpath` each).
    by_folder: dict[str, int] = {}
    for path in images.paths:
        folder = os.path.dirname(path)
        y = by_folder.get(folder)
        if y is None:
            y = folder_class(path, tok.class_names, images.folders, ids)
            if y is None:
                if tok.model.cfg.class_condition:
                    raise UserError(
                        unknown_class_message(path, tok.class_names, "--label NAME_OR_ID", images.folders)
                    )
                y = UNKNOWN_LABEL
            by_folder[folder] = y
        labels.append(y)
    return labels


def unknown_class_message(
    path: str | os.PathLike, class_names: list[str], option: str, inputs: Sequence[str] = ()
) -> str:
    """ "cannot tell its class", for an image `folder_class` gave none. Below an input folder whose own
    folders above are a class (`tokenize train/cat/fluffy`), it said "no folder it is in is named after
    a class", of an image in `cat/`: it says that folder is not looked at, and what to give instead."""
    absolute = os.path.abspath(path)
    ids = class_ids(class_names)
    for folder in sorted(inputs, key=len, reverse=True):
        if os.path.relpath(absolute, folder).split(os.sep)[0] == os.pardir:
            continue
        above = next((p for p in Path(folder).parents if class_key(p.name) in ids), None)
        if above is not None:
            return (
                f"{path}: cannot tell its class: no folder below the input folder {folder} is named after one"
                f" of the tokenizer's classes, and the folders above an input are not looked at ({above} is"
                f" the class {above.name}); give {above} as the input, or pass"
                f" {option.split()[0]} {above.name}"
            )
        break
    return (
        f"{path}: cannot tell its class: no folder it is in is named after one of the tokenizer's classes "
        f"({shown_classes(class_names)}); pass {option}"
    )


class _ImageTensors(Dataset):
    """`_ImageFiles` of in-memory uint8 images (N, 3, H, W): a built-in dataset's, framed as its
    evaluation frames them (`eval_frame`; at the model's size, as they are built, it leaves them be)."""

    def __init__(self, images: torch.Tensor, image_size: int):
        self.images = images
        self.transform = eval_frame(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i, ""


class _ImageFiles(Dataset):
    """Index -> (uint8 image (3, S, S), index, error reason or ""): `eval_transform` up to the float
    conversion, which the caller does per batch (`to_signed_float`, after the move to the device).
    Unreadable files come back as a reason (not an exception), so the caller decides to skip or fail;
    paths are one numpy bytes array, so forked workers do not copy a Python list of strings page by page."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.size = image_size
        self.transform = eval_frame(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_image(os.fsdecode(self.paths[i]))), i, ""
        except BadImageError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), i, e.reason


# -------------------------------------------------------------------------------------------- tokenize


def tokenize_images(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    weights: Literal["ema", "model"] = "ema",
    label: str | None = None,
    prefix: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    on_error: OnError = "fail",
    precision: Precision = "fp32",
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    ends_command: bool = False,
) -> TokenizeResult:
    """Encode images to their first `prefix` (default: all K) tokens and write a token file to `out`.

    The file is written atomically and only when the run succeeds. With `on_error="skip"` unreadable
    images are left out, kept in the result's `skipped` and listed in `skipped_list_path(out)`; with
    "fail" the first one is an error. `out` is checked before any image is read: an existing token file
    is replaced only with `overwrite`, any other existing file (model weights, say) never. The work is
    kept in `OUT.partial/` as it goes (`smapctl.ops.token_parts`): a run that stops (interrupted, an
    unreadable image, a token file that cannot be written) goes on from there with `resume`, which
    starts afresh when there is none (a run without it refuses to start beside one). Once every image is
    encoded a SIGINT or SIGTERM lets the token file be written, and the run ends as a complete one,
    saying so; with `ends_command` (`smapctl tokenize`) up to the command's end (`signals.CommandEnd`).

    Started by `accelerate launch` / `torchrun` (and `device` None), the processes share the batches:
    process p encodes batches p, p + P, ... on its own device, and the main process alone keeps the parts
    and writes the token file (the same as one process writes) and the list of skipped images; the
    others return a result without codes (`main` False).
    """
    from smapctl.io import ensure_dir, removed_if_left_empty
    from smapctl.ops.load import load_tokenizer
    from smapctl.train.signals import completed

    out = Path(out)
    if not out.is_dir():  # (a folder, whatever its name, is told as that by check_codes_out)
        _check_codes_suffix(out)
    if on_error not in ("skip", "fail"):
        raise UserError(f"--on-error: expected 'skip' or 'fail', not {on_error!r}")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision: expected 'fp32' or 'bf16', not {precision!r}")
    launch = _Launch.joined(precision) if device is None else None
    # The main process alone writes OUT, and alone checks it, telling the others what it refused: where
    # each node has its own OUT (nothing shared), a token file or partial folder on one node stopped that
    # node before the processes joined, and the others with a traceback from their broken rendezvous; one
    # on another node than the main one's refused a run that would not have written there.
    if launch is None or launch.main:
        with _told_to_the_others(launch):
            check_codes_out(out, overwrite)
            check_partial(out, resume)
    spec = builtin_input(inputs)  # a built-in dataset's images are known once the tokenizer's size is
    images = list_inputs(inputs) if spec is None else None
    device = launch.device if launch is not None else device or default_device()
    if precision == "bf16":
        warn_if_bf16_is_slow(device, "--precision bf16", "--precision fp32")
    tok = load_tokenizer(checkpoint, weights, device)
    K = tok.num_tokens
    k = K if prefix is None else prefix
    if not 0 <= k <= K:
        raise UserError(f"--prefix {k}: out of range; {tok.path} has {K} latent tokens (use 0..{K})")
    if spec is not None:
        if label is None:  # refused before the dataset is built (the photos take seconds)
            from smapctl.data.embedded import embedded_class_names

            builtin_class_ids(spec, embedded_class_names(embedded_name(spec)), tok)
        images = builtin_images(spec, tok.model.cfg.image_size)
    labels = torch.tensor(resolve_labels(images, tok, label), dtype=torch.long)
    settings = (k, weights, batch_size, workers, on_error, precision)
    if launch is not None:
        launch.listed(images, labels)
        if not launch.main:  # it encodes its share; the main process keeps the rows
            _encode_share(tok.model, images, labels, settings, launch)
            if ends_command:  # its work is done: a signal now ends it as complete, as the main process
                completed(f"every image is encoded; the main process writes the token file {out}")
            return TokenizeResult(out, None, main=False)
    plan = {
        "images": inputs_digest(images.relative, images.base, labels),
        "prefix": k,
        "fingerprint": tok.fingerprint,
        "weights": weights,
        "precision": precision,
    }
    parts = Parts(partial_folder(out), plan, images.paths if images.dataset is None else [])  # (no files)
    # The lock file goes beside the token file: its folder is made now, and removed again (with the
    # parents made for it) if the run fails leaving nothing in it.
    with _told_to_the_others(launch), removed_if_left_empty(out.parent):
        ensure_dir(out.parent, "the token file's folder")
        if not parts.claim():
            raise UserError(
                f"another tokenize is writing {out} (it holds {parts.lock}); wait for it, or use another -o"
            )
        try:
            return _tokenize(tok, images, labels, out, parts, resume, settings, ends_command, launch)
        finally:
            parts.release()


def _tokenize(tok, images, labels, out, parts, resume, settings: tuple, ends_command: bool, launch=None):
    """`tokenize_images` once its inputs are checked and `parts` claimed; `settings`: (k, weights,
    batch_size, workers, on_error, precision); `launch`: the `_Launch` of the main process of a
    launcher, or None."""
    k, weights, batch_size, workers, on_error, precision = settings
    parts.start(resume)
    cfg = tok.model.cfg
    shape = (len(images.paths), k) if cfg.discrete else (len(images.paths), k, cfg.token_dim)
    rows = _TokenRows(out, shape, torch.long if cfg.discrete else torch.float32)
    try:
        return _tokenize_into(rows, tok, images, labels, out, parts, settings, ends_command, launch)
    finally:
        rows.close()


def _tokenize_into(rows, tok, images, labels, out, parts, settings: tuple, ends_command: bool, launch=None):
    """`_tokenize` with the rows its tokens are made in (`_TokenRows`)."""
    from smapctl.data.skipped import absolute, write_skip_list
    from smapctl.train.signals import completing

    k, weights, batch_size, workers, on_error, precision = settings
    start = time.perf_counter()
    try:
        kept, bad, resumed = _encode_files(
            tok.model, images, labels, rows.tokens, batch_size, workers, precision, on_error, parts, launch
        )
    except BaseException as e:
        _say_kept(parts, out, len(images.paths), e)
        raise
    tokens = rows.head(len(kept))
    skipped = [BadImageError(images.paths[i], reason) for i, reason in bad]
    if not kept:
        parts.remove()
        raise UserError(f"none of the {len(images.paths)} images could be read (e.g. {skipped[0]})")
    seconds = time.perf_counter() - start
    codes = Codes(
        tokens=tokens,
        labels=labels[kept],
        paths=[images.relative[i] for i in kept],
        prefix=k,
        num_tokens=tok.num_tokens,
        regularizer=tok.model.cfg.regularizer.kind,
        image_size=tok.model.cfg.image_size,
        fingerprint=tok.fingerprint,
        checkpoint=str(tok.path.resolve()),
        weights=weights,
        class_names=list(tok.class_names),
        precision=precision,
    )
    # Every image is encoded: a signal now lets the token file be written (its last part would take as
    # long) and the run ends as a complete one, saying so; one after the rename kept OUT.partial/ and
    # advised --resume, exit 130, with the token file complete. The command's final print too.
    earlier = file_identity(out)
    complete = f"the token file {out} is written; tokenize is complete"
    with completing(complete if ends_command else None) as stop:
        try:
            save_codes(codes, out)
        except BaseException as e:  # a full disk, a second signal: the tokens are kept as a last part
            if isinstance(e, KeyboardInterrupt) and file_identity(out) != earlier:  # (in the rename's fsync)
                parts.remove()
                unlisted = f", without {skipped_list_path(out).name}" if skipped else ""
                logging.getLogger("smapctl").warning(
                    "interrupted: the token file %s is written%s", out, unlisted
                )
                raise
            # (not written before, when the token file can be: a run of under a minute writes no part)
            _keep(parts, tokens, kept, bad, len(images.paths))
            if isinstance(e, UserError) and parts.saved == len(images.paths):
                raise UserError(
                    f"{e}; the tokens are kept in {parts.folder}: --resume with this -o writes the file"
                ) from e
            _say_kept(parts, out, len(images.paths), e)
            raise
        parts.remove()
        listing = write_skip_list(absolute(skipped), skipped_list_path(out))  # read later, from elsewhere
    taken = launch.last_round_signal if launch is not None else None
    said = taken or stop.unsaid()  # (said once: after the last round's, not again)
    if said is not None:
        when = "during the last round" if taken else "once every image was encoded"
        logging.getLogger("smapctl").warning("%s %s: %s", said, when, complete)
    return TokenizeResult(out, codes, skipped, seconds, listing, resumed)


def _say_kept(parts: Parts, out: Path, n: int, error: BaseException) -> None:
    """A run that stopped before its token file: what it keeps for `--resume`, or nothing at all."""
    log = logging.getLogger("smapctl")
    interrupted = isinstance(error, KeyboardInterrupt)
    if parts.saved == 0:  # a resumed run's parts that could not be read: its error says so
        if parts.resumed:
            return
        parts.remove()
        if interrupted:  # Ctrl-C ended it without a word
            log.warning("interrupted: nothing written%s", f"; {out} is as it was" if out.exists() else "")
        return
    then = "the same command with --resume goes on"
    if isinstance(error, BadImageError):  # it would stop there again
        then = "once that image is mended or removed (or with --on-error skip), --resume goes on"
    done = f"{parts.saved:,} of {n:,} images done"
    log.warning(
        "%s: %s, their tokens kept in %s; %s",
        "interrupted" if interrupted else "stopped",
        done,
        parts.folder,
        then,
    )


def skipped_list_path(out: Path) -> Path:
    """Where tokenize lists the images it skipped: `codes.pt` -> `codes.pt.skipped.txt`."""
    return out.with_name(f"{out.name}.skipped.txt")


class _TokenRows:
    """Where `tokenize` makes the tokens of its images, (N, k[, C]) rows filled in input order: a scratch
    file beside the token file, filled through a shared memory map (an uncommitted `MappedSafetensors`;
    its lock and name let `remove_orphans` remove it after a kill). ImageNet's 1.28M images at 128 x 16
    latents (10.5 GB) are then page cache, which the kernel writes back to the disk and can drop, instead
    of the process's own memory (`python benchmarks/cache_memory.py --tokenize`, benchmarks/README.md),
    and are written to the token file from there.

    The disk then holds them up to three times (the scratch file, the run's parts, the token file) until
    the run ends. A disk without room for them once (nor, then, for the token file) or a folder that may
    not be written is an error at once, not after hours of encoding; a disk with room for the scratch file
    but not for the parts and the token file beside it, or a scratch file that cannot be made otherwise (a
    file system without memory maps), is said in a warning and the rows are made in memory, as before (and
    on a big-endian machine: `MappedSafetensors`)."""

    def __init__(self, out: Path, shape: tuple, dtype: torch.dtype):
        from smapctl.io import MappedSafetensors, is_disk_full, is_not_allowed

        self.file = None
        size = math.prod(shape) * dtype.itemsize
        log = logging.getLogger("smapctl")
        try:
            self.file = MappedSafetensors(out, {"tokens": (shape, dtype)}, {}, "the token file")
        except NotImplementedError:  # big-endian
            pass
        except UserError as e:
            cause = e.__cause__
            if not isinstance(cause, OSError) or is_not_allowed(cause):
                raise
            why = cause.strerror or cause
            if is_disk_full(cause):
                raise UserError(
                    f"{out}: no room on its disk for its tokens ({size / 1e9:.2f} GB; {why}): free some space"
                    f" or write elsewhere; any earlier {out.name} is unchanged"
                ) from cause
            log.warning(
                "%s: its tokens are made in memory (%.2f GB): no scratch file (%s)", out, size / 1e9, why
            )
        if self.file is not None:
            free = shutil.disk_usage(out.parent).free
            if free >= 2 * size:
                self.tokens = self.file.tensors["tokens"]
                return
            self.file.close()
            self.file = None
            log.warning(
                "%s: its tokens are made in memory (%.2f GB): the disk has no room for a scratch file of them"
                " beside the run's parts and the token file",
                out,
                size / 1e9,
            )
        self.tokens = torch.empty(shape, dtype=dtype)

    def head(self, n: int) -> torch.Tensor:
        """The first `n` rows as a tensor of their own (a view of fewer rows would be saved with the whole
        storage: `torch.save` writes a view's whole storage)."""
        if n == len(self.tokens):
            return self.tokens
        return self.tokens[:n].clone() if self.file is None else self.file.rows("tokens", n)

    def close(self) -> None:
        """The scratch file goes (the rows stay readable while referenced, as the result's tokens)."""
        if self.file is not None:
            self.file.close()


def _image_source(images: ImageList, image_size: int, device, workers: int | None):
    """(the dataset `_encode_files` reads `images` from, the loader's worker processes)."""
    if workers is None:  # measured in benchmarks/RESULTS.md (tokenize_tiny); a built-in set is in memory
        workers = 0 if device.type == "cpu" or images.dataset is not None else min(4, os.cpu_count() or 1)
    if images.dataset is not None:
        return _ImageTensors(images.dataset.images, image_size), workers
    return _ImageFiles(images.paths, image_size), workers


@torch.inference_mode()
def _encode_files(
    model,
    images: ImageList,
    labels,
    tokens,
    batch_size,
    workers,
    precision,
    on_error,
    parts: Parts,
    launch=None,
):
    """Encode `images` into the first rows of `tokens` (N, k[, C]), those of the readable images in
    input order -> (their indices, (index, reason) of the others, the number of kept images read back
    from `parts`). With on_error="fail" the first unreadable image is raised at once. The work is written
    to `parts` now and then and when it stops (any exception). `launch` (`_Launch`, in the main process of
    a launcher): the batches are spread over its processes (`_encode_rounds`)."""
    from smapctl.data.datasets import deaf_workers
    from smapctl.train.signals import stop_if_unheard

    k = tokens.shape[1]
    device = next(model.parameters()).device
    paths = images.paths
    source, workers = _image_source(images, model.cfg.image_size, device, workers)
    to_float = to_signed_float()
    kept, bad = [], []  # bad: (input index, reason)
    done = parts.load(tokens, kept, bad)
    resumed = len(kept)
    if bad and on_error == "fail":  # the interrupted run skipped them (--on-error skip): this one would not
        i, reason = bad[0]
        raise BadImageError(paths[i], f"{reason} (--on-error skip leaves such images out)")
    if launch is not None:
        launch.start(done)  # the other processes start where the parts end
        settings = (k, batch_size, workers, precision, on_error)
        _encode_rounds(model, source, paths, labels, settings, launch, done, (tokens, kept, bad, parts))
        return kept, bad, resumed
    loader = deaf_workers(  # the main process takes a signal and stops them itself
        DataLoader(
            Subset(source, range(done, len(paths))),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
    )
    try:
        with progress(len(paths), "tokenizing", "images", initial=done) as bar:
            for images, index, errors in loader:
                end = int(index[-1]) + 1
                if any(errors):
                    for i, reason in zip(index.tolist(), errors, strict=True):
                        if reason and on_error == "fail":  # the default: a token file of every image given
                            raise BadImageError(
                                paths[i], f"{reason} (--on-error skip leaves such images out)"
                            )
                        if reason:
                            bad.append((i, reason))
                    ok = torch.tensor([not e for e in errors], dtype=torch.bool)
                    images, index = images[ok], index[ok]
                if len(index):
                    y = labels[index].to(device)
                    images = to_float(images.to(device, non_blocking=True))
                    tokens[len(kept) : len(kept) + len(index)] = encode_tokens(model, images, y, k, precision)
                    kept.extend(index.tolist())
                done = end  # the parts take `kept` and `bad` below `done`: consistent wherever a signal lands
                bar.update(len(errors))
                if parts.due():
                    parts.save(tokens, kept, bad, done)
                if done < len(paths):
                    stop_if_unheard()
    except BaseException:
        _keep(parts, tokens, kept, bad, done)
        raise
    return kept, bad, resumed


class _Launch:
    """This process's place among the processes of a launcher (`accelerate launch`, `torchrun`): each
    encodes its share of the batches (`_encode_rounds`); the main one keeps the parts and writes the files."""

    def __init__(self, state):
        self.state = state  # accelerate's PartialState
        self.told = False  # the main process has told the others where to start (or its problem)
        self.inputs = None  # (count, digest) of the images this process listed and their labels (`listed`)
        self.last_round_signal = None  # a signal taken in the last round, which let the run finish

    def listed(self, images: ImageList, labels: torch.Tensor) -> None:
        """The images this process lists, and their labels: each process reads its batches from its own
        listing, and the main one keeps the tokens under its own paths (`start` checks that they agree)."""
        self.inputs = (len(images.relative), inputs_digest(images.relative, Path(), labels))

    @classmethod
    def joined(cls, precision: Precision) -> _Launch | None:
        """Joined with the other processes of a launcher, one device each, as `sample` joins them; None
        without a launcher. `precision`: the encoder's (`--precision`), which accelerate's is not."""
        from smapctl.launch import check_joined, launched_processes, launcher_precision, process_state

        if launched_processes() == 1:
            return None
        state = process_state()
        check_joined(state.num_processes, "each would encode every image into the same token file")
        asked = launcher_precision()
        if asked is not None and state.is_main_process:  # (it would be dropped without a word)
            logging.getLogger("smapctl").warning(
                "accelerate's mixed precision %s is not used: tokenize encodes in --precision %s",
                asked,
                precision,
            )
        return cls(state)

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def start(self, done: int = 0, problem: str | None = None) -> int:
        """The main process's first image to encode (`done`: those before it are in its parts) or the
        problem that stopped it before (`_told_to_the_others`), told to every process: -> that image; in
        the others the problem is raised (agreed: they all stop there). Processes that list other images
        than the main one (nodes with their own copy of a folder, one of them incomplete) all stop here:
        the main process would have kept another image's tokens under each path from there on."""
        from accelerate.utils import gather_object

        from smapctl.launch import different_images

        told = gather_object([(done, problem, self.inputs)])  # every process's, in process order
        (done, problem, _), self.told = told[0], True
        different = different_images([inputs for _, _, inputs in told], "images")
        if problem is None and different is not None:  # raised by every process, the main one too
            raise different
        if problem is not None and not self.main:  # (the main process raises its own as it goes on)
            raise agreed(UserError(problem))
        return done


@contextlib.contextmanager
def _told_to_the_others(launch: _Launch | None):
    """A UserError the main process of a launcher meets alone before the encoding starts (another run
    holds the lock, a resume is refused, no room for the tokens) is told to the other processes, which
    wait to hear where to start (`_Launch.start`): every process stops with it, and it is printed once."""
    try:
        yield
    except UserError as e:
        if launch is not None and not launch.told:
            launch.start(problem=str(e))
            agreed(e)
        raise


@torch.inference_mode()
def _encode_share(model, images: ImageList, labels, settings: tuple, launch: _Launch) -> None:
    """In a process of a launcher other than the main one: its share of the batches, from where the main
    process's parts end, sent to the main process round by round (`_encode_rounds`). `settings` as
    `_tokenize`'s."""
    k, _, batch_size, workers, on_error, precision = settings
    source, workers = _image_source(images, model.cfg.image_size, launch.device, workers)
    done = launch.start()
    _encode_rounds(
        model, source, images.paths, labels, (k, batch_size, workers, precision, on_error), launch, done
    )


def _encode_rounds(model, source, paths, labels, settings: tuple, launch: _Launch, done: int, keeps=None):
    """Under a launcher: images `done`.. in the batches one process makes of them, in rounds of one batch
    per process, process p encoding batches p, p + P, ..., as the generator's token cache is made
    (`smapctl.data.latents._encode_rounds`). After each round every process has every process's tokens
    and unreadable images, in input order: with on_error "fail" all stop alike at the first unreadable
    one, and the main process (`keeps`: `_encode_files`'s tokens, kept, bad and parts) keeps them as one
    process would (its parts too, now and then and when the run stops). `settings`: (k, batch_size,
    workers, precision, on_error)."""
    from accelerate.utils import gather_object

    from smapctl.data.datasets import deaf_workers, shutdown_iterators
    from smapctl.data.latents import _gathered
    from smapctl.launch import RoundStops

    k, batch_size, workers, precision, on_error = settings
    tokens, kept, bad, parts = keeps or (None, None, None, None)
    device, world, cfg = launch.device, launch.world, model.cfg
    batches = [range(i, min(i + batch_size, len(paths))) for i in range(done, len(paths), batch_size)]
    loader = iter(
        deaf_workers(
            DataLoader(
                source,
                batch_sampler=batches[launch.rank :: world],
                num_workers=workers,
                pin_memory=device.type == "cuda",
            )
        )
    )
    # What a process sends of a batch without a readable image, or in a last round without a batch.
    shape = (0, k) if cfg.discrete else (0, k, cfg.token_dim)
    none = torch.zeros(shape, dtype=torch.long if cfg.discrete else torch.float32, device=device)
    try:
        with (
            progress(len(paths), "tokenizing", "images", initial=done, enabled=launch.main) as bar,
            RoundStops(world, device) as rounds,  # a signal stops every process after the same round
        ):
            for first in range(0, len(batches), world):
                t, index, unread = _encode_batch(model, next(loader, None), labels, none, precision)
                unreadable = gather_object([unread])  # each process's, in process order
                gathered = _gathered(t, index, batch_size, world)
                # (strict=False: a last round has fewer batches than processes, which send none)
                for b, (t_p, index_p), unread_p in zip(
                    batches[first : first + world], gathered, unreadable, strict=False
                ):
                    if unread_p and on_error == "fail":  # every process raises it, the main one prints it
                        # (made by a function: an error held in a local here made a cycle through its
                        # traceback, which kept the model and the tokens until Python's next collection)
                        raise _stopped_everywhere_at(paths, *unread_p[0])
                    if tokens is not None:
                        tokens[len(kept) : len(kept) + len(index_p)] = t_p.cpu()
                        kept.extend(index_p.tolist())
                        bad.extend(unread_p)
                    done = b.stop  # the parts take `kept` and `bad` below `done`
                    bar.update(len(b))
                if parts is not None and parts.due():
                    parts.save(tokens, kept, bad, done)
                rounds.round_done(last=first + world >= len(batches))
        launch.last_round_signal = rounds.signal_name
    except BaseException:
        if parts is not None:
            _keep(parts, tokens, kept, bad, done)
        raise
    finally:  # its worker processes end now, not with the traceback that holds it
        shutdown_iterators([loader])


def _stopped_everywhere_at(paths, i: int, reason: str) -> BadImageError:
    """The error every process of a launch raises at the first unreadable image (on_error fail), input
    `i`: the main process prints it."""
    error = BadImageError(paths[i], f"{reason} (--on-error skip leaves such images out)")
    error.same_in_every_process = True
    return agreed(error)


def _encode_batch(model, batch, labels, none: torch.Tensor, precision: Precision):
    """A batch of `_ImageFiles` or `_ImageTensors` (None: a process without one in the last round) ->
    (tokens (B, k[, C]) of its readable images, their indices (B,), both on the device of `none` (its
    tokens' kind, with 0 rows), and the (index, reason) of its unreadable images)."""
    if batch is None:
        return none, none.new_zeros(0, dtype=torch.long), []
    images, index, errors = batch
    unread = [(i, reason) for i, reason in zip(index.tolist(), errors, strict=True) if reason]
    ok = torch.tensor([not e for e in errors], dtype=torch.bool)
    images, index = images[ok], index[ok]
    device, t = none.device, none
    if len(index):  # (the tokens stay on the device, where NCCL gathers them)
        images = to_signed_float()(images.to(device, non_blocking=True))
        t = _encoded(model, images, labels[index].to(device), none.shape[1], precision)
    return t, index.to(device), unread


def _keep(parts: Parts, tokens, kept, bad, done) -> None:
    """The work of a run that stops, written as a last part (a failure to write it is said, not raised:
    the reason the run stopped is the error to show; not tried again when a part just failed)."""
    if parts.failed:
        return
    try:
        parts.save(tokens, kept, bad, done)
    except Exception as e:  # noqa: BLE001
        logging.getLogger("smapctl").warning("the tokens could not be kept for --resume either: %s", e)


def encode_tokens(model, images: torch.Tensor, labels: torch.Tensor, k: int, precision: Precision = "fp32"):
    """images (B, 3, H, W) in [-1, 1], labels (B,) -> indices (B, k) int64 for VQ, else latents (B, k, C)
    float32. The encoder runs in eval mode (KL: the posterior mean)."""
    return _encoded(model, images, labels, k, precision).cpu()


def _encoded(model, images: torch.Tensor, labels: torch.Tensor, k: int, precision: Precision) -> torch.Tensor:
    """`encode_tokens`'s tokens on the images' device (a launch gathers them there)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model.encode(images, labels)
    return out.indices[:, :k] if out.indices is not None else out.z[:, :k].float()


def decode_tokens(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """indices (B, k) or latents (B, k, C), labels (B,) -> images (B, 3, H, W) in [-1, 1] (unclamped)."""
    if tokens.is_floating_point():
        return model.decode(tokens, labels)
    return model.decode_indices(tokens, labels)


# ---------------------------------------------------------------------------------------- token files


def _check_codes_suffix(path: Path) -> None:
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

            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("format") == json.dumps(CODES_FORMAT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(data, dict) and data.get("format") == CODES_FORMAT
    except Exception:  # unreadable, foreign, a pickle of objects: not a token file
        return False


def save_codes(codes: Codes, path: str | os.PathLike) -> Path:
    """Write a token file atomically (`smapctl.io`: a temp file renamed over it): `.safetensors` keeps
    the tensors as tensors and every other field JSON-encoded in the string metadata; any other suffix is
    a `torch.save`d dict. A failed write (disk full) is a UserError and leaves any earlier file intact."""
    from smapctl.io import atomic_output, atomic_path, write_safetensors

    path = Path(path)
    _check_codes_suffix(path)
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
    if data.get("version") != CODES_VERSION or type(data.get("version")) is not int:
        raise UserError(
            f"{path}: token file version {data.get('version')!r}; this smapctl reads {CODES_VERSION}"
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


def _exists(path: str) -> bool:
    """`Path.exists`, false for a path the system cannot even look up (a name over its length limit)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


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
    bad = _first_not_finite(tokens) if floating else None
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
    there), gave a traceback from torch when its values were checked or decoded."""
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == "cpu"


def _tensor_kind(value) -> str:
    """A token file's field as its errors name it: `torch.int64 (7, 8)`, `... sparse`, `... on meta`."""
    if not isinstance(value, torch.Tensor):
        return str(type(value))
    where = "" if value.device.type == "cpu" else f" on {value.device.type}"
    layout = "" if value.layout == torch.strided else f" {str(value.layout).removeprefix('torch.')}"
    return f"{value.dtype} {tuple(value.shape)}{layout}{where}"


def _first_not_finite(tokens: torch.Tensor, rows: int = 65536) -> int | None:
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
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
        with safe_open(str(path), "pt") as f:
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


# ---------------------------------------------------------------------------------------------- decode


def output_names(paths: list[str]) -> list[str]:
    """Relative image paths -> distinct relative PNG names: the suffix becomes .png (`3/a.jpg` ->
    `3/a.png`); when two would clash (`a.jpg`, `a.png`), those keep their suffix (`a.jpg.png`). Paths that
    would leave the output folder are refused."""
    spelled = paths
    paths, names = [], []
    for p in spelled:
        path, name = _png_name(p)
        paths.append(path)
        names.append(name)
    if len(set(paths)) < len(paths):
        first: dict[str, int] = {}
        for i, p in enumerate(paths):
            j = first.setdefault(p, i)
            if j != i:  # one image would overwrite the other
                raise UserError(f"token file paths {spelled[j]!r} and {spelled[i]!r}: the same file, twice")
    if len(set(names)) == len(names):
        return names
    count = Counter(names)
    names = [
        p + ".png" if count[n] > 1 and not p.endswith(".png") else n
        for p, n in zip(paths, names, strict=True)
    ]
    # That can still clash (`a.jpg` and a file named `a.jpg.png`): every name still shared becomes its
    # path + ".png", which is unique as the paths are; repeat while that meets another file's name.
    spelled_out: set[int] = set()
    while True:
        count = Counter(names)
        clashing = [i for i, n in enumerate(names) if count[n] > 1 and i not in spelled_out]
        if not clashing:
            return names
        for i in clashing:
            names[i] = paths[i] + ".png"
            spelled_out.add(i)


def _png_name(spelled: str) -> tuple[str, str]:
    """A token file's relative image path -> (the path as pathlib spells it, `a/./b` and `a//b` being
    `a/b`; its name with the suffix `.png`). Plain paths (no empty, `.` or `..` part; a suffix that is
    neither the whole name nor a trailing dot) are cut as strings: pathlib took 36 s for ImageNet's 1.28M
    paths before a decode started; the rest go through pathlib, which refuses paths leaving the folder."""
    name = spelled.rpartition("/")[2]
    dot = name.rfind(".")
    plain = os.name == "posix" and not (  # (on Windows pathlib also splits at `\\` and knows drives)
        "//" in spelled
        or "/./" in spelled
        or "/../" in spelled
        or spelled.startswith(("/", "./", "../"))
        or spelled.endswith(("/.", "/.."))
    )
    if plain and 0 < dot < len(name) - 1:  # (a name with a dot inside is not `.` or `..`, nor empty)
        return spelled, spelled[: len(spelled) - len(name) + dot] + ".png"
    path = Path(spelled)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UserError(f"token file path {spelled!r}: not a relative path inside the output folder")
    return path.as_posix(), path.with_suffix(".png").as_posix()


@torch.inference_mode()
def decode_codes(
    codes_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    prefix: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
    ends_command: bool = False,
) -> DecodeResult:
    """Decode a token file to one PNG per image under `out_dir` (names mirror the stored relative paths),
    from the stored prefix or a shorter one. `checkpoint` defaults to the one stored in the file; a
    tokenizer with another fingerprint is refused. A file already at one of those names (an earlier
    decode, or the very images tokenized: `-o` their folder) is replaced only with `overwrite`. A decode
    stopped before its last PNG is in place takes its PNGs away again; once it is, the decode is complete
    (with `ends_command`, `smapctl decode`, up to the command's end: `signals.CommandEnd`)."""
    from smapctl.io import writing_into
    from smapctl.train.signals import completed, stop_if_unheard

    codes_path, out_dir = Path(codes_path), Path(out_dir)
    codes = load_codes(codes_path)
    k = _decode_prefix(codes, prefix, codes_path)
    names = output_names(codes.paths)
    parents = _folders_of(names)
    folders = _missing_folders(out_dir, parents)  # created by this decode
    # The folder is held from before it is looked into (two decodes at once each found their names free,
    # and left a mix of both: shards are decoded into one folder one after another), made now and removed
    # again if nothing was written into it.
    _refuse_decode_folder(out_dir, names, parents)
    _refuse_long_names(codes_path, out_dir, names)
    with writing_into(out_dir):
        new = _new_names(out_dir, names, parents)
        _check_decode_folder(out_dir, names, overwrite, parents, new)
        if overwrite:
            _refuse_names_of_one_file(codes_path, out_dir, names, new)
        device = device or default_device()
        tok = _tokenizer_of(codes_path, codes, checkpoint, device)
        files: list[Path] = []  # attempted, in order; `done` of them written
        seen = _FoldersSeen(codes_path, out_dir)
        done, earlier = 0, None
        mark = out_dir / DECODED_MARK
        marked = not os.path.lexists(mark)  # (a dangling link there: write_text made the file it names)
        complete = f"the {len(names)} PNGs are in {out_dir}; the decode is complete"
        try:
            if marked:  # later decodes (other shards of a dataset) may add theirs
                mark.write_text("PNGs written by `smapctl decode`; other decodes may add theirs here.\n")
            with progress(len(names), "decoding", "images") as bar:
                for start in range(0, len(names), batch_size):
                    rows = slice(start, start + batch_size)
                    images = _decoded(tok, codes, rows, k, device, codes_path)
                    for image, name in zip(images, names[rows], strict=True):
                        # Listed before it is written: a Ctrl-C inside save_png, after its rename, left it
                        # behind.
                        files.append(out_dir / name)
                        # (the file an --overwrite replaces)
                        earlier = None if new[len(files) - 1] else file_identity(files[-1])
                        if new[len(files) - 1] and os.path.lexists(files[-1]):
                            _refuse_one_file(codes_path, out_dir, names, files)
                        seen.check(name, files[-1])  # (its folder, when it is there already)
                        save_png(image, files[-1], sync_folder=False)  # (`_sync_folders`, below)
                        done += 1
                        seen.check(name, files[-1])  # (a folder save_png made)
                    bar.update(len(images))
                    if done < len(names):
                        stop_if_unheard()  # (then the PNGs it wrote are taken away, as for one heard)
            _sync_folders(files)
            # Every PNG is in place: up to the command's end (a signal as the folder was let go, or at the
            # final print, exited 130 with the decode complete).
            if ends_command:
                completed(complete)
        except BaseException:  # a full disk, Ctrl-C: the PNGs this decode added are taken away again
            interrupted = sys.exc_info()[0] is KeyboardInterrupt
            if interrupted and _all_written(files, names, new, earlier):
                # ... but once the last one is renamed into place (a signal in its folder's fsync, or as the
                # bar closed) the decode is complete: it took every PNG away and exited 130.
                logging.getLogger("smapctl").warning("interrupted once every PNG was written: %s", complete)
                _sync_folders(files)
                if ends_command:
                    completed(complete)
                return DecodeResult(out_dir, files, k)
            _undo_decode(
                out_dir, files, new, done, earlier, [mark] if marked else [], folders, k, interrupted
            )
            raise
        return DecodeResult(out_dir, files, k)


def _sync_folders(files: list[Path]) -> None:
    """fsync each folder the decode wrote PNGs into, once, after the last: `save_png` left it to this, as
    a decode stopped before its end takes its PNGs away (on a busy disk each folder fsync took as long as
    the PNG's own, and 30,000 PNGs made 30,000 of them)."""
    from smapctl.io import fsync_dir, write_error

    for folder in dict.fromkeys(f.parent for f in files):
        try:
            fsync_dir(folder)
        except OSError as e:
            raise write_error(folder, e, "the decoded PNGs", kept="") from e


def _all_written(files: list[Path], names: list[str], new: list[bool], earlier) -> bool:
    """Every PNG of a decode in place, the last one too (`earlier`: the identity of the file it replaces
    with --overwrite; a new one is there once renamed into place)."""
    if len(files) < len(names) or not files:
        return False
    return files[-1].is_file() if new[-1] else file_identity(files[-1]) != earlier


def _decode_prefix(codes, prefix: int | None, codes_path: Path) -> int:
    """The number of tokens to decode from: `prefix`, at most the file's (default: the file's)."""
    k = codes.prefix if prefix is None else prefix
    if not 0 <= k <= codes.prefix:
        raise UserError(f"--prefix {k}: out of range; {codes_path} holds {codes.prefix} tokens per image")
    return k


def _missing_folders(out_dir: Path, parents) -> list[Path]:
    """`out_dir` and the folders inside it the PNGs go to, those that do not exist yet."""
    made = {out_dir} | {out_dir / f for f in parents}
    return [p for p in made if not p.exists()]


def _decoded(tok, codes, rows: slice, k: int, device, codes_path: Path) -> torch.Tensor:
    """The images of `rows` of the token file from their first `k` tokens: uint8 (B, 3, H, W) on the CPU."""
    tokens = codes.tokens[rows, :k].to(device)
    decoded = decode_tokens(tok.model, tokens, codes.labels[rows].to(device))
    _check_finite(decoded, codes_path, codes.paths[rows])
    return to_uint8(decoded).cpu()


def _undo_decode(out_dir, files, new, done, earlier, mark, folders, k, interrupted: bool) -> None:
    """A decode that stopped: the PNGs (and `mark`, made by it) it added are removed with the folders it
    made, and what it did to the folder is said (`files` attempted in order, `done` of them written;
    `earlier`: the identity of the file the next one replaces with --overwrite)."""
    added = [f for f, fresh in zip(files, new, strict=False) if fresh]
    removed = sum(os.path.isfile(f) for f in added)  # (False for a path the system refuses)
    _remove_new(added + mark, folders)
    replaced = sum(not fresh for fresh in new[:done])  # (a failed write keeps the earlier file) ...
    if len(files) > done and not new[done] and file_identity(files[done]) != earlier:
        replaced += 1  # ... but one stopped after its rename replaced it
    _say_undone(out_dir, removed, replaced, k, interrupted=interrupted)


def _check_finite(decoded: torch.Tensor, codes_path: Path, paths: list[str]) -> None:
    """Decoded images (B, 3, H, W) with a value that is not finite (latents edited to 1e30 overflow the
    decoder) were written as black PNGs: a one-line error naming the first such image instead."""
    bad = _first_not_finite(decoded)
    if bad is not None:
        name = paths[bad]
        raise UserError(
            f"{codes_path}: the tokens of {name!r} decode to values that are not finite (edited by hand?)"
        )


def _tokenizer_of(codes_path: Path, codes, checkpoint, device):
    """The tokenizer that made `codes` (`checkpoint`, else the one the file names), loaded on `device`
    once the file is known to be its: same fingerprint, labels and token shapes it takes."""
    from smapctl.ops.load import load_tokenizer
    from smapctl.train import checkpoint as ckpt

    if checkpoint is None and not _exists(codes.checkpoint):
        raise UserError(
            f"{codes_path}: made by the tokenizer {codes.checkpoint}, which is not there (moved, or removed"
            " by its run's train.keep_checkpoints); pass that checkpoint's new place as --checkpoint, or"
            " tokenize the images again (another checkpoint is another tokenizer)"
        )
    if checkpoint is not None:  # a run folder: its checkpoint of the recorded name (as sample's --tokenizer)
        checkpoint = ckpt.same_step(Path(checkpoint).expanduser(), Path(codes.checkpoint))
    made_with = f"; {codes_path} was made with the {codes.weights} weights: name the checkpoint folder"
    tok = load_tokenizer(checkpoint or codes.checkpoint, codes.weights, device, weights_hint=made_with)
    if tok.fingerprint != codes.fingerprint:
        raise UserError(
            f"{codes_path}: made by another tokenizer ({codes.checkpoint}, fingerprint {codes.fingerprint}) "
            f"than {tok.path} ({codes.weights} weights, fingerprint {tok.fingerprint})"
        )
    if tok.model.cfg.class_condition and len(codes.labels) and int(codes.labels.min()) < 0:
        raise UserError(
            f"{codes_path}: inconsistent token file (images without a class, label {UNKNOWN_LABEL}, for a"
            f" class-conditioned tokenizer)"
        )
    _check_tokens_fit(codes_path, codes, tok)
    return tok


def _say_undone(out_dir: Path, removed: int, replaced: int, k: int, interrupted: bool) -> None:
    """What a decode that stopped half-way left: its new PNGs are gone; those it wrote over cannot be
    taken back."""
    logger = logging.getLogger("smapctl")
    if interrupted and not replaced:  # Ctrl-C ended it without a word
        logger.warning("interrupted: the %d PNGs this decode had written were taken away again", removed)
    if replaced:
        logger.warning(
            "%s: %d of its earlier PNGs were replaced by this decode (at %d tokens) before it stopped: the "
            "folder mixes two decodes; run again with --overwrite",
            out_dir, replaced, k,
        )  # fmt: skip


def _refuse_decode_folder(out_dir: Path, names: list[str], parents: set[str]) -> None:
    """Before the folder is made: the PNGs can all be written into `out_dir` (not inside a run's
    checkpoints, no file where a folder goes)."""
    from smapctl.io import file_in_the_way
    from smapctl.train.checkpoint import refuse_output_in_checkpoints

    refuse_output_in_checkpoints(out_dir)
    clash = next((n for n in names if n in parents), None)
    if clash is not None:
        raise UserError(f"token file paths: {clash!r} would be both an image and a folder of images")
    missing: set[Path] = set()  # folders not there yet: nothing under them is either, nor in the way
    for folder in sorted({out_dir} | {out_dir / f for f in parents}):  # (every folder, parents first)
        if folder.parent in missing:  # (walking each folder up instead took 50 s for one 2,000 deep)
            missing.add(folder)
            continue
        blocker = file_in_the_way(folder)
        if blocker is not None:
            raise UserError(f"{out_dir}: cannot write {folder}: {blocker} is a file, not a folder")
        if not folder.is_dir():
            missing.add(folder)


def _refuse_long_names(codes_path: Path, out_dir: Path, names: list[str]) -> None:
    """Before the folder is made: every PNG's path and each name in it, with the temp file's it is written
    to first, fit the file system's limits. A token file naming an image over them failed once the PNGs
    before it were written (an hour of ImageNet's), and so did the clean-up that takes them away."""
    from smapctl.io import TEMP_NAME_EXTRA

    root = os.fsencode(os.fspath(out_dir) + "/")
    name_max, path_max = _limit(out_dir, "PC_NAME_MAX", 255), _limit(out_dir, "PC_PATH_MAX", 4096)
    for name in names:
        most = len(name) * 4 + TEMP_NAME_EXTRA  # (UTF-8: 4 bytes a character at most; most names stop here)
        if most <= name_max and len(root) + most < path_max:
            continue
        *folders, file = (len(os.fsencode(part)) for part in name.split("/"))
        longest = max([*folders, file + TEMP_NAME_EXTRA])
        size = len(root) + len(os.fsencode(name)) + TEMP_NAME_EXTRA
        if longest > name_max or size >= path_max:  # (PATH_MAX counts the closing NUL)
            shown = f"{name[:50]}...{name[-20:]}" if len(name) > 80 else name
            what = f"a name of {longest} bytes" if longest > name_max else f"a path of {size} bytes"
            limit = name_max if longest > name_max else path_max - 1
            raise UserError(
                f"{codes_path}: the image {shown!r} would be written in {out_dir} as {what} (with its temp"
                f" file's), over the system's limit of {limit}"
            )


def _limit(folder: Path, name: str, default: int) -> int:
    """The file system's limit `name` (os.pathconf) for `folder`, or for its nearest existing parent;
    `default` where the system does not say."""
    for p in (folder, *folder.parents):
        try:
            return os.pathconf(p, name)
        except (OSError, ValueError, AttributeError):  # missing; no such setting (Windows: no pathconf)
            continue
    return default


def _check_decode_folder(
    out_dir: Path, names: list[str], overwrite: bool, parents: set[str], new: list[bool]
) -> None:
    """Before the tokenizer is loaded, the folder held: `out_dir` holds no image the PNGs would be mixed
    with (a dataset folder of JPEGs got the reconstructions added beside them), and none of their names
    unless `overwrite` (`new`: whether each is free, `_new_names`)."""
    from smapctl.data.images import first_other_image

    writing = set(names)
    if not (out_dir / DECODED_MARK).exists():  # not a folder decode wrote into
        other = first_other_image(out_dir, lambda folder, name: (folder / name).as_posix() in writing)
        if other is not None:
            raise UserError(
                f"{out_dir}: holds images that `smapctl decode` did not write ({other.relative_to(out_dir)});"
                " the decoded images would be mixed with them: choose another -o"
            )
    there = next((n for n, fresh in zip(names, new, strict=True) if not fresh), None)
    if there is not None and not overwrite:
        raise UserError(
            f"{out_dir}: {there} (one of the {len(names)} PNGs to write) exists already (an earlier decode,"
            " or the very images that were tokenized); pass --overwrite to replace them, or choose another -o"
        )


def _one_file(a: str, b: str, codes_path: Path, out_dir: Path) -> UserError:
    return UserError(
        f"{codes_path}: its images {a!r} and {b!r} are one file in {out_dir} (names that differ only in"
        " case or Unicode form, on a file system that does not tell such names apart, or a folder there"
        " linked to another): the second PNG would replace the first; choose another -o"
    )


def _refuse_one_file(codes_path: Path, out_dir: Path, names: list[str], files: list[Path]) -> None:
    """The PNG `files[-1]`, free as the decode started, is there now: the file system took its name for
    one this decode wrote (`Cat/a.png` for `cat/a.png` on macOS or Windows, `café` composed for `café`
    decomposed on macOS; `y/a.png` for `x/a.png` through a link `y -> x`), where the second PNG replaced
    the first in silence: N PNGs said written, fewer there. Raised before it is written (the decode's
    clean-up then takes its PNGs away again); the other name is looked for only then."""
    other = next((i for i, f in enumerate(files[:-1]) if _same_file(f, files[-1])), None)
    first = names[other] if other is not None else "an earlier one"
    raise _one_file(first, names[len(files) - 1], codes_path, out_dir)


def _refuse_names_of_one_file(codes_path: Path, out_dir: Path, names: list[str], new: list[bool]) -> None:
    """--overwrite: two of the PNG names that are one file there already (as `_refuse_one_file` says; an
    earlier decode left it) are refused before the tokenizer is loaded. The file's identity of each name
    there, kept in numpy arrays (16 bytes a name, not a Python set of ImageNet's 1.28M)."""
    import numpy as np

    there = np.flatnonzero(~np.asarray(new, dtype=bool))
    ids = np.zeros((len(there), 2), dtype=np.uint64)
    for row, i in enumerate(there):
        try:
            st = os.lstat(os.path.join(out_dir, names[i]))
        except OSError:  # gone meanwhile: written as a new file
            continue
        ids[row] = st.st_dev, st.st_ino
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    same = np.flatnonzero((ids[order[1:]] == ids[order[:-1]]).all(axis=1) & (ids[order[1:]] != 0).any(axis=1))
    if len(same):
        a, b = sorted((int(there[order[same[0]]]), int(there[order[same[0] + 1]])))
        raise _one_file(names[a], names[b], codes_path, out_dir)


class _FoldersSeen:
    """The folders a decode writes PNGs into, each known by its identity on the file system: two of its
    folders that are one there (`Cat` and `cat` on macOS or Windows, `y` linked to `x`) put two classes'
    PNGs into one folder in silence, the class of each lost. Refused at the first PNG of the second (a
    folder there already is looked at before it is written into, one save_png makes after)."""

    def __init__(self, codes_path: Path, out_dir: Path):
        self.codes_path, self.out_dir = codes_path, out_dir
        self.named: dict[str, tuple[int, int]] = {}  # relative folder -> (device, inode)
        self.by_id: dict[tuple[int, int], str] = {}

    def check(self, name: str, path: Path) -> None:
        folder = name.rpartition("/")[0]
        if folder in self.named:
            return
        try:
            st = os.stat(path.parent)
        except OSError:  # not made yet
            return
        key = self.named[folder] = (st.st_dev, st.st_ino)
        other = self.by_id.setdefault(key, folder)
        if other != folder:
            raise UserError(
                f"{self.codes_path}: its folders {other or '.'!r} and {folder or '.'!r} are one folder in"
                f" {self.out_dir} (names that differ only in case or Unicode form, on a file system that does"
                " not tell such names apart, or a folder there linked to another): their images would be"
                " mixed in it; choose another -o"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _new_names(out_dir: Path, names: list[str], parents: set[str]) -> list[bool]:
    """For each relative PNG name, whether no file is at it in `out_dir`: looked up only in folders that
    exist, as strings (a Path per name took 10 s for ImageNet's 1.28M names before a decode started)."""
    root = os.fspath(out_dir)
    existing = {f for f in parents if os.path.isdir(os.path.join(root, f))}
    existing |= {""} if os.path.isdir(root) else set()
    return [n.rpartition("/")[0] not in existing or not os.path.lexists(f"{root}/{n}") for n in names]


def _folders_of(names: list[str]) -> set[str]:
    """Every folder (`a`, `a/b`, ...) the relative PNG names (`/`-separated, `output_names`) lie in."""
    folders: set[str] = set()
    for name in names:
        folder = name.rpartition("/")[0]
        while folder and folder not in folders:  # its parents are in already when it is
            folders.add(folder)
            folder = folder.rpartition("/")[0]
    return folders


def _check_tokens_fit(codes_path: Path, codes: Codes, tok) -> None:
    """The tokens are ones `tok` can decode (a file edited by hand failed in the model with a traceback)."""
    cfg = tok.model.cfg
    if codes.num_tokens != cfg.num_latent_tokens or codes.discrete != cfg.discrete:
        raise UserError(
            f"{codes_path}: inconsistent token file ({codes.num_tokens} {codes.tensor_key} per image; the"
            f" tokenizer has {cfg.num_latent_tokens} {'indices' if cfg.discrete else 'latents'})"
        )
    if codes.discrete and codes.tokens.numel():  # none with --prefix 0
        size = cfg.regularizer.codebook_size
        low, high = int(codes.tokens.min()), int(codes.tokens.max())
        if low < 0 or high >= size:
            raise UserError(
                f"{codes_path}: inconsistent token file (indices {low}..{high}, codebook of {size})"
            )
    if not codes.discrete and codes.tokens.shape[-1] != cfg.token_dim:
        raise UserError(
            f"{codes_path}: inconsistent token file (latents of {codes.tokens.shape[-1]} channels; the"
            f" tokenizer's have {cfg.token_dim})"
        )


def _remove_new(files: list[Path], folders: list[Path]) -> None:
    """Remove `files` (those a failed decode added) and then the `folders` made for them, deepest first
    (one that holds anything else is kept)."""
    import contextlib

    for file in files:
        with contextlib.suppress(OSError):
            file.unlink()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
