"""Top-level recipes: what a YAML file under `recipes/` describes, and loading one strictly."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import smapctl.presets  # noqa: F401  (registers the `preset:` tables)
from smapctl import config
from smapctl.data.config import DataConfig, embedded_name, embedded_spec_error
from smapctl.errors import ConfigError, UserError
from smapctl.models.card import CARDConfig
from smapctl.models.discriminator import logits_size
from smapctl.models.flow_head import FLOW_STEPS
from smapctl.models.llamagen import LlamaGenConfig
from smapctl.models.maskgit import CHOICE_TEMPERATURE, DECODING_STEPS, MaskGITConfig
from smapctl.models.smap import SMAPConfig
from smapctl.train.config import LossConfig, TrainConfig
from smapctl.train.layout import RUN_RECIPE

log = logging.getLogger("smapctl.recipe")


@dataclass
class TokenizerRecipe:
    """`smapctl train-tokenizer RECIPE`: a SMAP model, its data, its objective and its optimisation."""

    kind: Literal["tokenizer"] = "tokenizer"
    model: SMAPConfig = field(default_factory=SMAPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Which command trains each kind of recipe (named in the error for a recipe given to the wrong one).
COMMANDS = {"tokenizer": "smapctl train-tokenizer", "generator": "smapctl train-generator"}


def load_tokenizer_recipe(
    path: str | Path, overrides: list[str] | None = None, *, cut_short: bool = False
) -> TokenizerRecipe:
    """The recipe at `path` with `overrides` (KEY=VALUE). `cut_short`: train.max_steps comes from the
    command line (`--max-steps`, a smoke run or a first part), so a GAN that starts after it is a
    warning, not an error in the recipe."""
    recipe = config.load(TokenizerRecipe, path, overrides, COMMANDS)
    wrong = embedded_spec_error(recipe.data)
    if wrong:
        raise ConfigError(f"{path}: {wrong}")
    recipe = with_absolute_paths(recipe)
    size, layers = recipe.model.image_size, recipe.loss.disc_layers
    if recipe.loss.gan_weight > 0 and logits_size(size, layers) < 1:
        fits = max((n for n in range(1, layers) if logits_size(size, n) >= 1), default=0)
        advice = f"at most {fits} at this size" if fits else "images this small take loss.gan_weight: 0"
        raise ConfigError(
            f"{path}: loss.disc_layers: {layers} halvings leave nothing of {size}-px images for the"
            f" discriminator (it would fail when the GAN starts); {advice}"
        )
    # Steps 0 .. max_steps - 1 train, and the GAN joins at step >= gan_start_step: equal is never too.
    if recipe.loss.gan_start_step >= recipe.train.max_steps and recipe.loss.gan_weight > 0:
        if not cut_short:
            raise ConfigError(
                f"{path}: loss.gan_start_step: at or after train.max_steps, the GAN would never start"
            )
        log.warning(
            "loss.gan_start_step %d is not before train.max_steps %d: this run trains without the GAN loss",
            recipe.loss.gan_start_step,
            recipe.train.max_steps,
        )
    return recipe


def warn_if_the_ema_outlasts_the_run(train, kind: str = "tokenizer") -> None:
    """A run cut short (`--max-steps`) with an EMA that averages over more steps than it has: the EMA
    weights, which every command uses by default, stay near the initial ones (a 200-step run of a paper
    recipe, ema_decay 0.9999: 10.9 dB against 14.0 for the model's own weights, a noise panel). A
    tokenizer's commands take `--weights model`; a generator is always sampled with its EMA weights."""
    if 0 < train.ema_decay < 1 and 1 / (1 - train.ema_decay) > train.max_steps:
        users, other = (
            ("tokenize, evaluate, cross-recon", ", or pass --weights model to those commands")
            if kind == "tokenizer"
            else ("sample, evaluate --generator", "")
        )
        log.warning(
            "train.ema_decay %g averages over about %d steps, more than this run's %d: its EMA weights (those"
            " %s use) stay near the initial ones; --set train.ema_decay=%s for this run%s",
            train.ema_decay, round(1 / (1 - train.ema_decay)), train.max_steps, users,
            short_run_ema_decay(train.max_steps), other,
        )  # fmt: skip


def warn_if_the_warmup_outlasts_the_run(train) -> None:
    """A run cut short (`--max-steps`) within its learning-rate warm-up: the rate never reaches train.lr
    (a paper recipe's 100,000 warm-up steps in a 1,000-step run: 1% of it at the end), and the cosine
    decay never starts."""
    if train.warmup_steps > train.max_steps:
        log.warning(
            "train.warmup_steps %d is longer than this run's %d steps: the learning rate only rises to %.3g"
            " (train.lr %g) and never decays; --set train.warmup_steps=%d for this run",
            train.warmup_steps, train.max_steps, train.lr * train.max_steps / train.warmup_steps, train.lr,
            train.max_steps // 10,
        )  # fmt: skip


def short_run_ema_decay(max_steps: int) -> str:
    """An EMA decay that averages over about a tenth of a `max_steps` run, 1 - 10 / max_steps (to one
    digit past its nines), or 0 (no averaging) for a run of fewer than 20 steps."""
    horizon = max_steps // 10
    if horizon < 2:
        return "0"
    return f"{1 - 1 / horizon:.{math.ceil(math.log10(horizon)) + 1}f}".rstrip("0")


def untrained_guidance(class_dropout: float, cfg_scale: float) -> str | None:
    """Why guidance at `cfg_scale` is meaningless for a generator trained with `class_dropout`, or None.
    Classifier-free guidance steers away from the null class, which only class dropout trains: without
    it the null vector keeps its initial value."""
    if class_dropout == 0 and cfg_scale != 1:
        return (
            f"guidance {cfg_scale:g} steers away from the null class, which model.class_dropout 0 never"
            " trains (appendix A drops the class 10% of the time: 0.1)"
        )
    return None


def too_many_steps(kind: str, steps: int, num_tokens: int) -> str | None:
    """Why `steps` decoding steps do not fit a MaskGIT of `num_tokens` tokens, or None. It fixes at least
    one token per step: it would stop early, its choice temperature annealed over steps it never takes
    (near full noise throughout), and a record would say the steps asked for."""
    if kind == "maskgit" and steps > num_tokens:
        return f"a MaskGIT decodes at least one of its {num_tokens} tokens per step: use at most {num_tokens}"
    return None


def warn_of_unusable_sampling(recipe: GeneratorRecipe) -> None:
    """Sampling settings of a generator recipe that `sample` refuses, said as training starts (its previews
    draw with them): guidance with no class dropout (steered by an untrained null class), more MaskGIT
    steps than tokens."""
    why = untrained_guidance(recipe.model.class_dropout, recipe.sample.cfg_scale)
    if why is not None:
        log.warning("%s; set model.class_dropout (e.g. 0.1) or sample.cfg_scale=1", why)
    why = too_many_steps(recipe.model.kind, recipe.sample.steps, recipe.model.num_tokens)
    if why is not None:
        log.warning("sample.steps %d: %s (set sample.steps)", recipe.sample.steps, why)


def recipe_name(path: str | Path) -> str:
    """`recipes/demo/tokenizer.yaml` -> `demo-tokenizer`; `recipes/vq_s_128.yaml` -> `vq_s_128`. The folder
    is the file's own however the path spells it: `tokenizer.yaml` run from `recipes/demo/` is
    `demo-tokenizer` too (not `tokenizer`, nor `../tokenizer.yaml` `..-tokenizer`)."""
    path = Path(os.path.abspath(path))  # `..` taken as the shell takes it, links not followed
    parent = path.parent.name
    return path.stem if parent in ("recipes", "") else f"{parent}-{path.stem}"


def training_run_dir(recipe: str | Path, out: Path | None, resume: bool) -> Path:
    """`--out`, else `runs/<recipe_name(recipe)>`. `--resume` of a run folder's own `recipe.yaml` without
    `--out` is refused naming the `--out` it needs: the default folder is another (`runs/<run>-recipe`),
    and its "no complete checkpoint" would say nothing of why."""
    from smapctl.train import checkpoint as ckpt
    from smapctl.train.run_folder import default_run_dir

    if out is not None:
        return out
    default, folder = default_run_dir(recipe_name(recipe)), Path(recipe).parent
    own = Path(recipe).name == RUN_RECIPE and ckpt.latest_checkpoint(folder) is not None
    if resume and own and ckpt.latest_checkpoint(default) is None:
        raise UserError(
            f"--resume: {recipe} is the recipe of the run {folder}; pass --out {folder} (without --out the"
            f" run folder is {default})"
        )
    return default


@dataclass
class LatentsConfig:
    """Where the generator's training tokens come from (they are cached once per tokenizer)."""

    # The tokenizer's run folder (its newest checkpoint) or one checkpoint folder.
    tokenizer: str = "runs/demo-tokenizer"
    tokenizer_weights: Literal["ema", "model"] = "ema"
    # Images to tokenize: an embedded dataset or an ImageNet-layout folder, whole; null = the tokenizer's
    # own training images (its recipe's data.dataset, without the held-out split of data.val_fraction).
    dataset: str | None = None
    # Also cache the mirror image of every training image (MAR's flips; appendix A names flips for the
    # tokenizer's training only).
    hflip: bool = True
    batch_size: int = 64

    def __post_init__(self):
        # An empty path would be the working directory.
        config.check(bool(self.tokenizer), "tokenizer", "must name a tokenizer run or checkpoint folder")
        config.check(
            self.dataset != "", "dataset", "must name an embedded dataset or an image folder (or be null)"
        )
        config.check(self.batch_size > 0, "batch_size", "must be a positive integer")


@dataclass
class SamplingConfig:
    """Default sampling settings stored with the generator (each is a `smapctl sample` option too)."""

    cfg_scale: float = 2.7  # appendix A: 2.7 at 256 px (3.5 at 512 px)
    cfg_schedule: Literal["constant", "linear"] = "linear"
    temperature: float = 1.0
    # CARD: flow-matching steps (25, appendix A); MaskGIT: decoding steps (8, table 7). None: the
    # generator kind's own, which the recipe then records.
    steps: int | None = None
    method: Literal["euler", "heun"] = "euler"
    top_k: int = 0  # discrete AR only (0 = off)
    top_p: float = 1.0  # discrete AR only
    choice_temperature: float = CHOICE_TEMPERATURE  # MaskGIT only

    def __post_init__(self):
        for name, value in vars(self).items():
            problem = sampling_value_problem(name, value)
            config.check(problem is None, name, problem or "")


# The range of each numeric sampling setting: a recipe's and the API's are checked by `SamplingConfig`,
# `smapctl sample`'s options by the same rules before anything is loaded.
_SAMPLING_RANGES = {
    "cfg_scale": (lambda v: v >= 0, "must be >= 0"),
    "temperature": (lambda v: v > 0, "must be positive"),
    "steps": (lambda v: v > 0, "must be a positive integer"),
    "top_k": (lambda v: v >= 0, "must be >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "choice_temperature": (lambda v: v >= 0, "must be >= 0"),
}


def sampling_value_problem(name: str, value) -> str | None:
    """What is wrong with `value` for the sampling setting `name` (not finite, out of its range), or
    None (also for a setting that is not a number: `cfg_schedule`, `method`)."""
    if name not in _SAMPLING_RANGES or value is None:
        return None
    if not math.isfinite(value):  # nan would give black images without a word
        return "must be a finite number"
    within, problem = _SAMPLING_RANGES[name]
    return None if within(value) else problem


# The sampling settings (`SamplingConfig` fields) each generator family uses, besides cfg_scale,
# cfg_schedule and temperature, which all use.
SAMPLING_SETTINGS = {
    "card": ("steps", "method"),
    "llamagen": ("top_k", "top_p"),
    "maskgit": ("steps", "choice_temperature"),
}


def unused_sampling_settings(kind: str, names) -> list[str]:
    """Those of `names` (SamplingConfig fields) that a `kind` generator does not use."""
    used = {"cfg_scale", "cfg_schedule", "temperature", *SAMPLING_SETTINGS[kind]}
    return [name for name in names if name not in used]


@dataclass
class GeneratorRecipe:
    """`smapctl train-generator RECIPE`: a generator over one tokenizer's tokens."""

    kind: Literal["generator"] = "generator"
    model: CARDConfig | LlamaGenConfig | MaskGITConfig = field(default_factory=CARDConfig)
    # Section 3.3, "semantic condition sharing": "shared" reuses the tokenizer's class-embedding module
    # (copied from its checkpoint); "independent" gives the generator its own (figure 5's settings).
    class_embed: Literal["shared", "independent"] = "shared"
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        # A sampling setting the generator does not use would be ignored without a word (`smapctl sample`
        # refuses it as an option); one left at its default says nothing, so every stored recipe loads.
        kind, default = self.model.kind, SamplingConfig(steps=FLOW_STEPS)
        if self.sample.steps is None:
            self.sample.steps = DECODING_STEPS if kind == "maskgit" else FLOW_STEPS
        for name in unused_sampling_settings(kind, vars(self.sample)):
            users = " and ".join(k for k, used in SAMPLING_SETTINGS.items() if name in used)
            value = getattr(self.sample, name)
            config.check(
                value == getattr(default, name),
                f"sample.{name}",
                f"a {kind} generator does not use it, only {users} (got {value!r}): remove it",
            )


def load_generator_recipe(path: str | Path, overrides: list[str] | None = None) -> GeneratorRecipe:
    """The recipe at `path` with `overrides`; its folder paths made absolute (`with_absolute_paths`).
    Checked here, not when a run's stored recipe is rebuilt (runs that trained so still load): frozen, an
    independent class table keeps its random initial values, as there is no tokenizer's to keep."""
    recipe = with_absolute_paths(config.load(GeneratorRecipe, path, overrides, COMMANDS))
    if recipe.model.freeze_class_embed and recipe.class_embed == "independent":
        raise ConfigError(
            f"{path}: model.freeze_class_embed: only with class_embed: shared (it keeps the tokenizer's class"
            " table as trained; an independent one would stay random)"
        )
    return recipe


def with_absolute_paths(recipe):
    """`recipe` (a TokenizerRecipe or GeneratorRecipe, changed in place) with its folders and files absolute.

    A relative path in a recipe is taken from the working directory when the recipe is loaded; the run
    keeps it absolute (in recipe.yaml and meta.json), so `evaluate`, `train-generator` and `--resume`
    find the same images from anywhere (not whatever ./data/train is where they run), and
    `--resume` the same VGG-16 file (`loss.perceptual_weights`, often kept beside the recipes).
    A run recorded by an older smapctl with relative paths compares equal once read through this too,
    from the same working directory."""
    if isinstance(recipe, TokenizerRecipe):
        recipe.data.dataset = absolute_data_path(recipe.data.dataset)
        if recipe.data.val_dataset is not None:
            recipe.data.val_dataset = absolute_data_path(recipe.data.val_dataset)
        if recipe.loss.perceptual_weights:  # (empty: not set, as None)
            recipe.loss.perceptual_weights = _absolute(recipe.loss.perceptual_weights)
    else:
        recipe.latents.tokenizer = _absolute(recipe.latents.tokenizer)  # a run folder, whatever its name
        if recipe.latents.dataset is not None:
            recipe.latents.dataset = absolute_data_path(recipe.latents.dataset)
    return recipe


def absolute_data_path(spec: str) -> str:
    """An embedded dataset's name ("digits", "photos:val") as it is; a folder as an absolute path."""
    if embedded_name(spec):
        return spec
    return _absolute(spec)


def _absolute(path: str) -> str:
    """`~` expanded, made absolute from the working directory; symbolic links kept as written."""
    return os.path.abspath(os.path.expanduser(path))
