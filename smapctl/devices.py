"""Which device a command runs on (the Python API's when not given `device=`), and when two device names
are one."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The single-process commands' and the Python API's device by default: the current CUDA GPU when
    there is one, else the CPU (`CUDA_VISIBLE_DEVICES` picks the GPU; the Python API takes other devices as
    `device=`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_device() -> torch.device:
    """Where a training run in one process computes, as accelerate chooses it: the current CUDA GPU, else
    Apple's mps, else the CPU. (The other commands stay on the CPU where there is no CUDA GPU:
    `default_device`.)"""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two device names are one device: `cuda` is the current GPU (so `cuda:0` there, where
    `==` says not), as `xpu` is the current XPU; a CPU or meta device has no other index."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    backend = getattr(torch, a.type, None)
    has_current = a.type not in ("cpu", "meta") and hasattr(backend, "current_device")
    current = backend.current_device() if has_current else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
