"""Image folders in the ImageNet layout (one sub-folder per class) and a held-out split for them."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from smapctl.data.images import (
    BadImageError,
    apply_transform,
    is_image_file,
    load_image,
    say_left_out,
    scan_relative,
    unpack_key,
)
from smapctl.data.skipped import SkipLog
from smapctl.errors import UserError, one_line

logger = logging.getLogger("smapctl.data")
# The unreadable images a process meets, named by it (the CLI shows these in every process of a launcher).
unreadable_logger = logging.getLogger("smapctl.data.unreadable")


# Unreadable images named as they are met, by each process (or DataLoader worker) that reads them; the
# command's summary at the end counts and lists them all.
WARNED_AS_MET = 5


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>` -> (transform(image), label).

    Class names are the sorted sub-folder names, or, when `class_names` is given (a validation folder must
    use the training classes), each sub-folder must be one of them and takes its label from that list.
    Keys are indices or `SampleKey(index, seed)` (see `ResumableSampler`): with a seed the augmentation is
    a function of the key alone.

    An unreadable file with `on_error="fail"` raises `BadImageError` naming it. With `"skip"` it is logged
    once (logger "smapctl.data"), recorded in `.skipped`, and the next readable index is returned instead,
    so a run never stops on a few bad files; only when no file at all can be read is it an error. Inside
    DataLoader workers each worker holds its own copy, so `.skipped` and the warnings are per worker and
    the main process's `.skipped` stays empty: set `.skip_log` (a `SkipLog`, shared by every copy) to
    count them across workers and processes.

    Relative paths are kept in one numpy bytes array rather than a list of Python strings, so forked
    workers do not copy the listing page by page as reference counts change (1.28M ImageNet paths).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        on_error: Literal["skip", "fail"] = "skip",
        class_names: Sequence[str] | None = None,
    ):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
        self.root = Path(root).expanduser()
        self.transform = transform
        self.on_error = on_error
        folders = class_folders(self.root)
        self.class_names = list(class_names) if class_names is not None else folders
        paths, labels = _list_samples(self.root, folders, self.class_names)
        self._paths = np.array(paths, dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)
        self.skipped: set[str] = set()
        self._named = [0]  # unreadable images named in a warning, counted over this folder's `subset`s
        self.skip_log: SkipLog | None = None

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self._paths[index])

    def listing(self, contents: bool = False) -> dict:
        """What the images are, to tell when the folder has changed: {"images": their number, "sha256": a
        digest of their relative paths and labels}; with `contents` each file's size and modification
        time go in too (an image replaced in place). One `stat` per file with `contents`."""
        h = hashlib.sha256()
        for rel, label in zip(self._paths.tolist(), self.labels.tolist(), strict=True):
            h.update(b"%s\0%d\0" % (rel, label))
            if contents:
                try:
                    st = os.stat(self.root / os.fsdecode(rel))
                    h.update(b"%d %d\0" % (st.st_size, st.st_mtime_ns))
                except OSError:  # gone since the folder was listed: a change too
                    h.update(b"-\0")
        return {"images": len(self), "sha256": h.hexdigest()}

    def subset(self, indices: Sequence[int], transform: Callable | None) -> ImageFolderDataset:
        """The same folder restricted to `indices`, with its own transform (train vs held-out split)."""
        indices = np.asarray(indices, dtype=np.int64)
        view = copy.copy(self)
        view._paths, view.labels = self._paths[indices], self.labels[indices]
        view.transform, view.skipped = transform, set()
        return view

    def __getitem__(self, key):
        index, seed = unpack_key(key)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for attempt in range(n):
            i = (index + attempt) % n
            image = self._read(i)
            if image is not None:
                if self.transform is not None:
                    image = apply_transform(self.transform, image, seed)
                return image, int(self.labels[i])
        raise UserError(f"{self.root}: none of its {n} images could be read (see the warnings above)")

    def _read(self, i: int):
        """The PIL image at index i, or None for a file to skip."""
        path = self.path(i)
        if str(path) in self.skipped:
            return None
        try:
            return load_image(path)
        except BadImageError as e:
            if self.on_error == "fail":
                raise
            self.skipped.add(str(path))
            self._named[0] += 1  # one count for the training and held-out views of one folder
            if self._named[0] <= WARNED_AS_MET:
                more = (
                    "; any more are not named here (the summary at the end counts them)"
                    if self._named[0] == WARNED_AS_MET
                    else ""
                )
                unreadable_logger.warning("skipping unreadable image %s%s", one_line(str(e)), more)
            if self.skip_log is not None:
                self.skip_log.add(e)
            return None


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of a dataset folder (ImageNet layout), sorted; a UserError if none."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    entries = list(os.scandir(root))
    # Sorted by `class_key` (then as written): a folder's classes get the same ids in either form.
    folders = sorted(
        (e.name for e in entries if e.is_dir() and not _junk_folder(e.name)), key=lambda n: (class_key(n), n)
    )
    if not folders:
        if any(e.is_file() and is_image_file(e.name) for e in entries):
            # Images without classes (a tokenizer with `model.class_condition: false`) are one class.
            raise UserError(
                f"{root}: expected one sub-folder per class (ImageNet layout), but its images are not in"
                f" any; images without classes go in one sub-folder (e.g. {Path(root) / 'images'}), with"
                " --set model.num_classes=1 for training"
            )
        raise UserError(f"{root}: no class sub-folders (expected the ImageNet layout, root/<class>/<image>)")
    return folders


def class_key(name: str) -> str:
    """A class name as class names are compared: Unicode NFC. A folder named 'café' may come decomposed
    ('e' and a combining accent, NFD: as macOS, zip archives and rsync often hand names over) or
    composed, and is the same class either way."""
    return unicodedata.normalize("NFC", name)


def same_classes(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same classes in the same order, names compared as `class_key` does."""
    return len(a) == len(b) and all(class_key(x) == class_key(y) for x, y in zip(a, b, strict=True))


def shown_class(name: str, most: int = 40) -> str:
    """A class name as messages and cross-recon's panel show it: a character that is not printable as
    `?`, and at most `most` characters. A checkpoint from elsewhere can name its classes anything: shown
    as it is, a line break would fail in the font's layout (a traceback), a name of 100,000 characters would
    make a panel 700,000 pixels wide (a few more and no memory would hold it), an escape sequence would go
    to the terminal."""
    text = "".join(c if c.isprintable() else "?" for c in name)
    return text if len(text) <= most else text[: most - 3] + "..."


def shown_classes(class_names: Sequence[str], most: int = 12) -> str:
    """The first `most` class names for a message (`shown_class`), `...` after them when there are more."""
    return ", ".join(map(shown_class, class_names[:most])) + (" ..." if len(class_names) > most else "")


def class_ids(class_names: Sequence[str]) -> dict[str, int]:
    """`class_key` of each class name -> its id (the first, should two names differ only in form)."""
    ids: dict[str, int] = {}
    for i, name in enumerate(class_names):
        ids.setdefault(class_key(name), i)
    return ids


def _junk_folder(name: str) -> bool:
    """Hidden folders and the `__MACOSX` folder that macOS's archiver adds to a zip are not classes."""
    return name.startswith(".") or name == "__MACOSX"


def _list_samples(root: Path, folders: list[str], class_names: list[str]) -> tuple[list[bytes], list[int]]:
    label_of = class_ids(class_names)
    unknown = [f for f in folders if class_key(f) not in label_of]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise UserError(f"{root}: class folder(s) {shown} not among the {len(class_names)} training classes")
    paths, labels, empty, others = [], [], [], Counter()
    for folder in folders:
        files = scan_relative(root / folder, others)
        paths.extend(os.fsencode(f"{folder}/{f}") for f in files)  # `/` everywhere, as `scan_relative`
        labels.extend([label_of[class_key(folder)]] * len(files))
        if not files:
            empty.append(folder)
    if not paths:
        raise UserError(f"{root}: no image files in its class folders")
    say_left_out(root, others, logger)
    loose = sorted(
        e.name
        for e in os.scandir(root)
        if is_image_file(e.name) and not e.name.startswith(".") and e.is_file()
    )
    if loose:  # in no class: left out, and said, so that they are not dropped without a word
        shown = ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else "")
        logger.warning(
            "%s: %d image(s) beside its class folders, in none, left out: %s", root, len(loose), shown
        )
    if empty:  # still classes (their ids stay put), but most likely not what the user meant
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        logger.warning("%s: class folder(s) without images: %s", root, shown)
    return paths, labels


# ------------------------------------------------------------------------------------------------- split


def split_indices(
    n: int, val_fraction: float, seed: int = 0, labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """A deterministic train/held-out split of range(n) -> (train indices, val indices), both sorted.

    With `labels` the split is stratified: each class gives round(val_fraction * its size) images. Which
    images go to val is decided by a fixed integer hash of (seed, index) (splitmix64), so the split is the
    same on every machine and library version.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels_arr = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(labels_arr) != n:
        raise ValueError(f"got {len(labels_arr)} labels for {n} items")
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
    is_val = np.zeros(n, dtype=bool)
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        n_val = int(np.floor(val_fraction * len(members) + 0.5))
        is_val[members[np.argsort(keys[members], kind="stable")[:n_val]]] = True
    return np.flatnonzero(~is_val).tolist(), np.flatnonzero(is_val).tolist()


def empty_split_reason(val_fraction: float) -> str:
    """Why `split_indices` held out nothing although `val_fraction` is not 0 (each class gives
    round(val_fraction x its size) images)."""
    return (
        f"data.val_fraction {val_fraction:g} of each class rounds to no image: every class has fewer"
        f" than {1 / (2 * val_fraction):.3g} images"
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
