"""CARD: the causal autoregressive + flow-matching generator over SMAP's continuous 1D latents (section 3.3).

A causal transformer reads [start, z_0 .. z_{K-2}] (teacher forcing; tokens counted from 0) and its output
at position i is the condition of the per-token flow head (`FlowHead`, eq. 6) that models token z_i. The
class enters every block through adaLN, as in DiT, rather than as a prefix token as in MAR.

Block design (our choice; the paper says only "adaptive normalization, following DiT"): a *parallel* block
with one LayerNorm modulated by a class-dependent (shift, scale) and one gate,

    h = LN(x) * (1 + scale(c)) + shift(c),     x = x + gate(c) * (attn(h) + mlp(h)),

i.e. attention 4 d^2 + MLP 8 d^2 + modulation 3 d^2 per block. The modulation starts at zero (adaLN-Zero),
so every block starts as the identity. Table 1's parameter counts rule out DiT's 6 d^2 modulation per block
(`smapctl/presets.py`), not the block's form: a sequential block sharing one 3 d^2 modulation would count
the same.

Semantic condition sharing (section 3.3): the class embedding starts as a copy of the tokenizer's trained
`ClassEmbedding` (`train/generator.py`'s `build_generator`), followed by a trainable projection to the
width. The copy trains with the generator unless `freeze_class_embed` keeps it as the tokenizer learned it
(the paper's "directly reuse" does not say which).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from einops import repeat
from timm.layers import Mlp
from torch import nn

from smapctl.config import check, check_mlp_ratio
from smapctl.models.batching import expand_batch
from smapctl.models.class_embed import ClassCondition, ClassEmbedding
from smapctl.models.few_rows import use_few_rows_linears
from smapctl.models.flow_head import FLOW_STEPS, FlowHead, FlowHeadConfig, SamplingMethod
from smapctl.models.kv_attention import CausalSelfAttention, CFGSchedule, KVCache, guidance_schedule


@dataclass
class CARDConfig:
    """Architecture of a CARD generator; the defaults are CARD-B on SMAP(KL)-B-128 latents."""

    kind: Literal["card"] = "card"
    num_tokens: int = 128  # K
    token_dim: int = 16  # C
    num_classes: int = 1000
    class_dim: int = 768  # width of the (shared) class embedding table
    width: int = 768
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    head_depth: int = 6
    head_width: int = 1024
    class_dropout: float = 0.1  # labels replaced by the null class in training (for CFG)
    diffusion_batch_mul: int = 4  # noise draws per token in training, as in MAR
    freeze_class_embed: bool = False

    def __post_init__(self):
        for name in ("num_tokens", "token_dim", "num_classes", "class_dim", "width", "depth"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("head_depth", "head_width", "diffusion_batch_mul"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(self.num_heads > 0 and self.width % self.num_heads == 0, "num_heads", "must divide width")
        check_mlp_ratio(self.mlp_ratio, self.width)  # (CARDBlock's MLP has int(width * mlp_ratio) units)
        check(0.0 <= self.class_dropout < 1.0, "class_dropout", "must be in [0, 1)")

    @property
    def head_config(self) -> FlowHeadConfig:
        """The flow head's own config (`FlowHead`): per-token, conditioned on the transformer's output."""
        return FlowHeadConfig(
            token_dim=self.token_dim, cond_dim=self.width, width=self.head_width, depth=self.head_depth
        )


@dataclass
class CARDOutput:
    loss: torch.Tensor  # scalar flow-matching loss
    z: torch.Tensor  # (B, K, W) the transformer outputs that condition the flow head


class CARDBlock(nn.Module):
    """Parallel causal block with adaLN-Zero: x + gate * (attn(h) + mlp(h)), h = modulate(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CausalSelfAttention(width, num_heads, qkv_bias=True, proj_bias=True)
        mlp = Mlp(width, int(width * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.mlp = use_few_rows_linears(mlp)  # the KV-cached decode step runs it on a few rows
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x (B, T, W), mod (B, 3W) = self.modulation(c) -> (B, T, W)."""
        shift, scale, gate = mod[:, None].chunk(3, dim=-1)  # each (B, 1, W)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * (self.attn(h, cache, layer) + self.mlp(h))


class CARD(nn.Module):
    """Causal transformer + flow head. `forward` is the training loss, `sample` generates latents."""

    def __init__(self, cfg: CARDConfig, class_embed: ClassEmbedding | None = None):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.class_cond = ClassCondition(
            cfg.num_classes, cfg.class_dim, W, class_embed, cfg.freeze_class_embed
        )
        self.start_token = nn.Parameter(torch.zeros(1, 1, W))
        self.token_proj = nn.Linear(cfg.token_dim, W)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, W))
        self.blocks = nn.ModuleList(CARDBlock(W, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W, eps=1e-6)
        self.head = FlowHead(cfg.head_config)  # initialises itself
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The class table is left alone: shared, it carries what the tokenizer learned.
        for module in (self.class_cond.proj, self.token_proj, self.blocks):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.start_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        # adaLN-Zero (DiT): zero modulation gives gate = 0, so every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)

    # ----------------------------------------------------------------------------- transformer

    def modulations(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """labels (B,) -> each block's adaLN parameters (B, 3W); constant over positions, so computed once."""
        c = self.class_cond(labels)  # (B, W)
        return [block.modulation(c) for block in self.blocks]

    def embed_inputs(self, tokens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The transformer inputs at positions lo .. hi-1: position 0 is the start token, position p >= 1
        is token p-1. tokens (B, >= hi-1, C) -> (B, hi - lo, W)."""
        x = self.token_proj(tokens[:, max(lo - 1, 0) : hi - 1])  # (B, hi - max(lo, 1), W)
        if lo == 0:
            x = torch.cat([expand_batch(self.start_token, tokens.shape[0]).to(x.dtype), x], dim=1)
        return x + self.pos_embed[:, lo:hi]

    def transformer(
        self, x: torch.Tensor, mods: list[torch.Tensor], cache: KVCache | None = None
    ) -> torch.Tensor:
        """x (B, T, W) inputs at positions cache.length .. (or 0 ..) -> outputs z (B, T, W)."""
        for i, (block, mod) in enumerate(zip(self.blocks, mods, strict=True)):
            x = block(x, mod, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    # -------------------------------------------------------------------------------- training

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> CARDOutput:
        """tokens (B, K, C) SMAP latents, labels (B,) -> CARDOutput with the flow-matching loss."""
        K = self.cfg.num_tokens
        check(
            tokens.shape[1:] == (K, self.cfg.token_dim), "tokens", f"expected (B, {K}, {self.cfg.token_dim})"
        )
        if self.training:
            labels = self.class_cond.drop(labels, self.cfg.class_dropout, generator)
        z = self.transformer(self.embed_inputs(tokens, 0, K), self.modulations(labels))  # (B, K, W)
        # Each token is a separate flow-matching problem; draw `diffusion_batch_mul` noises per token.
        m = self.cfg.diffusion_batch_mul
        loss = self.head(
            repeat(tokens, "b k c -> (m b k) c", m=m), repeat(z, "b k w -> (m b k) w", m=m), generator
        )
        return CARDOutput(loss=loss, z=z)

    # -------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        cfg_schedule: CFGSchedule = "constant",
        temperature: float = 1.0,
        steps: int = FLOW_STEPS,
        method: SamplingMethod = "euler",
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> latents (B, k, C), k = num_tokens (default K); any prefix length 0..K works.

        Token i: the transformer output at position i conditions `steps` flow steps of the head for the
        whole batch at once. With cfg_scale != 1 the conditional and null-class rows run batched and
        their velocities are combined (guidance scale per position from `cfg_schedule`). With the KV
        cache each step feeds one position; without, the whole prefix is re-run (same result, slower).
        `on_step()` is called as each token is drawn (section 3.3: one at a time, minutes for CARD-B on a
        CPU), for a progress bar; it draws no random numbers.
        """
        K = self.cfg.num_tokens
        k = K if num_tokens is None else num_tokens
        check(0 <= k <= K, "num_tokens", f"must be in 0..{K}, got {k}")
        B = labels.shape[0]
        guided = cfg_scale != 1.0
        mods = self.modulations(self.class_cond.with_null(labels) if guided else labels)
        scales = guidance_schedule(cfg_scale, cfg_schedule, K)
        dtype = self.pos_embed.dtype
        tokens = torch.zeros(B, k, self.cfg.token_dim, device=labels.device, dtype=dtype)
        cache = None
        if use_kv_cache:
            R, W, H = mods[0].shape[0], self.cfg.width, self.cfg.num_heads
            kv_dtype = KVCache.storage_dtype(labels.device, dtype)
            cache = KVCache(len(self.blocks), R, H, k, W // H, device=labels.device, dtype=kv_dtype)
        for i in range(k):
            # Inputs at the new position only (cached) or at every position so far (uncached).
            x = self.embed_inputs(tokens, i if use_kv_cache else 0, i + 1)
            z = self.transformer(torch.cat([x, x]) if guided else x, mods, cache)[:, -1]  # (R, W)
            scale = scales[i] if guided else None
            tokens[:, i] = self.head.sample(
                z, steps, cfg_scale=scale, temperature=temperature, method=method, generator=generator
            )
            if on_step is not None:
                on_step()
        return tokens
