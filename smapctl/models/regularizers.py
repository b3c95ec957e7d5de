"""The unified latent regularization operator R(.) of SMAP (paper section 3.1, appendix B).

Three instantiations behind one interface: each takes the encoder's latent projections and returns a
`RegularizerOutput` with the latents the decoder sees, the indices where the tokens are discrete, the
weighted loss terms, and detached statistics (codebook usage and perplexity where there is a codebook).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from smapctl.config import check

# The token_dim message of the two quantizers, whose codes and inputs are l2-normalised.
NORMALISED_CHANNELS = (
    "must be at least 2: the codes are l2-normalised, and one channel normalises to -1 or +1 (two codes"
    " at most, whatever codebook_size)"
)


@dataclass
class VQConfig:
    """Nearest-neighbour vector quantization (eq. 7-8); codes and inputs are l2-normalised as in TiTok."""

    kind: Literal["vq"] = "vq"
    codebook_size: int = 8192
    token_dim: int = 64
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0

    def __post_init__(self):
        # One code would make every token the same (they carry nothing); 1 channel l2-normalises to -1 or
        # +1, so whatever codebook_size at most two codes differ (a 64-code VQ used 2: usage 3%).
        check(self.codebook_size > 1, "codebook_size", "must be at least 2 (one code carries nothing)")
        check(self.token_dim > 1, "token_dim", NORMALISED_CHANNELS)
        check(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")
        check(self.codebook_weight >= 0, "codebook_weight", "must be >= 0")


@dataclass
class KLConfig:
    """Diagonal-Gaussian posterior with reparameterised sampling (eq. 9) and a KL term to N(0, I)."""

    kind: Literal["kl"] = "kl"
    token_dim: int = 16
    kl_weight: float = 1e-6

    def __post_init__(self):
        check(self.token_dim > 0, "token_dim", "must be a positive integer")
        check(self.kl_weight >= 0, "kl_weight", "must be >= 0")


@dataclass
class SoftVQConfig:
    """Soft quantization (eq. 10-11): softmax over cosine similarities with temperature `temperature`.

    `num_codebooks` splits the token sequence into that many consecutive segments, each with its own
    codebook of `codebook_size // num_codebooks` entries. We read the paper's "four-level hierarchical
    codebook with total size 8192" as 4 codebooks x 2048 entries of dimension 16.
    """

    kind: Literal["softvq"] = "softvq"
    codebook_size: int = 8192
    num_codebooks: int = 4
    token_dim: int = 16
    temperature: float = 0.07
    entropy_weight: float = 0.01
    # SoftVQ's entropy loss takes its own, sharper softmax of the same similarities.
    entropy_temperature: float = 0.01

    def __post_init__(self):
        check(self.codebook_size > 0, "codebook_size", "must be a positive integer")
        check(self.num_codebooks > 0, "num_codebooks", "must be a positive integer")
        check(
            self.codebook_size % self.num_codebooks == 0,
            "codebook_size",
            f"must be divisible by num_codebooks ({self.num_codebooks})",
        )
        # As VQ's: one entry per codebook makes z_q that entry whatever the image; one channel leaves the
        # cosine similarities only -1 and +1, so a token's z_q takes one of two values.
        check(
            self.codebook_size >= 2 * self.num_codebooks,
            "codebook_size",
            f"must give each of the num_codebooks ({self.num_codebooks}) at least 2 entries (one carries"
            " nothing)",
        )
        check(self.temperature > 0, "temperature", "must be positive")
        check(self.token_dim > 1, "token_dim", NORMALISED_CHANNELS)
        check(self.entropy_weight >= 0, "entropy_weight", "must be >= 0")
        check(self.entropy_temperature > 0, "entropy_temperature", "must be positive")


RegularizerConfig = VQConfig | KLConfig | SoftVQConfig


@dataclass
class RegularizerOutput:
    z: torch.Tensor  # (B, K, C) latents handed to the decoder
    loss: torch.Tensor  # scalar, already weighted
    indices: torch.Tensor | None = None  # (B, K) int64 for VQ
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Of the (B, K) codes of a batch: the fraction of the codebook used, the perplexity of the code
    histogram, and the mean over the K token positions of the perplexity of the images' codes at that
    position (`position_perplexity`: 1 when every image has the same code there). The pooled perplexity
    misses a collapse onto one code per position (the same tokens for every image, a perplexity of K)."""
    # Not bincount, which on a GPU reads the indices' min and max to the host to size its output.
    flat = indices.flatten()
    counts = flat.new_zeros(codebook_size).scatter_add_(0, flat, torch.ones_like(flat)).float()
    B, K = indices.shape
    at = indices + torch.arange(K, device=indices.device) * codebook_size  # (position, code) pairs
    per_position = flat.new_zeros(K * codebook_size).scatter_add_(0, at.flatten(), torch.ones_like(flat))
    return {
        "usage": (counts > 0).float().mean(),
        "perplexity": _perplexity(counts),
        "position_perplexity": _perplexity(per_position.view(K, codebook_size).float()).mean(),
    }


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the histogram(s) `counts` (..., N)."""
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return (-(probs * probs.clamp_min(1e-10).log()).sum(-1)).exp()


def fp32(forward: Callable[..., RegularizerOutput]) -> Callable[..., RegularizerOutput]:
    """Run a regularizer's forward outside autocast (the forward makes its input fp32): under bf16
    autocast the code distances would be taken in bf16 (2% of an 8192-code VQ's choices differed from
    fp32's, near-ties; SoftVQ latents moved by up to 0.005 at an RMS of 0.15). The cost is a few small
    matmuls. On the meta device (shapes only; autocast has no meta backend) it runs as it is."""

    @functools.wraps(forward)
    def wrapped(self, h: torch.Tensor) -> RegularizerOutput:
        if h.device.type == "meta":
            return forward(self, h)
        with torch.autocast(h.device.type, enabled=False):
            return forward(self, h)

    return wrapped


class VectorQuantizer(nn.Module):
    """Eq. 7: z_q = argmin_c ||z - c||, with straight-through gradients and the VQ-VAE losses."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = cfg.token_dim
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.token_dim)
        nn.init.uniform_(self.codebook.weight, -1 / cfg.codebook_size, 1 / cfg.codebook_size)

    def codes(self) -> torch.Tensor:
        """The codebook (N, C) as the quantizer uses it: l2-normalised entries (unit vectors, as in TiTok)."""
        return F.normalize(self.codebook.weight, dim=-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, k) -> the exact (B, k, C) codes the decoder sees for them."""
        return F.embedding(indices, self.codes())

    @fp32
    def forward(self, h: torch.Tensor) -> RegularizerOutput:
        """h (B, K, C) -> quantized latents (B, K, C)."""
        z = F.normalize(h.float(), dim=-1)
        codes = self.codes()
        # For unit vectors, the nearest code is the one with the largest dot product.
        indices = torch.einsum("bkc,nc->bkn", z, codes).argmax(dim=-1)  # (B, K)
        z_q = F.embedding(indices, codes)
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        loss = self.cfg.commitment_weight * commitment + self.cfg.codebook_weight * codebook
        # Straight-through estimator, written so the value is exactly the code (z - z.detach() == 0).
        z_q = z_q.detach() + (z - z.detach())
        stats = {"commitment": commitment.detach(), "codebook": codebook.detach()}
        stats |= codebook_stats(indices, self.cfg.codebook_size)
        return RegularizerOutput(z=z_q.to(h.dtype), loss=loss, indices=indices, stats=stats)


class GaussianRegularizer(nn.Module):
    """Eq. 9: z = mu + sigma * eps; the KL to N(0, I) is summed over an image's K x C latent values and
    averaged over the images (nats per image), as in the SoftVQ codebase the paper trains SMAP with
    (section 4.1), so `kl_weight` 1e-6 weighs it as there, next to a per-pixel mean reconstruction loss.
    (Averaged over the tokens instead, it would be K times weaker, and weaker still as K grows.)"""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = 2 * cfg.token_dim
        self.sample_posterior = True

    def forward(self, h: torch.Tensor) -> RegularizerOutput:
        """h (B, K, 2C) -> sampled latents (B, K, C) in training, the posterior mean in eval."""
        # No `fp32` here: elementwise ops on the float32 copy stay float32 under autocast (no matmul).
        mean, logvar = h.float().chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training and self.sample_posterior:
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        else:
            z = mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum((1, 2)).mean()
        stats = {"kl": kl.detach(), "std": (0.5 * logvar).exp().mean().detach()}
        return RegularizerOutput(z=z.to(h.dtype), loss=self.cfg.kl_weight * kl, stats=stats)


class SoftVectorQuantizer(nn.Module):
    """Eq. 10-11: p = softmax(-d(z, c) / tau), z_q = sum_j p_j c_j, with an entropy loss.

    d is the cosine distance of l2-normalised vectors. The entropy loss asks each token to be
    confident (low per-token entropy) while the batch spreads over the codebook (high entropy of the
    mean assignment), as in SoftVQ-VAE's code (whose batch entropy pools the codebooks' assignments;
    here each codebook's is taken alone and the entropies averaged): on a sharper softmax of the same
    similarities (`entropy_temperature`), which are taken against the detached codebook, so the codes
    learn through z_q (the reconstruction) alone and the entropy loss moves the encoder.
    """

    def __init__(self, cfg: SoftVQConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = cfg.token_dim
        self.entries = cfg.codebook_size // cfg.num_codebooks
        self.codebooks = nn.Parameter(torch.randn(cfg.num_codebooks, self.entries, cfg.token_dim))

    def segment_of(self, num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
        """(K,) codebook id of each token position: K positions split into num_codebooks segments."""
        check(
            num_tokens % self.cfg.num_codebooks == 0,
            "num_latent_tokens",
            f"must be divisible by regularizer.num_codebooks ({self.cfg.num_codebooks})",
        )
        return torch.arange(num_tokens, device=device) // (num_tokens // self.cfg.num_codebooks)

    @fp32
    def forward(self, h: torch.Tensor) -> RegularizerOutput:
        """h (B, K, C) -> soft-quantized latents (B, K, C)."""
        B, K, _ = h.shape
        seg = self.segment_of(K, h.device)  # made on the device: a copy from the host would wait for it
        z = F.normalize(h.float(), dim=-1)
        codes = F.normalize(self.codebooks.float(), dim=-1)[seg]  # (K, N, C)
        cosine = torch.einsum("bkc,knc->bkn", z, codes.detach())
        probs = (cosine / self.cfg.temperature).softmax(dim=-1)  # (B, K, N)
        z_q = torch.einsum("bkn,knc->bkc", probs, codes)
        log_sharp = (cosine / self.cfg.entropy_temperature).log_softmax(dim=-1)
        sharp = log_sharp.exp()
        token_entropy = -(sharp * log_sharp).sum(-1).mean()
        mean_probs = rearrange(sharp, "b (s t) n -> s (b t) n", s=self.cfg.num_codebooks).mean(1)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-10).log()).sum(-1).mean()
        entropy_loss = token_entropy - batch_entropy
        # Codebook statistics of the hard assignment, pooled over the flat codebook (segment s's
        # entries are ids s * entries onwards), so perplexity and usage count every codebook's entries.
        hard = probs.argmax(-1) + seg * self.entries  # ids in the flat codebook
        stats = codebook_stats(hard, self.cfg.codebook_size)
        stats |= {"token_entropy": token_entropy.detach(), "batch_entropy": batch_entropy.detach()}
        # new_full, not torch.tensor(..., device=): a copy from the host would wait for the GPU
        stats["max_entropy"] = h.new_full((), math.log(self.entries), dtype=torch.float32)
        loss = self.cfg.entropy_weight * entropy_loss
        return RegularizerOutput(z=z_q.to(h.dtype), loss=loss, stats=stats)


def build_regularizer(cfg: RegularizerConfig) -> nn.Module:
    """The latent regularizer `cfg` names: VQ, KL or SoftVQ, each h (B, K, C) -> `RegularizerOutput`."""
    if isinstance(cfg, VQConfig):
        return VectorQuantizer(cfg)
    if isinstance(cfg, KLConfig):
        return GaussianRegularizer(cfg)
    return SoftVectorQuantizer(cfg)
