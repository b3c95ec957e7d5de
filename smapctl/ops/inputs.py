"""What `smapctl tokenize` reads: image files, folders and globs (`list_inputs`) or a built-in dataset
(`builtin_input`), each image's class from its folders as training gives it (`resolve_labels`), and the
datasets its loader reads them through (`ImageFiles`, `ImageTensors`). `cross-recon` asks `folder_class`
too.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from smapctl.data.config import check_embedded_split, embedded_name
from smapctl.data.folder import class_ids, class_key, shown_classes
from smapctl.data.images import BadImageError, eval_frame, find_images, load_image, say_left_out
from smapctl.errors import UserError
from smapctl.ops.codes import UNKNOWN_LABEL

if TYPE_CHECKING:
    from smapctl.data.datasets import EmbeddedSplit


@dataclass
class ImageList:
    paths: list[str]  # as `find_images` spells them (a built-in dataset's: `relative`)
    relative: list[str]  # '/'-separated, relative to `base`
    base: Path  # the common folder of the inputs (a built-in dataset's: its name and build version)
    folders: list[str] = field(default_factory=list)  # the inputs that are folders (absolute)
    dataset: EmbeddedSplit | None = None  # the built-in dataset's split whose images these are
    spec: str = ""  # how the input named that dataset (`digits:val`)


def list_inputs(inputs: Sequence[str | os.PathLike]) -> ImageList:
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
    folders above are a class (`tokenize train/cat/fluffy`), an image in `cat/` is not said to be in "no
    folder named after a class": the message says that folder is not looked at, and what to give
    instead."""
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


class ImageTensors(Dataset):
    """`ImageFiles` of in-memory uint8 images (N, 3, H, W): a built-in dataset's, framed as its
    evaluation frames them (`eval_frame`; at the model's size, as they are built, it leaves them be)."""

    def __init__(self, images: torch.Tensor, image_size: int):
        self.images = images
        self.transform = eval_frame(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i, ""


class ImageFiles(Dataset):
    """Index -> (uint8 image (3, S, S), index, error reason or ""): `eval_transform` up to the float
    conversion, which the caller does per batch (`to_signed_float`, after the move to the device).
    Unreadable files come back as a reason (not an exception), so the caller decides to skip or fail;
    paths are one numpy bytes array, so forked workers do not copy a Python list of strings page by page."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: int):
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
