"""MaskGIT-ViT: a bidirectional masked-token generator over SMAP-VQ indices (paper table 7, 177M, 8 steps).

Sequence: [class token, e(i_1) .. e(i_K)] + learned positions, where masked positions hold the [MASK]
embedding (id `vocab_size`). The class token is the (shared or own) class embedding projected to the width.
Training masks a fraction r = cos(pi/2 * u), u ~ U(0, 1) of the tokens (at least one) and takes the
cross-entropy on the masked positions. Logits come from MaskGIT's MLM head (dense, GELU, LayerNorm) against
the tied token embeddings plus a bias.

Sampling is iterative parallel decoding: at each step every masked position draws a token, and all but
the least confident (log-probability plus annealed Gumbel noise) are fixed; how many stay masked follows
the cosine schedule, so after the last step every position has been unmasked exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from smapctl.config import check, check_mlp_ratio
from smapctl.models.attention import Attention
from smapctl.models.class_embed import ClassCondition, ClassEmbedding
from smapctl.models.kv_attention import CFGSchedule

# MaskGIT's sampling (Chang et al. 2022): 8 decoding steps (also the paper's table 7), and the Gumbel
# noise on the confidences that choose which tokens stay masked starts at temperature 4.5.
DECODING_STEPS = 8
CHOICE_TEMPERATURE = 4.5


@dataclass
class MaskGITConfig:
    """Architecture of the masked generator; the defaults are MaskGIT-ViT on SMAP-VQ-128 indices."""

    kind: Literal["maskgit"] = "maskgit"
    vocab_size: int = 8192
    num_tokens: int = 128  # K
    num_classes: int = 1000
    class_dim: int = 768
    width: int = 768
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    freeze_class_embed: bool = False
    # MaskGIT's training regularisers (0.1 each in its class-conditional recipe; recipes/maskgit_l_64.yaml):
    # `dropout` on the input sequence and inside every block (timm's `proj_drop`: after the attention
    # projection and in the MLP; attention-probability dropout is not implemented), and label smoothing
    # of the masked-token cross-entropy.
    dropout: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "num_tokens", "num_classes", "class_dim", "width", "depth"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(self.num_heads > 0 and self.width % self.num_heads == 0, "num_heads", "must divide width")
        check_mlp_ratio(self.mlp_ratio, self.width)
        for name in ("class_dropout", "dropout", "label_smoothing"):
            check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")


@dataclass
class MaskGITOutput:
    loss: torch.Tensor  # scalar cross-entropy over the masked positions
    logits: torch.Tensor  # (B, K, V)
    mask: torch.Tensor  # (B, K) bool, True where the input was masked


def masked_counts(num_tokens: int, steps: int) -> list[int]:
    """How many of `num_tokens` positions are still masked after each decoding step (cosine schedule).

    Strictly decreasing, so every step fixes at least one position, and ends at 0; with more steps than
    tokens the list is shorter than `steps`.
    """
    counts, prev = [], num_tokens
    for t in range(steps):
        n = 0 if t == steps - 1 else math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        prev = max(0, min(n, prev - 1))
        counts.append(prev)
        if prev == 0:
            break
    return counts


def gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel samples -log(-log(u)), u ~ U(0, 1), kept finite."""
    u = torch.rand(shape, device=device, generator=generator).clamp_min(1e-20)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))


class MaskGIT(nn.Module):
    """Bidirectional transformer over masked token indices; `forward` is the loss, `sample` decodes."""

    def __init__(self, cfg: MaskGITConfig, class_embed: ClassEmbedding | None = None):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.class_cond = ClassCondition(
            cfg.num_classes, cfg.class_dim, W, class_embed, cfg.freeze_class_embed
        )
        self.tok_embed = nn.Embedding(cfg.vocab_size + 1, W)  # the last id is [MASK]
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, W))  # position 0: class token
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                W,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=True,
                proj_drop=cfg.dropout,
                attn_layer=Attention,
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(W)
        self.mlm = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.LayerNorm(W))
        self.logit_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.initialize_weights()

    @property
    def mask_id(self) -> int:
        return self.cfg.vocab_size

    def initialize_weights(self) -> None:
        # BERT/MaskGIT: truncated normal (0.02) for linears and embeddings; the class table is left alone.
        trunc_normal_(self.tok_embed.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for module in (self.class_cond.proj, self.blocks, self.mlm):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def logits(self, indices: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """indices (B, K) with [MASK] ids, cond (B, W) class tokens -> logits (B, K, V)."""
        x = torch.cat([cond[:, None], self.tok_embed(indices)], dim=1) + self.pos_embed  # (B, K+1, W)
        x = self.embed_drop(x)
        for block in self.blocks:
            x = block(x)
        h = self.mlm(self.norm(x[:, 1:]))  # (B, K, W)
        return h @ self.tok_embed.weight[: self.cfg.vocab_size].T + self.logit_bias

    def draw_mask(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """(B, K) bool: ceil(cos(pi/2 * u) * K) random positions per row, u ~ U(0, 1), at least one."""
        K = self.cfg.num_tokens
        u = torch.rand(batch, device=device, generator=generator)
        n = torch.ceil(torch.cos(math.pi / 2 * u) * K).clamp(1, K)  # (B,)
        rank = torch.rand(batch, K, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
        return rank < n[:, None]

    def forward(
        self, indices: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> MaskGITOutput:
        """indices (B, K) int64, labels (B,) -> MaskGITOutput with the masked-token cross-entropy."""
        K = self.cfg.num_tokens
        check(indices.shape[1] == K, "indices", f"expected (B, {K}), got {tuple(indices.shape)}")
        if self.training:
            labels = self.class_cond.drop(labels, self.cfg.class_dropout, generator)
        mask = self.draw_mask(indices.shape[0], indices.device, generator)
        logits = self.logits(indices.masked_fill(mask, self.mask_id), self.class_cond(labels))
        # The unmasked positions are ignored rather than indexed out: a boolean index would make the host
        # wait for the device twice (the number of masked positions decides the shape).
        targets = indices.masked_fill(~mask, -100)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
            label_smoothing=self.cfg.label_smoothing,
        )
        return MaskGITOutput(loss=loss, logits=logits, mask=mask)

    @torch.no_grad()
    def decode_steps(
        self,
        labels: torch.Tensor,
        steps: int = DECODING_STEPS,
        cfg_scale: float = 1.0,
        cfg_schedule: CFGSchedule = "constant",
        temperature: float = 1.0,
        choice_temperature: float = CHOICE_TEMPERATURE,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the (B, k) indices after each decoding step ([MASK] = `mask_id` where not yet decoded).

        Positions >= k stay [MASK] in the model input throughout, so a prefix is drawn with the tail
        unknown. With cfg_scale != 1 the conditional and null-class rows run batched and the logits
        combine as u + s * (c - u); the "linear" schedule grows s with the fraction of tokens fixed after
        the step (as in MAR). The Gumbel noise on the confidences is annealed by (1 - (t + 1) / steps).
        """
        K = self.cfg.num_tokens
        k = K if num_tokens is None else num_tokens
        check(0 <= k <= K, "num_tokens", f"must be in 0..{K}, got {k}")
        check(steps > 0, "steps", "must be a positive integer")
        check(temperature > 0, "temperature", "must be positive")
        check(cfg_schedule in ("constant", "linear"), "cfg_schedule", "expected 'constant' or 'linear'")
        B = labels.shape[0]
        guided = cfg_scale != 1.0
        cond = self.class_cond(self.class_cond.with_null(labels) if guided else labels)  # (R, W)
        indices = torch.full((B, K), self.mask_id, dtype=torch.long, device=labels.device)
        for t, n_masked in enumerate(masked_counts(k, steps) if k > 0 else []):
            logits = self.logits(torch.cat([indices, indices]) if guided else indices, cond)
            logits = logits[:, :k].float()  # (R, k, V)
            if guided:
                # Linear: by the fraction of the k tokens drawn that are fixed after this step. (Not of
                # K, as `guidance_schedule` for the AR models: a MaskGIT prefix is drawn in parallel, not
                # as the start of a full sample, so the full scale comes at its own last step.)
                s = cfg_scale if cfg_schedule == "constant" else 1 + (cfg_scale - 1) * (k - n_masked) / k
                c, u = logits.chunk(2)
                logits = u + s * (c - u)
            probs = (logits / temperature).softmax(dim=-1)  # (B, k, V)
            sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(B, k)
            confidence = probs.gather(-1, sampled[..., None])[..., 0].log()  # (B, k)
            anneal = choice_temperature * (1 - (t + 1) / steps)
            confidence = confidence + anneal * gumbel_noise(confidence.shape, labels.device, generator)
            masked = indices[:, :k] == self.mask_id
            # Fixed positions never compete; the n_masked least confident masked ones stay masked.
            confidence = confidence.masked_fill(~masked, float("inf"))
            stay = torch.zeros_like(masked).scatter(1, confidence.argsort(dim=1)[:, :n_masked], True)
            indices[:, :k] = torch.where(masked & ~stay, sampled, indices[:, :k])
            yield indices[:, :k].clone()

    def sample(
        self,
        labels: torch.Tensor,
        steps: int = DECODING_STEPS,
        cfg_scale: float = 1.0,
        cfg_schedule: CFGSchedule = "constant",
        temperature: float = 1.0,
        choice_temperature: float = CHOICE_TEMPERATURE,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> indices (B, k) int64, k = num_tokens (default K), after all decoding steps
        (`on_step()` after each of them, `len(masked_counts(k, steps))`: a progress bar's step)."""
        out = torch.zeros(labels.shape[0], 0, dtype=torch.long, device=labels.device)  # k = 0: no steps
        for state in self.decode_steps(
            labels, steps, cfg_scale, cfg_schedule, temperature, choice_temperature, num_tokens, generator
        ):
            out = state
            if on_step is not None:
                on_step()
        return out
