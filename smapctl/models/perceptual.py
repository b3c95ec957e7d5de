"""Perceptual loss on frozen VGG-16 features: LPIPS without its learned linear heads.

For each of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the features of both images are normalised
to unit length along the channels; the squared difference is summed over channels and averaged over
positions; the five layers are summed (the `lpips=False` variant of Zhang et al., 2018, LPIPS).

The module takes the VGG-16 weights as a state dict in torchvision's `vgg16-397923af.pth` layout; it
does no file I/O (`smapctl.train.losses.build_perceptual_loss` reads the file named in the recipe).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models import vgg16

# Indices in torchvision's vgg16().features just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (4, 9, 16, 23, 30)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(B, C, H, W) -> the same with every position's channel vector scaled to unit length.

    eps goes inside the square root: with LPIPS's f / (sqrt(sum f^2) + eps), a position whose ReLU
    features are all zero has a NaN gradient (sqrt's infinite slope at 0 times 0)."""
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)


def _check_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first missing or mis-shaped VGG-16 feature weight."""
    for k, v in expected.items():
        if k not in given:
            raise ValueError(f"no 'features.{k}' in the VGG-16 weights")
        if tuple(given[k].shape) != tuple(v.shape):
            raise ValueError(
                f"'features.{k}' has shape {tuple(given[k].shape)}, VGG-16 needs {tuple(v.shape)}"
            )


class PerceptualLoss(nn.Module):
    """Frozen VGG-16 feature distance between images in [-1, 1]; gradients flow to the images only."""

    def __init__(self, vgg_state: Mapping[str, torch.Tensor]):
        super().__init__()
        # Build on the meta device: no random init, and the 120M-parameter classifier is never allocated.
        with torch.device("meta"):
            features = vgg16(weights=None).features[: TAPS[-1]]
        prefix = "features."
        state = {
            k.removeprefix(prefix): v.float()
            for k, v in vgg_state.items()
            if k.startswith(prefix) and int(k.split(".")[1]) < TAPS[-1]
        }
        _check_state(features.state_dict(), state)
        features.load_state_dict(state, strict=True, assign=True)
        starts = (0, *TAPS[:-1])
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, TAPS, strict=True))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        # Always a fixed feature extractor, whatever mode the surrounding model is put in.
        return super().train(False)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> per-sample distance (B,)."""
        B = x.shape[0]
        h = ((torch.cat([x, y]) + 1) / 2 - self.mean) / self.std  # (2B, 3, H, W), ImageNet-normalised
        total = x.new_zeros(B)
        for block in self.slices:
            h = block(h)  # (2B, C_l, H_l, W_l)
            fx, fy = _unit(h[:B]), _unit(h[B:])
            total = total + (fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> scalar mean distance."""
        return self.distance(x, y).mean()
