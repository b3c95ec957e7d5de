"""Shared by the tests of evaluate (test_evaluate*.py): a check of scores that are fractions, a folder of
samples as `smapctl sample` writes it, and a stand-in reference classifier. (The tiny tokenizer and generator
they score are conftest's `tok_run` and `gen_run`.)"""

from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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
