"""Every recipe under recipes/ loads strictly and builds its model (on the meta device when large)."""

import re
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
    elif "notrunc" in path.name:
        assert cfg.model.class_condition and cfg.model.tail_drop == "none"
    elif path.parent == RECIPES:  # issue 11: the other schedules are options, not the paper's eq. 5
        assert cfg.model.tail_drop == "uniform"


@pytest.mark.parametrize(
    ("size", "towers", "millions"),
    [
        ("s", (12, 768, 12, 14, 768, 12), 186.9),
        ("b", (12, 768, 12, 24, 1024, 16), 391.0),
        ("l", (21, 1024, 16, 24, 1024, 16), 570.3),
    ],
)
def test_the_smap_presets_are_the_towers_of_their_table(size, towers, millions):
    """smapctl/presets.py's table: encoder and decoder depth, width and heads, and the parameters they
    give (KL, 256 px, patch 16, 128 tokens); the paper's counts above allow 5%, a layer of difference."""
    cfg = load_tokenizer_recipe(RECIPES / f"kl_{size}_128.yaml").model
    assert (
        cfg.enc_depth,
        cfg.enc_width,
        cfg.enc_heads,
        cfg.dec_depth,
        cfg.dec_width,
        cfg.dec_heads,
    ) == towers
    with torch.device("meta"):
        model = SMAP(cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


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
    assert "loss.gan_start_step 200000 is not before train.max_steps 3" in caplog.text
    # Steps 0 .. 199,999 train: a GAN from step 200,000 would never start either.
    with pytest.raises(ConfigError, match="the GAN would never start"):
        load_tokenizer_recipe(path, ["train.max_steps=200000"])
    assert load_tokenizer_recipe(path, ["train.max_steps=200001"]).train.max_steps == 200001


def test_the_keys_recipes_readme_says_no_recipe_sets_are_in_no_recipe():
    """recipes/README.md lists keys "in no recipe, at the value shown": each is the schema's default and
    set by no YAML file under recipes/ (the base generator recipe used to set one)."""
    import re

    import yaml

    from smapctl import config
    from smapctl.recipe import GeneratorRecipe, TokenizerRecipe

    text = (RECIPES / "README.md").read_text()
    table = re.split(r"These are in\s+no recipe, at the value shown:", text)[1].split("\n## ")[0]
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", table, re.MULTILINE)
    keys = [(k, d.strip()) for k, d in rows if k != "key"]
    assert len(keys) >= 7, table

    def has(tree, path):
        for part in path:
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    files = {p: yaml.safe_load(p.read_text()) or {} for p in RECIPES.rglob("*.yaml")}
    defaults = [config.to_dict(config.build(TokenizerRecipe, {"kind": "tokenizer"}))]
    defaults += [  # each generator kind has model settings of its own
        config.to_dict(config.build(GeneratorRecipe, {"kind": "generator", "model": {"kind": kind}}))
        for kind in ("card", "llamagen", "maskgit")
    ]
    for names, shown in keys:
        listed = re.findall(r"`([a-z_.]+)`", names)
        values = [v.strip() for v in shown.split(",")]
        assert len(values) == len(listed), (names, shown)
        for key, value in zip(listed, values, strict=True):
            path = key.split(".")
            setters = [str(p.relative_to(RECIPES)) for p, tree in files.items() if has(tree, path)]
            assert not setters, f"{key} is set in {setters}"
            found = [d for d in defaults if has(d, path)]
            assert found, key
            tree = found[0]
            for part in path:
                tree = tree[part]
            same = str(tree) == value or (isinstance(tree, float) and float(value) == tree)
            assert same, (key, tree, value)


def test_what_recipes_readme_says_a_recipe_from_scratch_gets_is_the_schemas_defaults():
    """recipes/README.md tells a user writing a recipe from scratch what the keys it leaves out become;
    each figure there is the schema's default."""
    from smapctl import config
    from smapctl.models.regularizers import KLConfig
    from smapctl.recipe import GeneratorRecipe, TokenizerRecipe

    text = " ".join((RECIPES / "README.md").read_text().split())
    said = text.split("A recipe written from scratch")[1].split(" ## ")[0]
    tok = config.build(TokenizerRecipe, {"kind": "tokenizer"})
    m, t = tok.model, tok.train
    assert m.enc_depth == m.dec_depth and m.enc_width == m.dec_width
    assert isinstance(m.regularizer, KLConfig)
    gen = config.build(GeneratorRecipe, {"kind": "generator"})
    for phrase in [
        f"a tokenizer at {m.image_size} px (patch {m.patch_size}, a {m.enc_depth} x {m.enc_width} encoder and"
        f" decoder, {m.num_latent_tokens} tokens, {m.num_classes} classes) with a KL regularizer",
        f"`train.batch_size` {t.batch_size}, `train.lr` {t.lr:.0e}".replace("e-0", "e-"),
        f"{t.max_steps:,} steps, `train.precision: {t.precision}`",
        f"`train.ema_decay` {t.ema_decay}, on `{tok.data.dataset}`",
        f"a generator's `model` is a {type(gen.model).__name__.removesuffix('Config')} of {gen.model.depth} x"
        f" {gen.model.width} on `{gen.latents.tokenizer}`",
    ]:
        assert phrase in said, phrase


def test_a_recipes_run_folder_name_does_not_depend_on_how_its_path_is_spelled(tmp_path, monkeypatch):
    """The default `--out` is `runs/<recipe_name>`: `tokenizer.yaml` run from `recipes/demo/` trained into
    runs/tokenizer (and `../demo/tokenizer.yaml` from a sub-folder into runs/..-tokenizer), where the
    demo generator's `latents.tokenizer: runs/demo-tokenizer` does not look."""
    from smapctl.recipe import recipe_name

    demo = tmp_path / "recipes" / "demo"
    (demo / "sub").mkdir(parents=True)
    monkeypatch.chdir(demo / "sub")
    for spelled in (
        "../tokenizer.yaml",
        "../../demo/tokenizer.yaml",
        f"{demo}/tokenizer.yaml",
        "./../tokenizer.yaml",
    ):
        assert recipe_name(spelled) == "demo-tokenizer", spelled
    monkeypatch.chdir(demo)
    assert recipe_name("tokenizer.yaml") == recipe_name("./tokenizer.yaml") == "demo-tokenizer"
    monkeypatch.chdir(tmp_path / "recipes")
    assert recipe_name("vq_s_128.yaml") == recipe_name("demo/../vq_s_128.yaml") == "vq_s_128"
    assert recipe_name("/my.yaml") == "my"  # a file at the root: its name alone


def _readme_patterns(text: str) -> list[re.Pattern]:
    """The recipe files recipes/README.md names, as patterns: `{vq,kl}` is either, `{k}` a number or a
    letter group (no `_`), `*` any name part."""
    patterns = []
    for name in set(re.findall(r"[\w{},*]+\.yaml", text)):
        regex = re.escape(name)  # (`{`, `}` and `*` come out escaped)
        regex = re.sub(r"\\\{(\w+(?:,\w+)+)\\\}", lambda m: f"({m.group(1).replace(',', '|')})", regex)
        regex = re.sub(r"\\\{\w+\\\}", "[0-9a-z]+", regex).replace(r"\*", r"\w+")
        patterns.append(re.compile(regex))
    return patterns


def test_the_recipes_readme_names_every_recipe():
    """recipes/README.md maps the paper's tables to files: a recipe it does not name is one a reader
    cannot place (each is named, or matched by a row's pattern such as `{vq,kl,softvq}_{s,b,l}_{tokens}`)."""
    patterns = _readme_patterns((RECIPES / "README.md").read_text())
    unnamed = [
        p.name for p in sorted(RECIPES.glob("*.yaml")) if not any(r.fullmatch(p.name) for r in patterns)
    ]
    assert not unnamed
    assert not any(r.fullmatch("vq_x_128.yaml") for r in patterns)  # (the patterns are not catch-alls)
