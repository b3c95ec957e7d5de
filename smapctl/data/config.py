"""Where the training images come from and how they are augmented (appendix A)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smapctl.config import check
from smapctl.errors import UserError

EMBEDDED_DATASETS = ("digits", "photos")


def embedded_name(spec: str) -> str | None:
    """The embedded dataset a spec names ("digits" for "digits" or "digits:train"), or None for a folder
    (a folder named like one is written ./digits)."""
    name = spec.partition(":")[0]
    return name if name in EMBEDDED_DATASETS else None


def refuse_output_in_images(path: str | os.PathLike, folders: dict[str, str | None], then: str) -> None:
    """An --out that is or lies inside one of `folders` (an option or recipe key -> an image folder; None
    and the embedded datasets skipped) is refused: what a command writes there joins the images it reads.
    `then`: the rest of the message, after "whose images"."""
    inside = Path(os.path.abspath(path))
    for key, folder in folders.items():
        if folder is None or embedded_name(folder):
            continue
        images = Path(os.path.abspath(folder))
        if inside == images or images in inside.parents:
            raise UserError(f"--out {path}: inside {key} {folder}, whose images {then}")


def check_embedded_split(spec: str) -> None:
    """Refuse a split of an embedded dataset other than its train or val one (`digits:test`)."""
    if spec.partition(":")[2] not in ("", "train", "val"):
        raise UserError(f"{spec}: the split must be 'train' or 'val'")


@dataclass
class DataConfig:
    # "digits" or "photos" (embedded, built from images that ship inside installed packages), or the
    # path of an image folder in the ImageNet layout (one sub-folder per class).
    dataset: str = "digits"
    # A separate validation folder (e.g. ImageNet's val/); when null, a held-out split of `dataset`.
    val_dataset: str | None = None
    val_fraction: float = 0.1  # of a folder; digits and photos have fixed held-out splits
    # Appendix A: "the training augmentation is limited to random resized cropping and horizontal
    # flipping". The scale range is not given; (0.8, 1.0) is what TiTok/MaskGIT-style recipes use.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    # What to do with an unreadable image: skip it with a warning (counted), or stop with its path.
    on_error: Literal["skip", "fail"] = "skip"
    num_workers: int = 2

    def __post_init__(self):
        check(bool(self.dataset), "dataset", "must name an embedded dataset or an image folder")
        check(self.val_dataset != "", "val_dataset", "must name an image folder (or be null)")  # not ./
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        lo, hi = self.crop_scale
        check(0.0 < lo <= hi <= 1.0, "crop_scale", "must be two numbers with 0 < low <= high <= 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


def embedded_spec_error(data: DataConfig) -> str | None:
    """What is wrong with a recipe's embedded dataset names ("key: message"), or None. Checked when a
    recipe is loaded, not when a checkpoint's recipe is rebuilt (older runs read `val_dataset: photos`
    as the folder ./photos)."""
    name = embedded_name(data.dataset)
    if name is not None and name != data.dataset:
        return (
            f"data.dataset: '{data.dataset}' names a split; training takes the dataset's name ({name}),"
            " trains on its train split and validates on its val split"
        )
    if data.val_dataset is not None and embedded_name(data.val_dataset) is not None:
        return (
            f"data.val_dataset: must be an image folder, not '{data.val_dataset}' (an embedded dataset named"
            " in data.dataset brings its own val split; a folder named like one is written ./name)"
        )
    return None
