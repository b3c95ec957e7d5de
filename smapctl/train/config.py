"""Optimisation and loss settings shared by the recipes (appendix A)."""

from dataclasses import dataclass, field
from typing import Literal

from smapctl.config import SEED_MAX, check

# The experiment trackers accelerate 1.16 logs to (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`), and the
# package each needs where its name is not the tracker's.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


@dataclass
class TrainConfig:
    """The training loop. `batch_size` is the global batch: it is split over processes and accumulation
    steps, so a recipe means the same optimisation on one CPU or on 32 GPUs."""

    max_steps: int = 1000
    batch_size: int = 256
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    # Cosine decay from lr to lr * min_lr_ratio over max_steps (after warm-up).
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # accelerate's mixed precision; `auto` is bf16 where the device has bf16 units (a GPU since Ampere,
    # a CPU with AVX512-BF16 or AMX), else `no` (fp32): see smapctl/precision.py. `fp32`, the name
    # `tokenize --precision` and the messages use, is taken for `no`.
    precision: Literal["auto", "no", "fp32", "bf16", "fp16"] = "no"
    # torch.compile the networks (inductor, through accelerate). Costs 30-60 s of compilation at start
    # and a few more when the decoded prefix length first varies; pays on long runs (benchmarks/RESULTS.md).
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    # Stop after this many non-finite losses or gradients in a row (each such step is skipped).
    max_nonfinite_steps: int = 5
    # Experiment trackers that get every metrics row too, through accelerate (`[tensorboard]`: event files
    # in RUN/trackers/<run name>/; any of TRACKERS, each needing its own package); metrics.jsonl either way.
    log_with: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.precision == "fp32":
            self.precision = "no"
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "log_every",
            "sample_every",
            "ckpt_every",
        ):
            check(getattr(self, name) > 0, name, "must be a positive integer")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        check(self.keep_checkpoints > 0, "keep_checkpoints", "must be a positive integer")
        check(self.max_nonfinite_steps > 0, "max_nonfinite_steps", "must be a positive integer")
        check(0 <= self.seed <= SEED_MAX, "seed", "must be in [0, 2**32 - 1]")
        unknown = [t for t in self.log_with if t not in TRACKERS]
        known = f"is not a tracker accelerate knows ({', '.join(TRACKERS)})"
        check(not unknown, "log_with", f"{unknown[0]!r} {known}" if unknown else "")
        check(len(set(self.log_with)) == len(self.log_with), "log_with", "names a tracker twice")


@dataclass
class LossConfig:
    """The tokenizer's one-stage objective (section 4.2): pixel + regularizer + perceptual + GAN.

    Each weight at 0 means the term is not computed. The regularizer's own weights (commitment,
    KL, entropy) live in `model.regularizer`.
    """

    pixel: Literal["l1", "l2"] = "l2"
    pixel_weight: float = 1.0
    # Perceptual loss on the features of a VGG-16 whose weights are read from this local file
    # (torchvision's vgg16-397923af.pth); nothing is downloaded.
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None
    # PatchGAN discriminator with the hinge loss, switched on at `gan_start_step`, weighted
    # adaptively against the pixel loss as in VQGAN.
    gan_weight: float = 0.0
    gan_start_step: int = 0
    gan_adaptive_weight: bool = True
    disc_lr: float = 1e-4
    disc_width: int = 64
    disc_layers: int = 3

    def __post_init__(self):
        for name in ("pixel_weight", "perceptual_weight", "gan_weight", "disc_lr"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        # At 0 the discriminator would keep its random weights, and its GAN term push the decoder anywhere.
        check(
            self.disc_lr > 0 or self.gan_weight == 0, "disc_lr", "must be positive when gan_weight is above 0"
        )
        # With no reconstruction term the decoder gets no gradient: the run trained only the regularizer's
        # loss, without a word (VQGAN's adaptive GAN weight is the ratio of the two losses' gradients, 0 too).
        gan = " (the adaptive GAN weight scales with their gradient: 0 too)" if self.gan_weight > 0 else ""
        check(
            self.pixel_weight > 0
            or self.perceptual_weight > 0
            or (self.gan_weight > 0 and not self.gan_adaptive_weight),
            "pixel_weight",
            f"0 with perceptual_weight 0 leaves nothing to train the decoder{gan}; give one of them a"
            " positive weight",
        )
        check(self.gan_start_step >= 0, "gan_start_step", "must be >= 0")
        check(self.disc_width > 0, "disc_width", "must be a positive integer")
        check(self.disc_layers > 0, "disc_layers", "must be a positive integer")
