"""Optimiser and learning-rate schedule shared by the training loops (appendix A: AdamW, cosine decay
with linear warm-up).

Weight-decay rule (`param_groups`): a parameter is decayed iff it is the weight matrix or kernel of a
layer, i.e. it has >= 2 dimensions, its name is `weight` (or ends in `_weight`, as in
`nn.MultiheadAttention.in_proj_weight`) and it does not belong to an `nn.Embedding`. Everything else is
not decayed: biases, norm gains, embedding tables (class embeddings, VQ codebooks) and free learned
tensors such as position embeddings, latent queries, mask tokens and SoftVQ codebooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from smapctl.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps` (step 0 gets lr / warmup_steps, step warmup_steps - 1 the full lr),
    then cosine decay from lr to lr * min_lr_ratio, reached at step `max_steps`.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lr_min = cfg.lr * cfg.min_lr_ratio
    decay_steps = cfg.max_steps - cfg.warmup_steps
    if decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR following `lr_at`, relative to each group's own lr (so a discriminator with its own
    lr gets the same shape). Call `.step()` once per optimiser step. Do not pass it to
    `accelerator.prepare`: accelerate would step it once per process, but `max_steps` counts optimiser
    steps of the global batch."""

    def factor(step: int) -> float:
        return lr_at(step, cfg) / cfg.lr

    return LambdaLR(optimizer, factor)


def _decays(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    return (
        p.ndim >= 2
        and (name == "weight" or name.endswith("_weight"))
        and not isinstance(module, nn.Embedding)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [decayed, not decayed] groups by the module-docstring rule."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if _decays(module, name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module | Iterable[torch.Tensor], cfg: TrainConfig, *, lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW with `cfg.betas` and `cfg.weight_decay` applied by the module-docstring rule.

    `model` is a module (names decide the decay) or an iterable of parameters (then only >= 2-D tensors
    are decayed). `lr` overrides `cfg.lr` (e.g. the discriminator's `loss.disc_lr`). The fused kernel is
    used when the parameters' device supports it (CPU included: ~7x faster than foreach on 2 cores).
    """
    if isinstance(model, nn.Module):
        groups = param_groups(model, cfg.weight_decay)
    else:
        params = [p for p in model if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in _fused_devices() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr if lr is None else lr,
        betas=tuple(cfg.betas),
        fused=fused or None,
        foreach=None if fused else True,
    )


def _fused_devices() -> list[str]:
    """Device types with a fused AdamW kernel (torch checks this only at the first step)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # private helper moved: the two that matter here
        return ["cpu", "cuda"]
    return _get_fused_kernels_supported_devices()
