"""Every generator recipe under recipes/ loads strictly, builds on the meta device at the paper's size,
and `train-generator --dry-run` reports the same count."""

import dataclasses
from pathlib import Path

import pytest
import torch

from smapctl.config import read_recipe_dict
from smapctl.presets import PAPER_PARAMETERS
from smapctl.recipe import load_generator_recipe
from smapctl.summary import count_parameters
from smapctl.train.generator import build_generator

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GENERATOR_RECIPES = sorted(
    p
    for p in RECIPES.rglob("*.yaml")
    if read_recipe_dict(p).get("kind") == "generator" and "_base" not in p.parts
)
# Sizes the paper states (table 1, table 7; LlamaGen-3B in table 4's text: 3.1B).
PAPER = {**PAPER_PARAMETERS, "LlamaGen-3B": 3.1e9}


def meta_count(cfg) -> int:
    with torch.device("meta"):
        return count_parameters(build_generator(cfg, None))


def test_every_paper_generator_has_a_recipe():
    names = {p.name for p in GENERATOR_RECIPES}
    expected = {"card_b.yaml", "card_l.yaml", "card_xl.yaml", "card_l_softvq.yaml", "card_xl_softvq.yaml"}
    expected |= {"llamagen_3b.yaml", "maskgit_l_64.yaml", "maskgit_b_128.yaml", "generator.yaml"}
    for setting in ("shared", "independent", "recon_only"):
        expected |= {f"fig5_{setting}_{k}.yaml" for k in (32, 64, 128)}
    assert expected <= names


@pytest.mark.parametrize("path", GENERATOR_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_builds_with_the_paper_size(path):
    cfg = load_generator_recipe(path)
    n = meta_count(cfg)
    preset = read_recipe_dict(path).get("model", {}).get("preset")
    if preset in PAPER:
        assert abs(n / PAPER[preset] - 1) < 0.05, f"{preset}: {n / 1e6:.1f}M"
    if path.parent != RECIPES:  # demo and other small recipes: no paper row to match
        return
    if cfg.model.kind == "card":
        assert cfg.model.token_dim == 16  # SMAP(KL/SoftVQ) latents
    else:
        assert cfg.model.vocab_size == 8192  # SMAP-VQ's codebook
    # The sampling defaults of appendix A / table 7: guidance 2.7 for class-conditional sampling at 256 px
    # (LlamaGen takes its official implementation's, recipes/README.md).
    assert cfg.sample.steps == {"card": 25, "maskgit": 8, "llamagen": 25}[cfg.model.kind]
    if cfg.model.kind != "llamagen":
        assert cfg.sample.cfg_scale == (3.5 if path.stem.endswith("_512") else 2.7)


def test_discrete_generators_follow_their_projects_and_card_shares_the_class_embedding():
    # Appendix A: LlamaGen (and table 7's MaskGIT) "following the standard setup", i.e. their own class
    # embedding; semantic condition sharing (section 3.3) is CARD's.
    for path in GENERATOR_RECIPES:
        if path.parent != RECIPES or path.name.startswith("fig5_"):
            continue
        cfg = load_generator_recipe(path)
        expected = "shared" if cfg.model.kind == "card" else "independent"
        assert cfg.class_embed == expected, path.name
    llamagen = load_generator_recipe(RECIPES / "llamagen_3b.yaml")
    # LlamaGen's GETTING_STARTED.md samples GPT-3B at cfg 1.65, from its raw weights (no EMA).
    assert (llamagen.sample.cfg_scale, llamagen.sample.cfg_schedule, llamagen.train.ema_decay) == (
        1.65,
        "constant",
        0.0,
    )
    # MaskGIT's class-conditional config: 24 layers, width 768, 16 heads, MLP 3072.
    maskgit = load_generator_recipe(RECIPES / "maskgit_b_128.yaml").model
    assert (maskgit.depth, maskgit.width, maskgit.num_heads, maskgit.mlp_ratio) == (24, 768, 16, 4.0)


def test_the_512px_generator_uses_appendix_a_guidance():
    cfg = load_generator_recipe(RECIPES / "card_l_512.yaml")
    assert cfg.sample.cfg_scale == 3.5
    assert cfg.latents.tokenizer == str(Path.cwd() / "runs/kl_b_128_512")
    assert cfg.model == load_generator_recipe(RECIPES / "card_l.yaml").model


@pytest.mark.parametrize("k", [32, 64, 128])
def test_figure5_settings_differ_only_in_the_class_embedding(k):
    shared, independent, recon = (
        load_generator_recipe(RECIPES / f"fig5_{s}_{k}.yaml") for s in ("shared", "independent", "recon_only")
    )
    assert (shared.class_embed, independent.class_embed, recon.class_embed) == ("shared",) + (
        "independent",
    ) * 2
    assert shared.model == independent.model == recon.model
    assert shared.model.num_tokens == k
    # A relative path in a recipe is from the working directory, kept absolute by the run.
    assert shared.latents.tokenizer == independent.latents.tokenizer == str(Path.cwd() / f"runs/kl_b_{k}")
    assert recon.latents.tokenizer == str(Path.cwd() / f"runs/titok_kl_b_{k}")
    assert dataclasses.replace(shared, class_embed="independent") == independent


@pytest.mark.parametrize(
    ("name", "overrides"), [("card_b.yaml", []), ("demo/generator.yaml", ["model.depth=2"])]
)
def test_dry_run_prints_the_parameter_count(name, overrides, capsys):
    from tiny_tokenizer import run_cli

    sets = [arg for o in overrides for arg in ("--set", o)]
    code, out, err = run_cli(capsys, "train-generator", RECIPES / name, "--dry-run", *sets)
    assert code == 0, err
    # Its tokenizer is not trained here: the dry run says that it could not check the recipe against it.
    assert "holds no trained tokenizer yet; the recipe is checked against it once it does" in " ".join(
        err.split()
    )
    n = meta_count(load_generator_recipe(RECIPES / name, overrides))
    assert f"parameters: {n}" in out.splitlines()
    if overrides:
        text = " ".join(out.split())  # rich wraps long lines at the terminal width
        assert "CARD 2 x 192 over 16 tokens, class embedding shared, built on cpu" in text


# The demo recipes: a tokenizer and a generator on its tokens, each pair trained with the default `--out`.
DEMO_PAIRS = [
    ("demo/tokenizer.yaml", "demo/generator.yaml"),
    ("demo/tokenizer_vq.yaml", "demo/generator_llamagen.yaml"),
]


@pytest.mark.parametrize(("tokenizer", "generator"), DEMO_PAIRS, ids=[g for _, g in DEMO_PAIRS])
def test_each_demo_generator_reads_its_demo_tokenizer(tokenizer, generator):
    from smapctl.models.regularizers import VQConfig
    from smapctl.recipe import load_tokenizer_recipe, recipe_name
    from smapctl.train.run_folder import default_run_dir

    tok = load_tokenizer_recipe(RECIPES / tokenizer).model
    gen = load_generator_recipe(RECIPES / generator)
    # `latents.tokenizer` is the tokenizer recipe's default run folder (made absolute on loading).
    assert gen.latents.tokenizer == str(Path.cwd() / default_run_dir(recipe_name(RECIPES / tokenizer)))
    assert gen.model.num_tokens == tok.num_latent_tokens
    assert gen.model.num_classes == tok.num_classes
    assert not gen.latents.hflip  # a mirrored digit is another glyph
    if isinstance(tok.regularizer, VQConfig):
        assert gen.model.kind in ("llamagen", "maskgit")
        assert gen.model.vocab_size == tok.regularizer.codebook_size
    else:
        assert gen.model.kind == "card"
        assert gen.model.token_dim == tok.regularizer.token_dim
