"""Scaled dot-product attention that picks the faster kernel for where it runs.

On GPUs and in fp32, `F.scaled_dot_product_attention` (flash / memory-efficient kernels) is fastest. On
the CPU in bf16/fp16 it is not: PyTorch's CPU flash kernel runs its forward and backward at well under
the speed of plain batched matmuls. Measured on a 2-core AMD EPYC (Zen 4) at the SMAP-B shape (batch 2,
12 heads, 385 tokens, head dim 64), forward + backward of one layer:

    fp32: SDPA 33 ms, explicit matmuls 36 ms      bf16: SDPA 33 ms, explicit matmuls 12 ms

and on a 2-core Intel Xeon with AMX tiles, in bf16: SDPA 47 ms, explicit matmuls 22-29 ms.

(`benchmarks/README.md` has the effect on a whole training step.) So on the CPU in reduced precision,
and only while the score matrix stays small, attention is computed as softmax(q k^T / sqrt(d)) v with
explicit matmuls; everywhere else it is SDPA. Both give the same result up to rounding (tested). The
explicit path's softmax runs in bf16, as autocast leaves it: 1.4-1.7x the error of SDPA's kernel against
an fp32 reference (a review's probe, Zen 5), with no effect seen on training; in fp32 the softmax made the
attention core 1.3x slower on the Zen 4 host (`benchmarks/README.md`, "Tried and not adopted").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention as _TimmAttention

# Above this many score entries per layer (batch x heads x queries x keys) the explicit path would hold
# too much memory for backward; SDPA's blockwise kernel is used instead. 2^26 bf16 entries = 128 MiB.
MAX_MATH_SCORES = 1 << 26

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def prefer_math(x: torch.Tensor, batch_heads: int, queries: int, keys: int) -> bool:
    """True where explicit matmuls beat SDPA: CPU tensors computed in bf16/fp16 with a small score matrix.
    `x` is any activation of the attention (its device and autocast state decide)."""
    return (
        x.device.type == "cpu"
        and _compute_dtype(x) in _LOW_PRECISION
        and batch_heads * queries * keys <= MAX_MATH_SCORES
    )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Like `F.scaled_dot_product_attention` (no dropout): q (B, H, T, D), k and v (B, H, S, D) ->
    (B, H, T, D). `attn_mask` is boolean (True = may attend), broadcastable to (B, H, T, S); `is_causal`
    for T == S only (a cached step passes its mask: SDPA aligns a causal mask to the top left, the
    explicit path to the bottom right, and the two answers differed)."""
    B, H, T, D = q.shape
    S = k.shape[-2]
    if is_causal and T != S:
        raise ValueError(f"attend: is_causal with {T} queries and {S} keys; pass attn_mask instead")
    if not prefer_math(q, B * H, T, S):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    scores = (q * D**-0.5) @ k.transpose(-2, -1)  # (B, H, T, S)
    if is_causal:
        attn_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Attention(_TimmAttention):
    """timm's ViT attention (same parameters and state-dict keys), computed here with `attend`'s choice
    of kernel: SDPA, or explicit matmuls on the CPU in reduced precision. The forward is smapctl's own,
    so boolean masks mean "may attend" whatever timm's version does on its explicit path.

    `rows` (a slice of the sequence) returns only those rows of the output, as `forward(x)[:, rows]` but
    without the other rows' queries, attention rows and output projection: keys and values still come
    from every row. A tower's last block uses it for the rows its output keeps."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C), or (B, T, C) for the T rows of `rows`. `attn_mask` is boolean
        (True = may attend), broadcastable to (B, heads, queries, N)."""
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError("smapctl's Attention has no attention dropout")
        if rows is not None and is_causal:
            raise ValueError("Attention: `rows` with `is_causal` is not supported")
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        A = H * D
        if rows is None:
            xq = x
            # (B, N, 3 * H * D) -> q, k, v, each (B, H, N, D)
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=H).unbind(0)
        else:  # qkv's output features are q, k, v, each (heads, head_dim): split its weight
            w, b = self.qkv.weight, self.qkv.bias
            xq = x[:, rows]  # (B, T, C)
            q = F.linear(xq, w[:A], None if b is None else b[:A])  # (B, T, H * D)
            q = rearrange(q, "b t (h d) -> b h t d", h=H)  # (B, H, T, D)
            kv = F.linear(x, w[A:], None if b is None else b[A:])  # (B, N, 2 * H * D)
            k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=H).unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, T, D)
        out = self.norm(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, H * D)
        gate = getattr(self, "gate", None)  # the optional output gate of newer timm
        if gate is not None:
            out = out * gate(xq).sigmoid()
        return self.proj_drop(self.proj(out))
