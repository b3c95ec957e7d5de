"""PatchGAN discriminator for the tokenizer's GAN loss (pix2pix / VQGAN "NLayer" layout).

Each output logit judges one receptive-field patch of the image (70x70 pixels for 3 layers). The
layout follows pix2pix: 4x4 convolutions, `layers` of them with stride 2 and doubling width (capped at
8x), one more with stride 1, then a 1-channel 4x4 convolution. Instead of BatchNorm we use GroupNorm:
it normalises each sample on its own, so it behaves the same on one or many processes (no SyncBatchNorm
under DDP), in train and eval mode, and keeps no running statistics in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smapctl.config import check


@dataclass
class DiscriminatorConfig:
    """Built from the recipe's `loss.disc_width` and `loss.disc_layers`."""

    width: int = 64
    layers: int = 3
    in_channels: int = 3
    norm_groups: int = 32

    def __post_init__(self):
        check(self.width > 0, "width", "must be a positive integer")
        check(self.layers > 0, "layers", "must be a positive integer")
        check(self.norm_groups > 0, "norm_groups", "must be a positive integer")


def logits_size(image_size: int, layers: int) -> int:
    """The side of the patch-logit map for `image_size` images (0: too small for this many layers)."""
    size = image_size
    for stride in [2] * layers + [1, 1]:  # every convolution: kernel 4, padding 1
        if size + 2 < 4:
            return 0
        size = (size + 2 - 4) // stride + 1
    return size


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def _stage(c_in: int, c_out: int, stride: int, groups: int) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False)
    return [conv, _norm(c_out, groups), nn.LeakyReLU(0.2)]


class PatchDiscriminator(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> patch logits (B, 1, H', W'); H' = H / 2**layers - 2."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.width * min(2**i, 8) for i in range(cfg.layers + 1)]
        # First layer: no norm (pix2pix); stride-2 stages; one stride-1 stage; 1-channel logits.
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.layers):
            layers += _stage(widths[i - 1], widths[i], 2, cfg.norm_groups)
        layers += _stage(widths[cfg.layers - 1], widths[cfg.layers], 1, cfg.norm_groups)
        layers.append(nn.Conv2d(widths[cfg.layers], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DCGAN / pix2pix initialisation: N(0, 0.02) convolutions, N(1, 0.02) norm gains.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, 1, H', W')."""
        return self.net(images)
