"""Every recipe under recipes/ loads strictly and builds its model (on the meta device when large)."""

from pathlib import Path

import pytest
import torch

from smapctl.config import read_recipe_dict
from smapctl.models.smap import SMAP
from smapctl.presets import PAPER_PARAMETERS
from smapctl.recipe import load_tokenizer_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOKENIZER_RECIPES = sorted(
    p
    for p in RECIPES.rglob("*.yaml")
    if read_recipe_dict(p).get("kind") == "tokenizer" and "_base" not in p.parts
)


def test_every_paper_tokenizer_has_a_recipe():
    names = {p.name for p in TOKENIZER_RECIPES}
    for reg in ("vq", "kl", "softvq"):
        for size in "sbl":
            for k in (32, 64, 96, 128, 192, 256):
                assert f"{reg}_{size}_{k}.yaml" in names
    for k in (32, 64, 128):
        assert {f"titok_vq_l_{k}.yaml", f"titok_kl_b_{k}.yaml", f"notrunc_vq_l_{k}.yaml"} <= names


@pytest.mark.parametrize("path", TOKENIZER_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_builds_with_the_paper_size(path):
    cfg = load_tokenizer_recipe(path)
    with torch.device("meta"):
        model = SMAP(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    preset = read_recipe_dict(path).get("model", {}).get("preset")
    if preset is not None:
        assert abs(n / PAPER_PARAMETERS[preset] - 1) < 0.05, f"{preset}: {n / 1e6:.1f}M"
    if "titok" in path.name:
        assert not cfg.model.class_condition and cfg.model.tail_drop == "none"
    if "notrunc" in path.name:
        assert cfg.model.class_condition and cfg.model.tail_drop == "none"


def test_max_steps_option_cuts_a_paper_recipe_short_without_its_gan(caplog):
    """`--max-steps 3` on a paper recipe (GAN from step 200,000) is a smoke run, not a broken recipe;
    the same value written into the recipe (`--set`) still is one."""
    import logging

    from smapctl.errors import ConfigError

    path = RECIPES / "kl_s_128.yaml"
    with pytest.raises(ConfigError, match="the GAN would never start"):
        load_tokenizer_recipe(path, ["train.max_steps=3"])
    with caplog.at_level(logging.WARNING, logger="smapctl.recipe"):
        recipe = load_tokenizer_recipe(path, ["train.max_steps=3"], cut_short=True)
    assert recipe.train.max_steps == 3
    assert "loss.gan_start_step 200000 is after train.max_steps 3" in caplog.text
