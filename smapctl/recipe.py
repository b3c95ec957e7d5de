"""Top-level recipes: what a YAML file under `recipes/` describes, and loading one strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import smapctl.presets  # noqa: F401  (registers the `preset:` tables)
from smapctl import config
from smapctl.data.config import DataConfig
from smapctl.errors import ConfigError
from smapctl.models.smap import SMAPConfig
from smapctl.train.config import LossConfig, TrainConfig


@dataclass
class TokenizerRecipe:
    """`smapctl train-tokenizer RECIPE`: a SMAP model, its data, its objective and its optimisation."""

    kind: Literal["tokenizer"] = "tokenizer"
    model: SMAPConfig = field(default_factory=SMAPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_tokenizer_recipe(path: str | Path, overrides: list[str] | None = None) -> TokenizerRecipe:
    recipe = config.load(TokenizerRecipe, path, overrides)
    if recipe.loss.gan_start_step > recipe.train.max_steps and recipe.loss.gan_weight > 0:
        raise ConfigError(f"{path}: loss.gan_start_step: after train.max_steps, the GAN would never start")
    return recipe


def recipe_name(path: str | Path) -> str:
    """`recipes/demo/tokenizer.yaml` -> `demo-tokenizer`; `recipes/vq_s_128.yaml` -> `vq_s_128`."""
    path = Path(path)
    parent = path.parent.name
    return path.stem if parent in ("recipes", "") else f"{parent}-{path.stem}"
