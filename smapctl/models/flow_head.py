"""The per-token flow-matching head of CARD (paper section 3.3, eq. 6): v = head(x_t, t, z_i).

A small MLP in the style of MAR's per-token diffusion head, trained with rectified flow and velocity
prediction instead of DDPM noise prediction.

Rectified-flow convention used throughout smapctl (t = 0 is noise, t = 1 is data):

    x_t = (1 - t) * noise + t * x,      target velocity  v = d x_t / d t = x - noise,

so sampling integrates dx/dt = v from t = 0 (Gaussian noise) to t = 1 (a token). The training times
are drawn uniformly in [0, 1].

Architecture: the condition c = proj(z) + MLP(sinusoidal(t)) modulates `depth` residual MLP blocks of
width `width` through adaLN (shift, scale), then a final adaLN-modulated linear layer gives the velocity.
Each block's output linear and the final layer start at zero, so the head starts as the identity map
followed by v = 0. (We modulate with shift and scale only, 2 w^2 parameters per block, not MAR's
shift/scale/gate 3 w^2: with the gated version CARD-B would land 6.7% over the paper's 234M, see
smapctl/presets.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from smapctl.config import check
from smapctl.models import few_rows

SamplingMethod = Literal["euler", "heun"]
FLOW_STEPS = 25  # flow-matching steps per token at sampling (appendix A)

# `FlowHead.sample` computes the adaLN modulations of about this many rows (time points x batch rows) in
# one call; measured in benchmarks/README.md.
_MODULATION_ROWS = 512


@dataclass
class FlowHeadConfig:
    token_dim: int = 16  # C, the channels of one latent token
    cond_dim: int = 768  # D, the width of the transformer output z_i
    width: int = 1024
    depth: int = 6
    freq_dim: int = 256  # sinusoidal features of t before the time MLP

    def __post_init__(self):
        for name in ("token_dim", "cond_dim", "width", "depth"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(self.freq_dim > 0 and self.freq_dim % 2 == 0, "freq_dim", "must be a positive even integer")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (N,) in [0, 1] -> (N, dim) sinusoidal features of 1000 * t (the DiT/MAR time scale)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # never in half precision
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = (1000.0 * t.to(dtype))[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, w) * (1 + scale) + shift, with gain = 1 + scale (`FlowHead.modulations` returns it);
    shift and gain (N, w) -> (N, w)."""
    return torch.addcmul(shift, x, gain)


class ResBlock(nn.Module):
    """x + mlp(modulate(LN(x), shift(c), 1 + scale(c))); the MLP's last linear starts at zero."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, width, width, act_layer=nn.SiLU)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, shift: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """x (N, w), shift and gain (N, w) from `FlowHead.modulations` -> (N, w).

        Written without submodule calls: sampling runs this 25 times per token on a few rows, where each
        module call costs about as much as its small kernel (`few_rows.linear`: the few-row route too)."""
        norm, fc1, fc2 = self.norm, self.mlp.fc1, self.mlp.fc2  # (the Mlp's dropouts are p = 0)
        h = modulate(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps), shift, gain)
        return x + few_rows.linear(fc2, F.silu(few_rows.linear(fc1, h)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear layer to the token channels (both start at zero)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """x (N, w), shift and gain (N, w) from `FlowHead.modulations` -> (N, out_dim); functional calls
        as in `ResBlock.forward`."""
        h = modulate(F.layer_norm(x, self.norm.normalized_shape, eps=self.norm.eps), shift, gain)
        return few_rows.linear(self.linear, h)


class FlowHead(nn.Module):
    """Velocity predictor for one token given its condition z; `forward` is the loss, `sample` the ODE."""

    def __init__(self, cfg: FlowHeadConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.input_proj = nn.Linear(cfg.token_dim, w)
        self.cond_proj = nn.Linear(cfg.cond_dim, w)
        self.time_mlp = Mlp(cfg.freq_dim, w, w, act_layer=nn.SiLU)
        self.blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg.depth))
        self.final = FinalLayer(w, cfg.token_dim)
        self.initialize_weights()
        # Sampling runs the blocks' and the final linears 25 times per token on a few rows (the batch,
        # twice with guidance): see few_rows.py. The others run once per token, and the input projection
        # keeps the residual stream contiguous for the LayerNorms.
        for block in self.blocks:
            few_rows.use_few_rows_linears(block.mlp)
        few_rows.use_few_rows_linears(self.final.linear)

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_mlp.fc1, self.time_mlp.fc2):  # DiT's timestep-MLP init
            nn.init.normal_(lin.weight, std=0.02)
        # Zero the residual outputs and the final layer: every block starts as the identity, v starts at 0.
        for block in self.blocks:
            nn.init.zeros_(block.mlp.fc2.weight)
            nn.init.zeros_(block.mlp.fc2.bias)
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for lin in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) -> (N, w)."""
        return self.time_mlp(timestep_embedding(t, self.cfg.freq_dim))

    def modulations(self, c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """c (..., w) = cond_proj(z) + time_embed(t) -> (shift, 1 + scale), each (..., w), for every
        block and then the final layer. They depend on z and t only, not on the noisy token."""
        mods = []
        for layer in (*self.blocks, self.final):
            shift, scale = layer.modulation(c).chunk(2, dim=-1)
            mods.append((shift, 1 + scale))
        return mods

    def velocity_from_modulations(
        self, x: torch.Tensor, mods: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """x (N, C) noisy tokens, mods = self.modulations(c) for N rows -> velocity (N, C)."""
        h = few_rows.linear(self.input_proj, x)  # (N, w)
        for block, (shift, gain) in zip(self.blocks, mods[:-1], strict=True):
            h = block(h, shift, gain)
        return self.final(h, *mods[-1])

    def velocity_from_cond(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, C) noisy tokens, c (N, w) = cond_proj(z) + time_embed(t) -> velocity (N, C)."""
        return self.velocity_from_modulations(x, self.modulations(c))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 6: x (N, C) at times t (N,), conditions z (N, D) -> velocity (N, C)."""
        return self.velocity_from_cond(x, self.cond_proj(z) + self.time_embed(t))

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Rectified-flow loss: x (N, C) clean tokens, z (N, D) their conditions -> scalar MSE.

        Draws t ~ U[0, 1] and noise ~ N(0, I) per row (from `generator` when given).
        """
        t = torch.rand(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)  # (N,)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)  # (N, C)
        x_t = (1 - t[:, None]) * noise + t[:, None] * x
        return F.mse_loss(self.velocity(x_t, t, z), x - noise)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        steps: int = FLOW_STEPS,
        cfg_scale: float | torch.Tensor | None = None,
        temperature: float = 1.0,
        method: SamplingMethod = "euler",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Integrate dx/dt = v from noise (t = 0) to a token (t = 1) in `steps` uniform steps.

        z: (N, D) conditions, or with `cfg_scale` set, (2N, D) = [conditional rows; unconditional rows]
        whose velocities combine as v = v_u + s * (v_c - v_u) (s a float or an (N,) tensor). The
        starting noise is scaled by `temperature` (< 1 gives less diverse, "colder" tokens); nothing
        else is random. "heun" is the second-order method (two velocity evaluations per step).
        Returns (N, C).
        """
        check(steps > 0, "steps", "must be a positive integer")
        check(method in ("euler", "heun"), "method", f"expected 'euler' or 'heun', got {method!r}")
        guided = cfg_scale is not None
        n = z.shape[0] // 2 if guided else z.shape[0]
        if torch.is_tensor(cfg_scale):
            cfg_scale = cfg_scale.to(z.dtype).reshape(n, 1)
        x = temperature * torch.randn(
            n, self.cfg.token_dim, device=z.device, dtype=z.dtype, generator=generator
        )
        # The condition varies only through t: project z once, embed the whole time grid once.
        zc = self.cond_proj(z)  # (R, w)
        grid = torch.linspace(0, 1, steps + 1, device=z.device, dtype=z.dtype)
        if method == "euler":  # t = 1 is never evaluated
            grid = grid[:-1]
        t_emb = self.time_embed(grid)  # (points, w)
        # The adaLN modulations do not depend on x either: compute them for a run of time points at
        # once, so their linears see (run x R) rows instead of R. A batch of 8 with guidance is 16 rows,
        # too few for a GEMM to run well (benchmarks/README.md); the run keeps memory bounded.
        run = max(1, _MODULATION_ROWS // zc.shape[0])
        window: dict[int, list] = {}

        def mods_at(j: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            start = j - j % run
            if start not in window:  # time points only move forward: keep the current run only
                window.clear()
                window[start] = self.modulations(zc + t_emb[start : start + run, None])  # (run, R, w)
            return [(shift[j - start], gain[j - start]) for shift, gain in window[start]]

        def v(x: torch.Tensor, i: int) -> torch.Tensor:
            out = self.velocity_from_modulations(torch.cat([x, x]) if guided else x, mods_at(i))
            if not guided:
                return out
            v_c, v_u = out.chunk(2)
            return v_u + cfg_scale * (v_c - v_u)

        dt = 1.0 / steps
        for i in range(steps):
            v1 = v(x, i)
            if method == "euler":
                x = x + dt * v1
            else:
                x = x + 0.5 * dt * (v1 + v(x + dt * v1, i + 1))
        return x
