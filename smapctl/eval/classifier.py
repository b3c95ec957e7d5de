"""A small reference classifier for "semantic accuracy" that smapctl trains itself, offline.

The paper reports rFID, gFID and IS (section 4.1); smapctl adds a measure of how much class meaning
survives tokenization and generation. No pretrained weights can be downloaded here, so it trains a small
CNN on the dataset's
training split (deterministically, on the CPU in a few minutes for 32 px sets) and caches it. Two numbers
come from it:

* accuracy of its predictions on reconstructions / samples against their class labels, and
* a classifier-feature Frechet distance on its penultimate (global-pool) features. That distance lives in
  this small network's feature space: it is NOT comparable with Inception FID and must not be reported as
  FID.
"""

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smapctl.data.embedded import cache_dir
from smapctl.data.images import to_signed_float
from smapctl.errors import UserError
from smapctl.io import loads_json, utf8_path
from smapctl.progress import tracked

logger = logging.getLogger("smapctl.eval")

# Bump when the architecture or the training recipe changes: it keys the cache. 2: trained on the loaders'
# floats (`to_signed_float`), not x / 127.5 - 1 (a version-1 classifier scores samples otherwise).
CLASSIFIER_VERSION = 2
DEFAULT_WIDTHS = (32, 64, 128)
MAX_SHIFT = 0.0625  # random translations of up to 1/16 of the image side (2 px at 32 px)
# The reference classifier's training steps; part of its cache key, so `evaluate` and `reproduce mini` take
# them from here to share one cached classifier.
CLASSIFIER_STEPS = 500


def classifier_cache() -> Path:
    """The folder of the cached reference classifiers (`load_or_train_classifier`'s `cache_dir`)."""
    return cache_dir() / "classifiers"


class ConvBlock(nn.Module):
    """Two (3x3 conv, GroupNorm, ReLU) layers, then 2x2 max-pool: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(8, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(8, c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ReferenceClassifier(nn.Module):
    """Conv blocks + global average pool + linear head.

    Inputs are float images (B, 3, H, W) in [-1, 1]; other sizes than `image_size` are resized to it
    (bilinear, antialiased). GroupNorm rather than BatchNorm keeps train and eval behaviour identical.
    """

    def __init__(self, num_classes: int, image_size: int, widths: tuple[int, ...] = DEFAULT_WIDTHS):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.widths = tuple(widths)
        chans = (3, *self.widths)
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)))
        self.head = nn.Linear(self.widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> penultimate features (B, D), D = widths[-1]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = self.blocks(x)  # (B, D, H / 2^n, W / 2^n)
        return x.mean(dim=(2, 3))  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: float = MAX_SHIFT) -> torch.Tensor:
    """Translate each image by a random sub-pixel offset of up to `max_shift` of its side (border padding).

    Sub-pixel shifts also blur slightly, which helps the classifier on soft reconstructions.
    x: (B, C, H, W) -> (B, C, H, W).
    """
    b = x.shape[0]
    # affine_grid works in [-1, 1] coordinates, where the full side has length 2.
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * max_shift)  # (B, 2)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of index batches, a fresh permutation each epoch (last partial batch dropped)."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def train_reference_classifier(
    train_images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = CLASSIFIER_STEPS,
    seed: int = 0,
    batch_size: int = 128,
    image_size: int | None = None,
    lr: float = 3e-3,
) -> ReferenceClassifier:
    """Train a ReferenceClassifier from scratch; the same inputs and seed give identical weights.

    train_images: (N, 3, H, W), uint8 or float in [-1, 1]; labels: (N,) int in [0, num_classes).
    `image_size` defaults to H (images must be square). AdamW with a one-cycle schedule, random shifts as
    augmentation. Runs on the CPU; returns the model in eval mode.
    """
    # uint8 images stay uint8 and become floats a batch at a time: all of them as float32 take 4x the memory
    # `images_fit_in_memory` allows for (a 30,000-image folder at 64 px: 1.3 GB more at its peak).
    x = train_images if train_images.dtype == torch.uint8 else to_signed_float(train_images)
    y = torch.as_tensor(labels, dtype=torch.long)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected images (N, 3, H, W) and labels (N,), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if image_size is None:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"images are not square ({x.shape[-2]}x{x.shape[-1]}); pass image_size")
        image_size = x.shape[-1]
    if x.shape[-2:] != (image_size, image_size):  # resize once rather than every step
        x = F.interpolate(to_signed_float(x), size=(image_size, image_size), mode="bilinear", antialias=True)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.default_generator.manual_seed(seed)  # built on the CPU; GPU generators left alone
        model = ReferenceClassifier(num_classes, image_size)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    batches = _batches(x.shape[0], batch_size, generator)
    model.train()
    # Minutes on a CPU the first time (later runs read the cache): a bar, so the wait does not look hung.
    for _ in tracked(range(steps), steps, "training the reference classifier (once)", "steps"):
        idx = next(batches)
        loss = F.cross_entropy(model(random_shift(to_signed_float(x[idx]), generator)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def _apply(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Run `fn` over float versions of `images` (N, 3, H, W) in batches and concatenate the outputs."""
    return torch.cat(
        [fn(to_signed_float(images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    )


def accuracy(
    model: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy in [0, 1] on images (N, 3, H, W) (uint8, or float in [-1, 1]) with labels (N,)."""
    model.eval()
    device = next(model.parameters()).device
    logits = _apply(lambda x: model(x.to(device)).cpu(), images, batch_size)  # (N, num_classes)
    return (logits.argmax(dim=1) == torch.as_tensor(labels).cpu()).double().mean().item()


# ------------------------------------------------------------------------------------------------ cache


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the training data, so a cached classifier is never reused for different data."""
    h = hashlib.sha256()
    h.update(str((images.dtype, tuple(images.shape))).encode())
    h.update(images.contiguous().cpu().numpy())  # the array's own buffer: `tobytes()` copied all of it
    h.update(torch.as_tensor(labels, dtype=torch.long).cpu().numpy().tobytes())
    return h.hexdigest()


def save_classifier(model: ReferenceClassifier, weights_path: Path, meta: dict) -> None:
    """Weights as safetensors, then a json of metadata next to it (written last: its presence means done)."""
    from smapctl.io import atomic_path, write_text_atomic
    from smapctl.safetensors_io import write_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path, "the reference classifier") as tmp:  # (its temp file's lock kept)
        write_safetensors(tmp, state, {"format": "pt"})
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
    write_text_atomic(weights_path.with_suffix(".json"), meta_text, "the reference classifier")


def _read_meta(weights_path: Path) -> dict | None:
    """The metadata json next to `weights_path`, or None when it is absent or unreadable."""
    try:
        return loads_json(weights_path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def load_classifier(weights_path: Path) -> tuple[ReferenceClassifier, dict]:
    """Rebuild a ReferenceClassifier from its safetensors file and metadata json."""
    from safetensors.torch import load_file

    meta = loads_json(weights_path.with_suffix(".json").read_text())
    model = ReferenceClassifier(meta["num_classes"], meta["image_size"], tuple(meta["widths"]))
    with utf8_path(weights_path) as readable:
        model.load_state_dict(load_file(readable))
    return model.eval(), meta


def load_or_train_classifier(
    dataset_name: str,
    image_size: int,
    train_images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cache_dir: str | Path,
    steps: int = CLASSIFIER_STEPS,
    seed: int = 0,
    batch_size: int = 128,
) -> ReferenceClassifier:
    """The cached reference classifier for a dataset, training (and caching) it on a miss.

    The cache file is `<cache_dir>/refclf-<dataset>-<size>px-<steps>steps-v<version>.safetensors` plus a
    `.json` of metadata (the step count in the name: a quick `reproduce mini` and a full one keep their
    own); a cached entry whose metadata (classes, recipe, data fingerprint) does not match is retrained.
    """
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name)
    name = f"refclf-{safe_name}-{image_size}px-{steps}steps-v{CLASSIFIER_VERSION}.safetensors"
    weights_path = Path(cache_dir) / name
    meta = {
        "version": CLASSIFIER_VERSION,
        "dataset": dataset_name,
        "image_size": image_size,
        "num_classes": num_classes,
        "widths": list(DEFAULT_WIDTHS),
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "num_train": int(train_images.shape[0]),
        "data_sha256": _fingerprint(train_images, labels),
    }
    if weights_path.is_file() and _read_meta(weights_path) == meta:
        return load_classifier(weights_path)[0]
    logger.info(
        "training the reference classifier of %s (%d images at %d px, %d steps): once, minutes on a CPU; "
        "then cached as %s",
        dataset_name, len(labels), image_size, steps, weights_path,
    )  # fmt: skip
    model = train_reference_classifier(train_images, labels, num_classes, steps, seed, batch_size, image_size)
    try:
        save_classifier(model, weights_path, meta)
    except UserError as e:  # a full disk costs the cache, not the evaluation
        logger.warning("%s; the reference classifier will be trained again next time", e)
    return model
