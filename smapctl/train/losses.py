"""The tokenizer's reconstruction and GAN losses (section 4.2, one-stage recipe; VQGAN-style GAN terms)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from smapctl.errors import UserError, describe, refused_pickle, torch_load_reason
from smapctl.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from smapctl.models.perceptual import PerceptualLoss
from smapctl.train.config import LossConfig

VGG16_FILE = "vgg16-397923af.pth"


def pixel_loss(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute ("l1") or squared ("l2") error between images x, y (B, 3, H, W) -> scalar."""
    if kind == "l1":
        return F.l1_loss(x, y)
    if kind == "l2":
        return F.mse_loss(x, y)
    raise ValueError(f"pixel loss must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]) -> scalar.

    Zero once real logits are >= 1 and fake ones <= -1; 1 when D outputs 0 everywhere.
    """
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(fake)] -> scalar."""
    return -fake_logits.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    loss_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """VQGAN's balance: ||d rec_loss / d W|| / (||d g_loss / d W|| + 1e-4), clamped to [0, max_weight].

    W is the decoder's last layer weight (for SMAP: `decoder.to_pixels.weight`). The result is detached;
    multiply it by `loss.gan_weight` and `g_loss`. Both losses must still have their graphs (this call
    keeps them for the backward pass that follows). Under fp16 pass the loss scaler's scale as
    `loss_scale`: the gradients are taken of the scaled losses, as the training's backward is, because
    a mean over a batch of pixels hands each fp16 pixel a gradient below fp16's range (a wrong weight,
    or 0); the ratio is the same. Gradients that overflowed at that scale give 0 (NaN) or `max_weight`
    (inf), not a NaN weight: the training's backward overflows as well and the scaler lowers the scale,
    where a NaN weight would make the loss non-finite and the step be skipped before the scaler sees it.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss * loss_scale, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss * loss_scale, last_layer_weight, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4 * loss_scale)
    return torch.nan_to_num(weight, nan=0.0, posinf=max_weight).clamp(0.0, max_weight).detach()


def build_discriminator(cfg: LossConfig) -> PatchDiscriminator | None:
    """The PatchGAN discriminator of the recipe, or None when `gan_weight` is 0."""
    if cfg.gan_weight <= 0:
        return None
    return PatchDiscriminator(DiscriminatorConfig(width=cfg.disc_width, layers=cfg.disc_layers))


def perceptual_weights_problem(cfg: LossConfig) -> str | None:
    """Why the recipe's perceptual loss cannot be built (its VGG-16 file not set or not there), or None.
    Cheap: `train_tokenizer` asks before it lists the images and builds the model, `--dry-run` warns."""
    if cfg.perceptual_weight <= 0:
        return None
    if not cfg.perceptual_weights:
        return (
            f"loss.perceptual_weights: not set; the perceptual loss needs a local copy of torchvision's "
            f"{VGG16_FILE} (or set loss.perceptual_weight: 0)"
        )
    # os.path's: `~name/...` of no such user stays as written (pathlib's raises "Could not determine home
    # directory", a traceback from a recipe's value), and is not found.
    path = Path(os.path.expanduser(cfg.perceptual_weights))
    if not path.is_file():
        return f"loss.perceptual_weights: {path} not found; expected torchvision's {VGG16_FILE}"
    return None


def build_perceptual_loss(cfg: LossConfig) -> PerceptualLoss | None:
    """The frozen VGG-16 perceptual loss with weights read from `loss.perceptual_weights`, or None when
    `perceptual_weight` is 0. Nothing is downloaded: a missing file is a UserError."""
    if cfg.perceptual_weight <= 0:
        return None
    problem = perceptual_weights_problem(cfg)
    if problem is not None:
        raise UserError(problem)
    path = Path(os.path.expanduser(cfg.perceptual_weights))
    what = f"loss.perceptual_weights: {path} is not a VGG-16 state dict like {VGG16_FILE}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated or foreign file: RuntimeError, KeyError, ...
        if refused_pickle(e):
            raise UserError(f"{what} (it holds Python objects other than tensors; refused)") from None
        raise UserError(f"{what} ({torch_load_reason(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} (it holds a {type(state).__name__})")
    try:
        return PerceptualLoss(state)
    except (RuntimeError, ValueError, IndexError) as e:  # missing keys, wrong shapes
        raise UserError(f"{what} ({describe(e, type(e).__name__)})") from None
