"""Image sets `evaluate` scores: an embedded dataset's split, an ADM `.npz` (images and labels, or a
dataset's Inception statistics alone) or a folder (`smapctl sample`'s images, labelled by their file
names, or any images, labelled by their class sub-folders), read into one uint8 tensor (N, 3, H, W) at
the model's size; a folder too large for memory is handed on as a Dataset read image by image
(`FolderImages`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from smapctl.data.config import EMBEDDED_DATASETS, embedded_name
from smapctl.data.folder import class_ids, class_key
from smapctl.data.images import (
    BadImageError,
    eval_transform,
    load_image_tensor,
    say_left_out,
    scan_folder,
    to_uint8,
)
from smapctl.data.skipped import SKIPPED_FILE
from smapctl.errors import UserError
from smapctl.eval.fidelity import FidStatistics, read_fid_statistics
from smapctl.eval.npz import npz_arrays, read_npz
from smapctl.eval.report import METRICS_FILE
from smapctl.ops.sample import GRID_FILE, NPZ_FILE, SAMPLE_NAME, SETTINGS_FILE, safe_name
from smapctl.progress import tracked
from smapctl.runtime import images_fit_in_memory

logger = logging.getLogger("smapctl.eval")

OnError = Literal["skip", "fail"]
LIMIT_SEED = 0  # --limit picks the same images every time


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor | None  # (N,) class ids, when known
    source: str | None  # None: no images to name (`_references`, when --data's cannot be held)
    skipped: list[BadImageError] = field(default_factory=list)  # unreadable files left out
    # label -> the class name `smapctl sample` file names give it (a folder of its images), to check
    # that the classifier scoring them calls those labels so too
    named_classes: dict[int, str] = field(default_factory=dict)
    named_by: str = "its file names"  # where `named_classes` come from, as a message says it
    fid_stats: FidStatistics | None = None  # an ADM reference batch's own mu and sigma, when it has them
    # The number of images `fid_stats` were computed from as a folder too large to hold was read (no
    # `images` then: `_streamed_statistics`); None for an .npz's own statistics
    fid_count: int | None = None
    # A folder in the ImageNet layout (root/<class>/...): its class sub-folder names and each image's
    # index into them; they become `labels` once the classifier's classes are known (`labelled_by_folder`)
    folder_classes: tuple[list[str], torch.Tensor] | None = None


class NotHeld(UserError):
    """Images `evaluate` cannot hold as asked: a folder too large for memory, or a built-in dataset for
    samples that are not square (it is read at one square size)."""


def limit_indices(n: int, limit: int | None) -> list[int] | None:
    """--limit: a fixed random subset of `limit` of n items (seed 0) in their original order; None: all."""
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(LIMIT_SEED)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def check_sample_classes(samples: ImageSet, class_names: list[str], shown: str) -> None:
    """Samples of another dataset's classes (digits scored with --data photos) would be scored as the
    classifier's classes of those labels, without a word; a label past its classes (an .npz's `arr_1`)
    is said here, before the classifier is trained, not after (minutes on a CPU)."""
    # The names first: digit samples (0..9) scored with photos' 9 classes would otherwise be told "label 9
    # but photos has 9 classes", not that photos calls class 0 'astronaut', which says what is wrong.
    for label, named in sorted(samples.named_classes.items()):
        if label < len(class_names) and safe_name(class_names[label]) != named:
            raise UserError(
                f"{samples.source}: {samples.named_by} call class {label} {named!r}, {shown} calls it"
                f" {class_names[label]!r}: score the samples with the dataset their generator was trained"
                " on (--data)"
            )
    check_labels_in_range(samples, len(class_names), shown)


def check_labels_in_range(samples: ImageSet, num_classes: int, shown: str) -> None:
    """The samples' labels must be classes of the classifier `shown` (`num_classes` of them)."""
    if samples.labels is not None and len(samples.labels) and int(samples.labels.max()) >= num_classes:
        raise UserError(
            f"{samples.source}: label {int(samples.labels.max())} but {shown} has {num_classes} classes"
        )


def source_name(spec: str | os.PathLike) -> str:
    """How a report names an image set: an embedded dataset with its split (a name alone is read as its
    held-out split: "digits" -> "digits:val"), a folder or .npz by its absolute path."""
    name, _, split = str(spec).partition(":")
    if name in EMBEDDED_DATASETS:
        return f"{name}:{split or 'val'}"
    return str(Path(spec).expanduser().resolve())


def read_image_set(
    spec: str | os.PathLike,
    *,
    size: int | None = None,
    limit: int | None = None,
    on_error: OnError = "skip",
    statistics_alone: bool = False,
    too_large: Callable[[FolderImages], ImageSet] | None = None,
) -> ImageSet:
    """Images to score, as uint8 (N, 3, H, W) in memory.

    `spec`: an embedded dataset ("digits", "digits:train", "photos:val"; needs `size`; the name wins
    over a folder of that name in the working directory, which is ./digits); an ADM `.npz`
    (labels from `arr_1` when present, as guided-diffusion writes class-conditional samples); or a folder:
    the files named as `smapctl sample` names them (labels read from the `{label:04d}_` prefix; grid.png
    is left out) when there are any, else every image file under it. With `size`, images of another size
    are centre-cropped and resized (bicubic) to size x size; without it all must share one size.
    An unreadable file in a folder is left out and kept in `.skipped` (on_error="skip"), or an error.
    `statistics_alone`: an `.npz` holding only Inception statistics (`mu`, `sigma`, no `arr_0`) is an
    ImageSet without images (a gFID reference), instead of an error.
    `too_large`: a folder too large for memory (`images_fit_in_memory`, known at its first readable image)
    is handed to it as a Dataset that reads its images one by one (`FolderImages`), and what it returns
    is returned (a gFID reference's statistics, `_streamed_statistics`); without it, an error.
    """
    from smapctl.data.datasets import build_eval_dataset

    if embedded_name(str(spec)):  # as everywhere else: a folder of that name is ./digits
        if size is None:
            raise UserError(f"{spec}: a built-in dataset has no image size of its own; give a folder or .npz")
        dataset = build_eval_dataset(str(spec), size)
        picked = limit_indices(len(dataset), limit)
        images, labels = _collect(dataset if picked is None else Subset(dataset, picked))
        return ImageSet(images, labels, source_name(spec))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz" and not path.is_dir():
        if statistics_alone and path.is_file() and "arr_0" not in npz_arrays(path):
            stats = read_fid_statistics(path)
            if stats is not None:  # a dataset's Inception statistics alone: enough for gFID
                empty = torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8)
                return ImageSet(empty, None, source_name(path), fid_stats=stats)
        images = torch.from_numpy(read_npz(path)).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        labels = _npz_labels(path, len(images))
        picked = limit_indices(len(images), limit)
        if picked is not None:
            images, labels = images[picked], None if labels is None else labels[picked]
        stats = read_fid_statistics(path)
        if len(images) == 0 and stats is None:
            raise UserError(f"{path}: its 'arr_0' holds no images")
        return ImageSet(_fit(images.contiguous(), size), labels, source_name(path), fid_stats=stats)
    if not path.is_dir():
        there = os.path.lexists(path)  # a file of another kind, or nothing at all
        if size is None:  # a built-in dataset is no choice here (above)
            what = "neither an image folder nor an .npz file" if there else "no such folder or .npz file"
            raise UserError(f"{spec}: {what}")
        what = (
            "neither an image folder, an .npz file nor a dataset"
            if there
            else "no such folder, .npz file or dataset"
        )
        raise UserError(f"{spec}: {what} ({', '.join(EMBEDDED_DATASETS)})")
    return _read_folder(path, size, limit, on_error, too_large)


def _collect(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (float image in [-1, 1], label) pairs of a dataset -> uint8 images (N, 3, S, S), labels (N,)."""
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=256):
        images.append(to_uint8(x))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _npz_labels(path: Path, n: int) -> torch.Tensor | None:
    """Integer labels (n,) stored as `arr_1` next to the images, or None when there is no `arr_1`; one
    of another shape or type is a UserError (dropped silently, it would take class_acc with it)."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_1" not in data.files:
            return None
        labels = data["arr_1"]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
        raise UserError(
            f"{path}: 'arr_1' should hold the {n} images' class labels as non-negative integers, shape"
            f" ({n},); it has shape {labels.shape} and type {labels.dtype}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _read_folder(
    folder: Path,
    size: int | None,
    limit: int | None,
    on_error: OnError,
    too_large: Callable[[FolderImages], ImageSet] | None = None,
) -> ImageSet:
    files, labels, named_classes = _folder_files(folder)
    if not files:
        raise UserError(f"{folder}: no image files found (searched recursively)")
    picked = limit_indices(len(files), limit)
    if picked is not None:
        files, labels = [files[i] for i in picked], None if labels is None else labels[picked]
    images, kept, skipped = None, [], []
    reading = tracked(files, len(files), f"reading {folder.name}", "images", enabled=len(files) >= 500)
    for i, f in enumerate(reading):
        try:
            image = load_image_tensor(f)  # (3, H, W) uint8
        except BadImageError as e:
            if on_error == "fail":
                raise
            skipped.append(e)
            continue
        image = _fit(image[None], size)[0]
        if images is None:  # all of them in one tensor, filled in place (a list and a stack: twice)
            too_many = images_fit_in_memory(len(files), image.shape)
            if too_many is not None and too_large is not None:
                reading.close()  # its bar gives way to that of `too_large`
                left = len(files) - i  # the files from this first readable one on
                logger.info(
                    "%s: %s images would take %.1f GiB: its Inception statistics are computed as it is read",
                    folder, f"{left:,}", left * image.numel() / 2**30,
                )  # fmt: skip
                streamed = too_large(FolderImages(folder, files[i:], size, tuple(image.shape)))
                return replace(streamed, skipped=skipped + streamed.skipped)  # those met before, first
            if too_many is not None:
                raise NotHeld(
                    f"{folder}: {too_many}, and `evaluate` holds the images it reads in memory: for gFID "
                    "against a large dataset give --ref an .npz of its Inception statistics (mu and sigma, as"
                    " guided-diffusion's reference batches hold them), or read --limit N of its images"
                )
            images = torch.empty(len(files), *image.shape, dtype=torch.uint8)
        elif image.shape != images.shape[1:]:
            raise UserError(
                f"{f}: image size {image.shape[2]}x{image.shape[1]} differs from "
                f"{images.shape[3]}x{images.shape[2]} ({files[kept[0]]}); all images must share one size"
            )
        images[len(kept)] = image
        kept.append(i)
    if images is None:
        raise UserError(f"{folder}: none of its {len(files)} image files could be read (e.g. {skipped[0]})")
    images = images[: len(kept)]
    labels = None if labels is None else labels[kept]
    by_folder = _folder_classes(folder, [files[i] for i in kept]) if labels is None else None
    return ImageSet(
        images, labels, source_name(folder), skipped, named_classes=named_classes,
        folder_classes=by_folder,
    )  # fmt: skip


def _folder_files(folder: Path) -> tuple[list[Path], torch.Tensor | None, dict[int, str]]:
    """The image files `_read_folder` scores: a `smapctl sample` folder's samples (with their labels and
    {id: class name} from their names; its other images left out, with a warning), else every image
    file in it (labels None). Files of other kinds are counted in one line."""
    others = Counter()
    files = scan_folder(folder, others)
    for name in (SETTINGS_FILE, NPZ_FILE, METRICS_FILE, SKIPPED_FILE):  # `sample`'s and `evaluate`'s own
        if (folder / name).is_file():
            others[Path(name).suffix] -= 1
    say_left_out(folder, others, logger)
    matches = [(f, SAMPLE_NAME.match(f.name)) for f in files]
    named = [(f, int(m.group(1))) for f, m in matches if m]
    named_classes = {int(m.group(1)): m.group(2) for _, m in matches if m}
    if not named:
        return files, None, named_classes
    strays = [f for f in files if not SAMPLE_NAME.match(f.name) and f.name != GRID_FILE]
    if strays:  # scored as samples of their classes, the folder's other images are not scored
        logger.warning(
            "%s: scoring its %d `smapctl sample` images; %d other image file(s) in it are left out (%s%s)",
            folder, len(named), len(strays), strays[0], ", ..." if len(strays) > 1 else "",
        )  # fmt: skip
    return [f for f, _ in named], torch.tensor([y for _, y in named]), named_classes


def _folder_classes(folder: Path, files: list[Path]) -> tuple[list[str], torch.Tensor] | None:
    """(sorted class names, label of each file) when every file is in a sub-folder of `folder` (the
    ImageNet layout, one sub-folder per class), else None."""
    parts = [f.relative_to(folder).parts for f in files]
    if not all(len(p) > 1 for p in parts):
        return None
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([index[p[0]] for p in parts])


def labelled_by_folder(images: ImageSet, class_names: list[str]) -> ImageSet:
    """`images` with the labels their class sub-folders give them in `class_names` (a classifier's
    classes), when every sub-folder is one of those classes; else unchanged (no accuracy on them), with
    a warning when only some are."""
    if images.labels is not None or images.folder_classes is None:
        return images
    names, index = images.folder_classes
    label_of = class_ids(class_names)
    unknown = [name for name in names if class_key(name) not in label_of]
    if unknown:
        if len(unknown) < len(names):
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            logger.warning(
                "%s: its sub-folder(s) %s are not classes of the classifier; its images are scored without"
                " labels (no accuracy)", images.source, shown,
            )  # fmt: skip
        return images
    return replace(images, labels=torch.tensor([label_of[class_key(name)] for name in names])[index])


def _fit(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size): centre square crop and bicubic resize, as the
    datasets' eval transform; unchanged when already that size or when `size` is None."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    transform = eval_transform(size)
    return torch.cat([to_uint8(transform(images[i : i + 256])) for i in range(0, len(images), 256)])


class FolderImages(Dataset):
    """The image files of a folder too large to hold, read one by one: index -> (uint8 image (3, H, W),
    index, why the file is unreadable or "", whether the image has the set's `shape`; if not, its size is
    the reason, "WxH"). Images are framed as `_read_folder` frames them (`_fit` to `size`; without a
    size, all must share the first one's `shape`). An unreadable file, or one of another size, comes back
    as a zero image, for the caller to skip or fail on; paths are one numpy bytes array, so forked workers
    do not copy a list of strings."""

    def __init__(self, folder: Path, files: list[Path], size: int | None, shape: tuple[int, int, int]):
        self.folder, self.size, self.shape = folder, size, shape  # shape: (3, H, W), the first image's
        self.paths = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def __getitem__(self, i: int):
        try:
            image = load_image_tensor(self.path(i))  # (3, H, W) uint8
        except BadImageError as e:
            return torch.zeros(self.shape, dtype=torch.uint8), i, e.reason, True
        image = _fit(image[None], self.size)[0]
        if image.shape != self.shape:
            return torch.zeros(self.shape, dtype=torch.uint8), i, f"{image.shape[2]}x{image.shape[1]}", False
        return image, i, "", True

    def first_of_another_size(self) -> tuple[Path, str] | None:
        """Without a size to frame them to (samples that are not square): the first file whose header
        gives another size than the first image's, as (path, "WxH"), read without decoding (EXIF
        orientation counted); unreadable files are left to the pass. So such a file is refused before
        the Inception pass, not when its batch comes (hours into it). Only regular files are opened, as
        `load_image` opens them: a named pipe among the images (`x.png`) blocked this open forever."""
        from PIL import Image

        _, h, w = self.shape
        for i in range(len(self)):
            try:
                if not stat.S_ISREG(os.stat(self.path(i)).st_mode):
                    continue  # (the pass says what it is)
                with Image.open(self.path(i)) as im:
                    width, height = im.size
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # a quarter turn: its sides swap
                        width, height = height, width
            except Exception:
                continue
            if (height, width) != (h, w):
                return self.path(i), f"{width}x{height}"
        return None

    def size_error(self, path: Path, size: str) -> UserError:
        _, h, w = self.shape
        return UserError(
            f"{path}: image size {size} differs from {w}x{h} ({self.path(0)}); all images must share one size"
        )
