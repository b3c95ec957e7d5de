"""A LlamaGen-style discrete autoregressive GPT over SMAP-VQ token indices (paper section 4.1, appendix A).

Sequence: [class token, e(i_0) .. e(i_{K-2})] (teacher forcing; tokens counted from 0); the output at
position p predicts index i_p. The class token is the class embedding (the tokenizer's shared
`ClassEmbedding` or our own) projected to the width.
Blocks are Llama's: pre-RMSNorm, causal attention without biases, SwiGLU MLP (hidden 2/3 * 4d rounded up
to a multiple of 256), and 1D rotary position embeddings on queries and keys (no learned positions).
Sampling uses a KV cache (prefill the class token, then decode one token at a time), classifier-free
guidance with conditional and null-class rows batched, and temperature / top-k / top-p.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import repeat
from timm.layers import SwiGLU
from torch import nn

from smapctl.config import check
from smapctl.models.class_embed import ClassCondition, ClassEmbedding
from smapctl.models.few_rows import use_few_rows_linears
from smapctl.models.kv_attention import (
    CausalSelfAttention,
    CFGSchedule,
    KVCache,
    RotaryEmbedding,
    guidance_schedule,
)


@dataclass
class LlamaGenConfig:
    """Architecture of the discrete AR generator; the defaults are LlamaGen-B on SMAP-VQ-128 indices."""

    kind: Literal["llamagen"] = "llamagen"
    vocab_size: int = 8192
    num_tokens: int = 128  # K
    num_classes: int = 1000
    class_dim: int = 768
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_multiple_of: int = 256  # SwiGLU hidden width = 8/3 * width rounded up to this (as in Llama)
    rope_base: float = 10000.0
    class_dropout: float = 0.1
    freeze_class_embed: bool = False
    # Training-time dropout, as LlamaGen's class-conditional training (`--dropout-p`, `--token-dropout-p`,
    # both 0.1 there; recipes/llamagen_3b.yaml): `dropout` on the attention and MLP outputs before each
    # residual add, `token_dropout` on the input sequence (class token and token embeddings).
    dropout: float = 0.0
    token_dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "num_tokens", "num_classes", "class_dim", "width", "depth"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(self.num_heads > 0 and self.width % self.num_heads == 0, "num_heads", "must divide width")
        check((self.width // self.num_heads) % 2 == 0, "num_heads", "width / num_heads must be even (RoPE)")
        check(self.mlp_multiple_of > 0, "mlp_multiple_of", "must be a positive integer")
        # base^(-2i/d) are RoPE's frequencies: 0 or less gives NaN tables, which attention hides (no warning).
        check(math.isfinite(self.rope_base) and self.rope_base > 1, "rope_base", "must be a number above 1")
        for name in ("class_dropout", "dropout", "token_dropout"):
            check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")

    @property
    def mlp_hidden(self) -> int:
        h = int(2 * 4 * self.width / 3)
        return -(-h // self.mlp_multiple_of) * self.mlp_multiple_of


@dataclass
class LlamaGenOutput:
    loss: torch.Tensor  # scalar next-token cross-entropy
    logits: torch.Tensor  # (B, K, V)


class LlamaBlock(nn.Module):
    """Pre-norm block: x + drop(attn(RMSNorm(x))), then x + drop(SwiGLU(RMSNorm(x)))."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=1e-5)
        self.attn = CausalSelfAttention(cfg.width, cfg.num_heads)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=1e-5)
        # The KV-cached decode step runs it on a few rows: see few_rows.py.
        self.mlp = use_few_rows_linears(SwiGLU(cfg.width, cfg.mlp_hidden, bias=False))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x (B, T, W) -> (B, T, W)."""
        x = x + self.drop(self.attn(self.attn_norm(x), cache, layer, rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> the same with everything outside the top-k / top-p (nucleus) set at -inf.

    top_k = 0 and top_p = 1.0 disable the respective filter; the most likely token always survives.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        # The top token always stays: a p below float32's smallest (1e-320) reads as 0 and would drop it too.
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class LlamaGen(nn.Module):
    """Class-conditional GPT over token indices: `forward` is the loss, `sample` generates indices."""

    def __init__(self, cfg: LlamaGenConfig, class_embed: ClassEmbedding | None = None):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.class_cond = ClassCondition(
            cfg.num_classes, cfg.class_dim, W, class_embed, cfg.freeze_class_embed
        )
        self.tok_embed = nn.Embedding(cfg.vocab_size, W)
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.rope = RotaryEmbedding(W // cfg.num_heads, cfg.num_tokens, cfg.rope_base)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(W, eps=1e-5)
        self.output = nn.Linear(W, cfg.vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # LlamaGen: N(0, 0.02) everywhere, the output layer at zero (uniform first predictions).
        for module in (self.class_cond.proj, self.tok_embed, self.blocks):
            for m in module.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)

    def embed_inputs(self, indices: torch.Tensor, cond: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Inputs at positions lo .. hi-1 (position 0: class token, p >= 1: index p-1).

        indices (B, >= hi-1), cond (R, W) with R = B, or 2B for guidance (the token rows are repeated)
        -> (R, hi - lo, W).
        """
        x = self.tok_embed(indices[:, max(lo - 1, 0) : hi - 1])  # (B, n, W)
        x = repeat(x, "b n w -> (r b) n w", r=cond.shape[0] // indices.shape[0])
        if lo == 0:
            x = torch.cat([cond[:, None].to(x.dtype), x], dim=1)
        return x

    def transformer(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, W) at positions cache.length .. (or 0 ..) -> normed hidden states (B, T, W)."""
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def forward(
        self, indices: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> LlamaGenOutput:
        """indices (B, K) int64, labels (B,) -> LlamaGenOutput with the next-token cross-entropy."""
        K = self.cfg.num_tokens
        check(indices.shape[1] == K, "indices", f"expected (B, {K}), got {tuple(indices.shape)}")
        if self.training:
            labels = self.class_cond.drop(labels, self.cfg.class_dropout, generator)
        x = self.tok_drop(self.embed_inputs(indices, self.class_cond(labels), 0, K))  # (B, K, W)
        logits = self.output(self.transformer(x))  # (B, K, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), indices.flatten())
        return LlamaGenOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        cfg_schedule: CFGSchedule = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> indices (B, k) int64, k = num_tokens (default K).

        With cfg_scale != 1, conditional and null-class rows run batched and the logits combine as
        u + s * (c - u) before temperature, top-k and top-p filtering. With the KV cache the class token
        is prefilled and each step decodes one token; without, the whole prefix is re-run each step.
        `on_step()` is called as each token is drawn (one at a time, appendix A), for a progress bar; it
        draws no random numbers.
        """
        K = self.cfg.num_tokens
        k = K if num_tokens is None else num_tokens
        check(0 <= k <= K, "num_tokens", f"must be in 0..{K}, got {k}")
        check(temperature > 0, "temperature", "must be positive")
        check(0 < top_p <= 1, "top_p", "must be in (0, 1]")
        B = labels.shape[0]
        guided = cfg_scale != 1.0
        cond = self.class_cond(self.class_cond.with_null(labels) if guided else labels)  # (R, W)
        scales = guidance_schedule(cfg_scale, cfg_schedule, K)
        indices = torch.zeros(B, k, dtype=torch.long, device=labels.device)
        cache = None
        if use_kv_cache:
            W, H = self.cfg.width, self.cfg.num_heads
            dtype = KVCache.storage_dtype(labels.device, self.tok_embed.weight.dtype)
            cache = KVCache(len(self.blocks), cond.shape[0], H, k, W // H, device=labels.device, dtype=dtype)
        for i in range(k):
            x = self.embed_inputs(indices, cond, i if use_kv_cache else 0, i + 1)
            logits = self.output(self.transformer(x, cache)[:, -1]).float()  # (R, V)
            if guided:
                c, u = logits.chunk(2)
                logits = u + scales[i] * (c - u)
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            indices[:, i] = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if on_step is not None:
                on_step()
        return indices
