"""Shared by the tests of evaluate (test_evaluate*.py): the tiny tokenizer and generator that conftest's
`tok_run` and `gen_run` train, a check of scores that are fractions, a folder of samples as `smapctl sample`
writes it, and a stand-in reference classifier."""

from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = [
    *("model.image_size=16", "model.patch_size=4", "model.num_latent_tokens=8"),
    *("model.enc_width=32", "model.enc_depth=1", "model.enc_heads=2"),
    *("model.dec_width=32", "model.dec_depth=1", "model.dec_heads=2"),
    *("train.batch_size=8", "train.max_steps=3", "train.precision='no'", "train.warmup_steps=0"),
]
TINY_GENERATOR = [
    *("model.num_tokens=8", "model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
    *("model.head_depth=1", "model.head_width=32", "train.batch_size=16", "train.precision='no'"),
    *("train.warmup_steps=0", "train.max_steps=5", "train.sample_every=100", "train.ckpt_every=100"),
    "sample.steps=3",
]


def in_unit_interval(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def write_sample_folder(folder: Path, images: torch.Tensor, labels: list[int]) -> None:
    """PNGs named as `smapctl sample` names them, plus a grid.png of another size that must be ignored."""
    folder.mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{label:04d}_{label}_{i:05d}.png")
    Image.new("RGB", (40, 30)).save(folder / "grid.png")


class _GreyLevels(torch.nn.Module):
    """A stand-in reference classifier that knows images by their grey level: class c is -0.75 + 0.5 c."""

    image_size = 16

    def features(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]  # (B, 1)

    def head(self, feats):
        return -((feats - (-0.75 + 0.5 * torch.arange(4))) ** 2)  # (B, 4): the nearest level wins
