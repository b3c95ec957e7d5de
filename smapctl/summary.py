"""Build a recipe's model without data and describe it (`--dry-run`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Models above this many parameters are only ever built on the meta device by a dry run.
REAL_BUILD_LIMIT = 50_000_000


@dataclass
class ModelSummary:
    class_name: str
    parameters: int  # trainable parameters
    parts: dict[str, int]  # trainable parameters per top-level child module
    device: str  # "meta" or "cpu": where the dry run built it


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def summarize(build) -> ModelSummary:
    """Call `build()` on the meta device; rebuild for real on the CPU when the model is small.

    The real build checks that initialisation works; the meta build costs no memory for 1B models.
    """
    with torch.device("meta"):
        model = build()
    device = "meta"
    if count_parameters(model, trainable_only=False) <= REAL_BUILD_LIMIT:
        model = build()
        device = "cpu"
    parts = {  # children without parameters (dropout, activations) are left out
        name: count_parameters(child)
        for name, child in model.named_children()
        if next(child.parameters(), None) is not None
    }
    own = sum(p.numel() for p in model.parameters(recurse=False) if p.requires_grad)
    if own:
        parts["(own)"] = own
    return ModelSummary(type(model).__name__, count_parameters(model), parts, device)
