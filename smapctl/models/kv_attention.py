"""Causal self-attention with a preallocated KV cache, shared by the CARD and LlamaGen generators.

Autoregressive sampling runs in two phases: a *prefill* that feeds a whole prefix at once, then a *decode*
loop that feeds one position at a time and attends to everything cached so far. Without a cache, the
same result comes from re-running the full prefix at every step (`KVCache` = None, `is_causal` masking);
the two paths agree up to float rounding, which the tests check.

Also here: rotary position embeddings (1D, for LlamaGen) and the classifier-free-guidance schedule over
token positions that both causal generators use.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

from smapctl.models.attention import attend
from smapctl.models.few_rows import FewRowsLinear

CFGSchedule = Literal["constant", "linear"]


class KVCache:
    """Keys and values of `depth` layers for `batch` rows and up to `max_len` positions, preallocated.

    `length` is the number of positions already written; a model advances it once per forward step
    (after all its layers have written their keys and values at positions `length .. length + T - 1`).
    """

    def __init__(
        self,
        depth: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.buffer = torch.empty(depth, 2, batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @staticmethod
    def storage_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype keys and values arrive in: autocast's (e.g. bf16) when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return param_dtype

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) buffers of layer i, each (B, H, max_len, Dh)."""
        return self.buffer[i, 0], self.buffer[i, 1]

    def advance(self, steps: int) -> None:
        self.length += steps


class RotaryEmbedding(nn.Module):
    """1D rotary position embedding (RoFormer), half-split layout; tables cached for `max_len` positions."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables()

    def build_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos / sin tables, on `device` (default: where the module is). They are not in
        checkpoints: a model built on the meta device and then loaded must call this."""
        device = self.cos.device if device is None else device
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.base ** (dims / self.head_dim)
        positions = torch.arange(self.max_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)  # (L, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, Dh)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, H, T, Dh) at positions start .. start + T - 1 -> rotated x, same shape."""
        T = x.shape[-2]
        cos = self.cos[start : start + T].to(x.dtype)
        sin = self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def fill_rotary_tables(model: nn.Module, device: torch.device | str) -> None:
    """The cos / sin tables of every `RotaryEmbedding` of `model` still on the meta device, computed on
    `device`: a model built there and given its weights (a checkpoint's, the EMA's) lacks them, as they
    are not saved. Tables already computed are kept."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.cos.is_meta:
            module.build_tables(device)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (`attention.attend`) that can read and extend a `KVCache`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        # Decode steps run these on a few rows (one position per sample): see few_rows.py.
        self.qkv = FewRowsLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = FewRowsLinear(dim, dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        Without a cache, x holds positions 0 .. T-1 and attention is causal. With a cache, x holds
        positions `cache.length .. cache.length + T - 1`; its keys/values are written into the cache and
        each query attends to every cached position up to its own.
        """
        T = x.shape[1]
        start = 0 if cache is None else cache.length
        # A few-row qkv output is a transposed view: made contiguous, q, k and v keep unit stride in their
        # last dim, which SDPA's CPU flash kernel needs (else it falls back to its slower math path).
        qkv = self.qkv(x).contiguous()
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        if rope is not None:
            q, k = rope(q, start), rope(k, start)
        mask, causal = None, T > 1
        if cache is not None:
            keys, values = cache.layer(layer)
            keys[:, :, start : start + T] = k
            values[:, :, start : start + T] = v
            k, v = keys[:, :, : start + T], values[:, :, : start + T]
            if start > 0 and T > 1:  # a chunk after a prefix: query i sees keys 0 .. start + i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                causal = False
        out = attend(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, Dh)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


def guidance_schedule(cfg_scale: float, schedule: CFGSchedule, num_positions: int) -> list[float]:
    """The guidance scale at each token position 0 .. num_positions - 1.

    "constant" uses `cfg_scale` everywhere; "linear" is MAR's schedule, 1 + (s - 1) * (tokens known after
    this step) / K, which with one token per step is 1 + (s - 1) * (i + 1) / K: from 1 + (s - 1) / K at the
    first position to `cfg_scale` at the last, so early (coarse, semantic) tokens are guided least. The
    schedule always spans the model's full length, so sampling a prefix reproduces the first tokens of a
    full sample.
    """
    if schedule == "constant":
        return [cfg_scale] * num_positions
    if schedule == "linear":
        return [1.0 + (cfg_scale - 1.0) * (i + 1) / num_positions for i in range(num_positions)]
    raise ValueError(f"cfg_schedule: expected 'constant' or 'linear', got {schedule!r}")
