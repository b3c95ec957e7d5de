"""A learned (1, n, W) sequence spread over the batch, with a gradient laid out as its parameter is."""

from __future__ import annotations

import torch


class _ExpandBatch(torch.autograd.Function):
    """`param.expand(batch, ...)` whose backward sums into a fresh tensor. Plain `expand` at batch 1 is a
    no-op, so the parameter's gradient would be the slice of `torch.cat`'s gradient, strided like the
    whole sequence; DDP then warns "Grad strides do not match bucket view strides" (and copies it)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, batch: int) -> torch.Tensor:
        return param.expand(batch, *param.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.sum(0, keepdim=True), None


def expand_batch(param: torch.Tensor, batch: int) -> torch.Tensor:
    """param (1, n, W) -> a (batch, n, W) view of it, for `torch.cat` with per-image tokens."""
    return _ExpandBatch.apply(param, batch)
