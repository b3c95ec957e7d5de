"""Exponential moving average of a model's weights, kept in float32 beside the model."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every floating-point parameter.

    The shadow is a float32 copy keyed like `model.state_dict()`, so `state_dict()` can be saved as a
    checkpoint's `ema.safetensors` and loaded straight into a fresh model. Buffers (and non-float
    parameters) are not averaged: they are copied from the model at every `update`. Pass the bare module
    (`accelerator.unwrap_model(model)`), not a DDP/compiled wrapper, so the keys match.

    With `decay` 0 the average is the model itself: no copy is kept (a 3B-parameter model's would take
    12 GB per process), `update` does nothing and `state_dict` reads the model's weights.

    `release()` drops the average in a process that never reads it (a launcher's other processes: only the
    main one evaluates and saves it); `update` then does nothing and reading it is an error.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = model if decay == 0 else None  # decay 0: the model is its own average
        state = model.state_dict(keep_vars=True)
        # remove_duplicate=False: a tied parameter gets a shadow under each of its state-dict names.
        named = model.named_parameters(remove_duplicate=False)
        self.param_names = [n for n, p in named if p.is_floating_point()]
        averaged = set(self.param_names)
        self.other_names = [n for n in state if n not in averaged]
        self.shadow: dict[str, torch.Tensor] = {}
        self.released = False
        if self.model is None:
            self.shadow = {n: state[n].detach().to(torch.float32, copy=True) for n in self.param_names}
            self.shadow |= {n: state[n].detach().clone() for n in self.other_names}

    def release(self) -> None:
        """Keep no average in this process (see the class)."""
        self.released, self.shadow, self.model = True, {}, None

    def _check_kept(self) -> None:
        if self.released:
            raise RuntimeError("this process keeps no EMA (released: only the main process reads it)")

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters(remove_duplicate=False))
        return [named[n].detach() for n in self.param_names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards the model's current weights (call after each optimiser step)."""
        if self.model is not None or self.released:
            return
        params = self._params(model)
        shadow = [self.shadow[n] for n in self.param_names]
        if any(p.device != s.device for p, s in zip(params, shadow, strict=True)):  # the model moved
            state = model.state_dict()  # each tensor to its own parameter's or buffer's device
            self.shadow = {n: t.to(state[n].device) for n, t in self.shadow.items()}
            shadow = [self.shadow[n] for n in self.param_names]
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        # lerp(s, p, 1 - d) = s + (1 - d)(p - s) = d s + (1 - d) p
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
        if self.other_names:
            state = model.state_dict()
            for n in self.other_names:
                self.shadow[n].copy_(state[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like `model.state_dict()` (float params in float32)."""
        self._check_kept()
        if self.model is not None:
            averaged = set(self.param_names)
            state = self.model.state_dict()
            return {n: state[n].detach().float() if n in averaged else state[n].detach() for n in state}
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_kept()
        names = set(self.param_names) | set(self.other_names)
        missing, unexpected = names - set(state), set(state) - names
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        if self.model is not None:  # the model's own weights are restored from its checkpoint file
            return
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(state[n])
