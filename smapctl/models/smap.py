"""SMAP: the semantic-aware prefix tokenizer (paper section 3.2, eq. 3-5).

Encoder sequence (eq. 3):  [patches + pos, class embedding, latent queries]  -> keep the K query outputs.
Decoder sequence (eq. 4):  [mask tokens + pos, class embedding, latents[:k] + pos] -> keep the mask outputs.
Tail token dropping (eq. 5): in training, each sample keeps a prefix of k ~ U{0..K} latents, so the
decoder learns to reconstruct from any prefix, k = 0 (class embedding only) included.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, k, C); labels are (B,) int64 class ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from einops import rearrange
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from smapctl.config import check, check_mlp_ratio
from smapctl.models.attention import Attention
from smapctl.models.batching import expand_batch
from smapctl.models.class_embed import ClassEmbedding
from smapctl.models.regularizers import (
    KLConfig,
    RegularizerOutput,
    SoftVQConfig,
    VQConfig,
    build_regularizer,
)


@dataclass
class SMAPConfig:
    """Everything that determines the tokenizer's architecture; stored in every checkpoint."""

    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 128
    num_classes: int = 1000
    # False gives the TiTok baseline: no class token in either tower.
    class_condition: bool = True
    regularizer: VQConfig | KLConfig | SoftVQConfig = field(default_factory=KLConfig)
    # How the kept prefix length k is drawn in training (eq. 5): "uniform" over 0..K as in the paper,
    # or "none" for the "w/o truncation" ablation of table 3. Other schedules (issue 11, compared in
    # recipes/mini/RESULTS.md): "full_mix" keeps all K with probability `tail_drop_full_prob`, else
    # uniform; "pow2" is uniform over {0, 1, 2, 4, ..., K} (FlexTok's budgets, plus 0 and K);
    # "tail_weighted" has P(k) proportional to 1 / (K + 1 - k), the inverse of how often uniform
    # dropping trains the k-th token, so late tokens are trained more often.
    tail_drop: Literal["uniform", "none", "full_mix", "pow2", "tail_weighted"] = "uniform"
    # One k per sample (the default) or one k shared by the whole batch.
    tail_drop_per_sample: bool = True
    # "full_mix" only: the probability of keeping the full budget K.
    tail_drop_full_prob: float = 0.5

    def __post_init__(self):
        for name in ("image_size", "patch_size", "enc_width", "enc_depth", "dec_width", "dec_depth"):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(
            self.enc_heads > 0 and self.enc_width % self.enc_heads == 0, "enc_heads", "must divide enc_width"
        )
        check(
            self.dec_heads > 0 and self.dec_width % self.dec_heads == 0, "dec_heads", "must divide dec_width"
        )
        check(self.image_size % self.patch_size == 0, "patch_size", "must divide image_size")
        check_mlp_ratio(self.mlp_ratio, min(self.enc_width, self.dec_width))  # (the narrower tower's)
        check(self.num_latent_tokens > 0, "num_latent_tokens", "must be a positive integer")
        check(self.num_classes > 0, "num_classes", "must be a positive integer")
        check(0.0 <= self.tail_drop_full_prob <= 1.0, "tail_drop_full_prob", "must be in [0, 1]")
        if isinstance(self.regularizer, SoftVQConfig):
            check(
                self.num_latent_tokens % self.regularizer.num_codebooks == 0,
                "num_latent_tokens",
                f"must be divisible by regularizer.num_codebooks ({self.regularizer.num_codebooks})",
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.regularizer.token_dim

    @property
    def discrete(self) -> bool:
        return isinstance(self.regularizer, VQConfig)


@dataclass
class SMAPOutput:
    recon: torch.Tensor  # (B, 3, H, W)
    reg: RegularizerOutput  # latents, indices, regularizer loss and statistics
    keep: torch.Tensor  # (B,) int64, the prefix length each sample was decoded from


def _blocks(width: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, attn_layer=Attention) for _ in range(depth)
    )


def _run(
    blocks: nn.ModuleList, x: torch.Tensor, rows: slice, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The blocks over x (B, L, W) -> the output's `rows` only. The last block computes just those rows:
    the others' queries, attention rows, projection and MLP would feed nothing (keys and values still
    come from every row). Equal to running every block whole and slicing; on SMAP-B this skips 3.5% of
    the FLOPs of a training step."""
    *first, last = blocks
    for block in first:
        x = block(x, attn_mask=attn_mask)
    h = x[:, rows] + last.drop_path1(last.ls1(last.attn(last.norm1(x), attn_mask=attn_mask, rows=rows)))
    return h + last.drop_path2(last.ls2(last.mlp(last.norm2(h))))


class SMAPEncoder(nn.Module):
    """Eq. 3: ViT over [patches, class embedding, latent queries]; returns the K query outputs."""

    def __init__(self, cfg: SMAPConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        W = cfg.enc_width
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, W)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, W))
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, W))
        self.blocks = _blocks(W, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(W)
        self.to_latent = nn.Linear(W, out_dim)

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """images (B, 3, H, W), cond (B, W) or None -> pre-regularizer latents (B, K, out_dim)."""
        B = images.shape[0]
        x = self.patch_embed(images) + self.pos_embed  # (B, N, W)
        parts = [x] if cond is None else [x, cond[:, None]]
        parts.append(expand_batch(self.queries, B))
        x = _run(self.blocks, torch.cat(parts, dim=1), rows=slice(-self.cfg.num_latent_tokens, None))
        x = self.norm(x)  # (B, K, W)
        return self.to_latent(x)


class SMAPDecoder(nn.Module):
    """Eq. 4-5: ViT over [mask tokens, class embedding, latent prefix]; pixels come from the mask tokens."""

    def __init__(self, cfg: SMAPConfig):
        super().__init__()
        self.cfg = cfg
        W, p = cfg.dec_width, cfg.patch_size
        self.from_latent = nn.Linear(cfg.token_dim, W)
        self.latent_pos = nn.Parameter(torch.zeros(1, cfg.num_latent_tokens, W))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, W))
        self.blocks = _blocks(W, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(W)
        self.to_pixels = nn.Linear(W, p * p * 3)

    def forward(
        self, z: torch.Tensor, cond: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z (B, k, C) latent prefix, cond (B, W) or None -> images (B, 3, H, W).

        `keep` (B,) optionally masks latents at positions >= keep[b] out of every attention (the
        per-sample tail dropping of eq. 5); the result equals decoding the truncated z[b, :keep[b]].
        """
        B, k, _ = z.shape
        N = self.cfg.num_patches
        masks = self.mask_token.expand(B, N, -1) + self.pos_embed  # (B, N, W)
        latents = self.from_latent(z) + self.latent_pos[:, :k]  # (B, k, W)
        parts = [masks] if cond is None else [masks, cond[:, None]]
        x = torch.cat([*parts, latents], dim=1)  # (B, L, W), L = N [+1] + k
        attn_mask = None
        if keep is not None:
            # Boolean key mask (B, 1, 1, L): True = may be attended to.
            pos = torch.arange(k, device=z.device)
            latent_ok = pos[None, :] < keep[:, None]  # (B, k)
            prefix_ok = latent_ok.new_ones(B, x.shape[1] - k)
            attn_mask = torch.cat([prefix_ok, latent_ok], dim=1)[:, None, None, :]
        x = self.norm(_run(self.blocks, x, rows=slice(0, N), attn_mask=attn_mask))  # (B, N, W)
        x = self.to_pixels(x)  # (B, N, p*p*3)
        side = self.cfg.image_size // self.cfg.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=self.cfg.patch_size, c=3)


class SMAP(nn.Module):
    """The tokenizer: `encode` images to latents, `decode` any prefix of them back to images."""

    def __init__(self, cfg: SMAPConfig):
        super().__init__()
        self.cfg = cfg
        self.regularizer = build_regularizer(cfg.regularizer)
        self.encoder: SMAPEncoder | None = SMAPEncoder(cfg, self.regularizer.in_dim)
        self.decoder: SMAPDecoder | None = SMAPDecoder(cfg)
        self.class_embed = None
        if cfg.class_condition:
            # One table shared by both towers (appendix A); a projection fits it to a wider decoder.
            self.class_embed = ClassEmbedding(cfg.num_classes, cfg.enc_width)
            self.dec_class_proj = (
                nn.Identity() if cfg.dec_width == cfg.enc_width else nn.Linear(cfg.enc_width, cfg.dec_width)
            )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # ViT-style: truncated-normal linears and learned embeddings, unit LayerNorms. The patch
        # embedding (a conv) keeps PyTorch's default init, as in timm's ViT. A model built on the meta
        # device is about to receive loaded weights: nothing to initialise.
        if self.decoder.pos_embed.is_meta:
            return
        for name, p in self.named_parameters():
            if name.endswith(("pos_embed", "latent_pos", "queries", "mask_token")):
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def drop(self, *towers: Literal["encoder", "decoder"]) -> None:
        """Let the named towers go with their weights, in place. Generator training keeps only what it
        uses once its tokens are cached: the decoder (and the class table, the regularizer's codes) in
        the process that draws the previews, neither tower in the others (`train/generator.py`)."""
        for name in towers:
            setattr(self, name, None)

    def _tower(self, name: str) -> nn.Module:
        tower = getattr(self, name)
        if tower is None:  # said here, not as a None call's "'NoneType' object is not callable"
            raise RuntimeError(
                f"this SMAP's {name} was let go (SMAP.drop): it cannot {name.removesuffix('r')} any more"
            )
        return tower

    def _cond(self, labels: torch.Tensor) -> torch.Tensor | None:
        return None if self.class_embed is None else self.class_embed(labels)

    def encode(self, images: torch.Tensor, labels: torch.Tensor) -> RegularizerOutput:
        """images (B, 3, H, W) in [-1, 1], labels (B,) -> RegularizerOutput with z (B, K, C)."""
        return self.regularizer(self._tower("encoder")(images, self._cond(labels)))

    def decode(self, z: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, k, C) for any k in 0..K, labels (B,) -> images (B, 3, H, W)."""
        check(z.shape[1] <= self.cfg.num_latent_tokens, "prefix", f"at most {self.cfg.num_latent_tokens}")
        cond = self._cond(labels)
        if cond is not None:
            cond = self.dec_class_proj(cond)
        return self._tower("decoder")(z, cond, keep)

    def decode_indices(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """VQ only: indices (B, k) -> images (B, 3, H, W)."""
        return self.decode(self.regularizer.lookup(indices), labels)

    @torch.compiler.disable  # drawn eagerly, from the CPU's stream, in compiled training too
    def sample_keep(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Eq. 5: the prefix length k in 0..K kept by each sample (or one k for the batch) -> (batch,) int64.

        Drawn as `cfg.tail_drop` says: "uniform" k ~ U{0..K} (the paper); "none" always K; "full_mix" K
        with probability p = `tail_drop_full_prob`, else U{0..K}; "pow2" uniform over {0} + the powers of
        two below K + {K}; "tail_weighted" P(k) = (1 / (K + 1 - k)) / H_{K+1}. Under uniform dropping the
        token at position j is kept with probability (K - j) / (K + 1), so the last one in only 1 / (K + 1)
        of the samples; "tail_weighted" weights each k by the inverse of that rate for its newest token.
        """
        K = self.cfg.num_latent_tokens
        schedule = self.cfg.tail_drop
        if schedule == "none":
            return torch.full((batch,), K, dtype=torch.long, device=device)
        n = batch if self.cfg.tail_drop_per_sample else 1
        if schedule == "uniform":  # randint, not multinomial: the paper's random stream stays as it was
            keep = torch.randint(0, K + 1, (n,), generator=generator, device=device)
            return keep.expand(batch).contiguous()
        ks = torch.arange(K + 1, dtype=torch.float64)
        if schedule == "full_mix":
            p = self.cfg.tail_drop_full_prob
            weights = (1 - p) / (K + 1) + p * (ks == K).double()
        elif schedule == "pow2":
            k = ks.long()
            weights = ((k == 0) | (k == K) | ((k & (k - 1)) == 0)).double()
        else:  # "tail_weighted"
            weights = 1.0 / (K + 1 - ks)
        keep = torch.multinomial(weights.to(device), n, replacement=True, generator=generator)
        return keep.expand(batch).contiguous()

    @staticmethod
    @torch.compiler.disable
    def _longest_prefix(keep: torch.Tensor) -> tuple[int, bool]:
        """The longest prefix length in `keep`, and whether every sample keeps it. Read eagerly: it decides
        the decoder's shapes, so compiled training breaks its graph here either way (a recompile per
        length), and traced, the `.item()` made torch print a 13-line "Graph break from `Tensor.item()`"
        warning whose advice (capture_scalar_outputs) would make the shapes data-dependent."""
        longest = int(keep.max())
        return longest, bool((keep == longest).all())

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
    ) -> SMAPOutput:
        """Encode, regularize, drop the tail (training) and decode. Returns recon (B, 3, H, W)."""
        reg = self.encode(images, labels)
        if keep is None:
            # Drawn on the host (the CPU's random stream): the prefix lengths decide the decoder's shapes,
            # and reading them from a GPU would make the host wait for the encoder mid-step.
            B, K = reg.z.shape[:2]
            cpu = torch.device("cpu")
            keep = self.sample_keep(B, cpu) if self.training else torch.full((B,), K, dtype=torch.long)
        # Only the longest kept prefix takes part; shorter ones are masked (costs no more than slicing).
        longest, uniform = self._longest_prefix(keep)
        keep = keep.to(images.device, non_blocking=True)
        z = reg.z[:, :longest]
        mask = None if uniform else keep
        recon = self.decode(z, labels, keep=mask)
        return SMAPOutput(recon=recon, reg=reg, keep=keep)
