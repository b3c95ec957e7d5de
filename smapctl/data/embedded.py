"""The embedded datasets: real images that ship inside installed packages, so smapctl trains out of the box
with no download.

* "digits": scikit-learn's 1,797 handwritten digits (8x8 greyscale, ink 0..16), classes "0".."9". Ink
  0..16 maps linearly to 0..255, giving a white digit on black (the MNIST convention), bilinearly
  upscaled to the requested size, as RGB. Held out: a stratified 10% (seed 0), fixed for every recipe.
* "photos": seeded random square crops of nine photographs bundled with scikit-image and scikit-learn,
  labelled by their source photo (class name = photo name): 200 training and 20 held-out crops per photo.
  Held-out crops are other crops of the same photos, so they measure fit, not generalisation.

Built sets are cached as uint8 tensors in `<cache>/datasets/<name>-<size>px-v<version>.safetensors`, where
<cache> is `$SMAPCTL_CACHE` or `~/.cache/smapctl`; files are written atomically and rebuilt when absent or
unreadable. A build is deterministic for given package versions (JPEG decoding may differ by a grey level
across Pillow builds, which is why the cache, not the rebuild, is what a long project should rely on).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from smapctl.data.config import EMBEDDED_DATASETS
from smapctl.data.folder import split_indices
from smapctl.data.images import apply_transform, load_image, unpack_key
from smapctl.errors import UserError
from smapctl.io import utf8_path

logger = logging.getLogger("smapctl.data")

# Bump a version when its build changes, so stale caches are not reused.
VERSIONS = {"digits": "1", "photos": "1"}
SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.1

# class name -> (package, file inside the package). All are in the wheels; none needs pooch or a network.
PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
PHOTO_CROPS = {"train": 200, "val": 20}
PHOTO_CROP_SIDE = (0.3, 0.7)  # crop side as a fraction of the photo's shorter side


@dataclass
class EmbeddedData:
    """One embedded dataset at one size: uint8 images (N, 3, S, S) and int64 labels (N,) per split."""

    class_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, 3, S, S) -> (transform(image), label); keys as `ImageFolderDataset`."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        transform: Callable | None = None,
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels = images, labels
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = unpack_key(key)
        image = self.images[index]  # (3, S, S) uint8
        if self.transform is not None:
            image = apply_transform(self.transform, image, seed)
        return image, int(self.labels[index])


def cache_dir() -> Path:
    """Where built datasets are kept: `$SMAPCTL_CACHE`, else `~/.cache/smapctl`."""
    asked = os.environ.get("SMAPCTL_CACHE")
    try:
        return Path(asked or Path.home() / ".cache" / "smapctl").expanduser()
    except RuntimeError:  # `~name/...` of no such user, or no HOME and no user entry: pathlib's traceback
        where = f"SMAPCTL_CACHE={asked}: no home folder of that user" if asked else "no home folder"
        raise UserError(f"{where} for the cache's ~; set SMAPCTL_CACHE to a full path") from None


def load_embedded(name: str, image_size: int) -> EmbeddedData:
    """The embedded dataset `name` ("digits" or "photos") at `image_size`, from the cache or built now."""
    if name not in EMBEDDED_DATASETS:
        raise UserError(f"unknown embedded dataset '{name}' (choose from {', '.join(EMBEDDED_DATASETS)})")
    path = cache_dir() / "datasets" / f"{name}-{image_size}px-v{VERSIONS[name]}.safetensors"
    if path.is_file():
        try:
            return _read_cache(path)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning("rebuilding %s: the cached file is unreadable (%s)", path, e)
    data = BUILDERS[name](image_size)
    _write_cache(path, data)
    return data


def _read_cache(path: Path) -> EmbeddedData:
    from safetensors import safe_open

    with utf8_path(path) as readable, safe_open(readable, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return EmbeddedData(class_names=json.loads(meta["class_names"]), **tensors)


def _write_cache(path: Path, data: EmbeddedData) -> None:
    from smapctl.io import atomic_path
    from smapctl.safetensors_io import write_safetensors

    tensors = {k: v.contiguous() for k, v in vars(data).items() if isinstance(v, torch.Tensor)}
    meta = {"class_names": json.dumps(data.class_names)}
    try:
        with atomic_path(path, "the dataset cache", kept="") as tmp:  # concurrent builders write the same
            write_safetensors(tmp, tensors, meta)
    except UserError as e:  # a full disk costs the cache, not the run
        logger.warning("%s; the dataset will be rebuilt next time", e)


def embedded_class_names(name: str) -> list[str]:
    """The classes of an embedded dataset ("digits", "photos"), without building it."""
    return [str(d) for d in range(10)] if name == "digits" else list(PHOTOS)


# ------------------------------------------------------------------------------------------------ digits


def build_digits(image_size: int) -> EmbeddedData:
    """scikit-learn's digits as white-on-black RGB uint8 images of `image_size` (bilinear upscaling)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (big * 255).round().clamp(0, 255).to(torch.uint8)
    images = images.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S), grey -> RGB
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = split_indices(len(labels), DIGITS_VAL_FRACTION, SPLIT_SEED, labels.tolist())
    return EmbeddedData(
        class_names=embedded_class_names("digits"),
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        val_images=images[val_idx],
        val_labels=labels[val_idx],
    )


# ------------------------------------------------------------------------------------------------ photos


def photo_path(name: str) -> Path:
    """The file of one bundled photo, read straight from the installed package (no pooch fetcher)."""
    package, relative = PHOTOS[name]
    module = importlib.import_module(package)
    path = Path(module.__file__).parent / relative
    if not path.is_file():
        raise UserError(f"the '{name}' photo is missing from the installed {package} ({path}); reinstall it")
    return path


def build_photos(image_size: int) -> EmbeddedData:
    """Seeded square crops of the bundled photos, resized (bicubic, antialiased) to `image_size`."""
    splits = {split: ([], []) for split in PHOTO_CROPS}
    for label, name in enumerate(PHOTOS):
        photo = load_image(photo_path(name))
        for split_id, (split, count) in enumerate(PHOTO_CROPS.items()):
            rng = np.random.Generator(np.random.PCG64([SPLIT_SEED, label, split_id]))
            crops = [_random_crop(photo, rng, image_size) for _ in range(count)]
            splits[split][0].extend(crops)
            splits[split][1].extend([label] * count)
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    return EmbeddedData(
        class_names=embedded_class_names("photos"),
        train_images=torch.from_numpy(np.stack(train_x)),  # (N, 3, S, S)
        train_labels=torch.tensor(train_y, dtype=torch.long),
        val_images=torch.from_numpy(np.stack(val_x)),
        val_labels=torch.tensor(val_y, dtype=torch.long),
    )


def _random_crop(photo: Image.Image, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One square crop (side a random fraction PHOTO_CROP_SIDE of the shorter side) -> uint8 (3, S, S).
    Built with numpy: torch's multi-threaded copies of many small tensors are slow on small machines."""
    width, height = photo.size
    lo, hi = PHOTO_CROP_SIDE
    u_side, u_x, u_y = rng.random(3)
    side = max(1, round((lo + (hi - lo) * u_side) * min(width, height)))
    left, top = int(u_x * (width - side + 1)), int(u_y * (height - side + 1))
    crop = photo.crop((left, top, left + side, top + side))
    crop = crop.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1))  # (H, W, 3) -> (3, S, S)


BUILDERS = {"digits": build_digits, "photos": build_photos}
