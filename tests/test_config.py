"""Strict recipe loading: every malformed input is a one-line ConfigError naming the file and key."""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from tiny_tokenizer import run_cli

from smapctl import config
from smapctl.errors import ConfigError
from smapctl.recipe import (
    GeneratorRecipe,
    TokenizerRecipe,
    load_generator_recipe,
    load_tokenizer_recipe,
    with_absolute_paths,
)


@dataclass
class Inner:
    kind: Literal["a"] = "a"
    width: int = 4
    rate: float = 0.5


@dataclass
class Other:
    kind: Literal["b"] = "b"
    depth: int = 2


@dataclass
class Outer:
    name: str
    inner: Inner | Other = field(default_factory=Inner)
    sizes: tuple[int, int] = (1, 2)
    flag: bool = False
    maybe: str | None = None


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builds_nested_union_and_scientific_floats(tmp_path):
    cfg = config.load(Outer, write(tmp_path, "name: x\ninner: {kind: a, rate: 1e-4}\nsizes: [3, 4]\n"))
    assert cfg.inner.rate == pytest.approx(1e-4) and isinstance(cfg.inner.rate, float)
    assert cfg.sizes == (3, 4)
    cfg = config.load(Outer, write(tmp_path, "name: x\ninner: {kind: b, depth: 7}\n"))
    assert isinstance(cfg.inner, Other) and cfg.inner.depth == 7


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nbogus: 1\n", "bogus: unknown key; valid keys here are: name, inner, sizes, flag, maybe"),
        (
            "name: x\ninner: {kind: a, widht: 3}\n",
            "inner.widht: unknown key; valid keys here are: kind, width",
        ),
        ("name: x\ninner: {width: 2.5}\n", "inner.width: expected an integer, got 2.5"),
        ("name: x\nflag: 1\n", "flag: expected true or false, got 1"),
        ("name: x\ninner: {rate: true}\n", "inner.rate: expected a number, got True"),
        ("name: x\nname: y\n", "duplicate key 'name' (line 2)"),
        ("inner: {kind: a}\n", "name: required key is missing"),
        ("name: x\ninner: {kind: c}\n", "inner.kind: expected one of ['a', 'b'], got 'c'"),
        ("name: [1\n", "malformed YAML"),
        ("- 1\n- 2\n", "a recipe must be a mapping"),
        ("name: 5\n", "name: expected a string, got 5"),
        ("name: x\nsizes: 3\n", "sizes: expected a list, got 3"),
        ("base: 5\nname: x\n", "base: expected a file name, got 5"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(Outer, path)
    message = str(e.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message
    assert e.value.exit_code == 2


def test_base_inheritance_and_kind_switch(tmp_path):
    write(tmp_path, "name: base\ninner: {kind: a, width: 9}\nflag: true\n", "base.yaml")
    cfg = config.load(Outer, write(tmp_path, "base: base.yaml\ninner: {rate: 0.25}\n"))
    assert (cfg.name, cfg.inner.width, cfg.inner.rate, cfg.flag) == ("base", 9, 0.25, True)
    # Switching kind replaces the section instead of merging a's keys into b.
    cfg = config.load(Outer, write(tmp_path, "base: base.yaml\ninner: {kind: b}\n"))
    assert cfg.inner == Other()


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        config.load(Outer, tmp_path / "a.yaml")


def test_a_recipe_copied_away_from_its_base_says_so(tmp_path):
    """`cp recipes/kl_s_128.yaml my.yaml` said only "_base/kl.yaml: recipe file not found", naming neither
    the recipe that wants it nor that a base is read beside that recipe."""
    shutil.copy(Path(__file__).parents[1] / "recipes" / "kl_s_128.yaml", tmp_path / "my_kl.yaml")
    with pytest.raises(ConfigError) as e:
        config.read_recipe_dict(tmp_path / "my_kl.yaml")
    wanted = tmp_path / "_base" / "kl.yaml"
    assert str(e.value) == (
        f"{tmp_path / 'my_kl.yaml'}: base: _base/kl.yaml: no such file {wanted} (a base is read relative to"
        " the recipe that names it: copy it along, or give its absolute path)"
    )


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, "name: x\n")
    cfg = config.load(Outer, path, ["inner.width=12", "inner.rate=3e-5", "maybe=hello"])
    assert (cfg.inner.width, cfg.inner.rate, cfg.maybe) == (12, 3e-5, "hello")
    with pytest.raises(ConfigError, match="inner.width: expected an integer"):
        config.load(Outer, path, ["inner.width=wide"])
    with pytest.raises(ConfigError, match="nope: unknown key"):
        config.load(Outer, path, ["nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(Outer, path, ["inner.width"])
    with pytest.raises(ConfigError, match=r"^--set inner\.\.width=1: empty key$"):
        config.load(Outer, path, ["inner..width=1"])


def test_a_set_that_replaced_a_section_is_named_not_a_later_key_inside_it(tmp_path, capsys):
    """`--set train=5 --max-steps 2` said "--set train.max_steps=2: 'train' is not a section", an override
    the user never typed (--max-steps is one)."""
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"^--set inner=5: inner: expected a section \(mapping\), got 5$"):
        config.load(Outer, path, ["inner=5", "inner.width=2"])
    with pytest.raises(ConfigError, match=r"^--set name.first=1: 'name' is not a section$"):  # the file's
        config.load(Outer, path, ["name.first=1"])
    recipe = Path(__file__).parents[1] / "recipes" / "demo" / "tokenizer.yaml"
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe, "--set", "train=5", "--max-steps", 2, "--dry-run"
    )
    assert code == 2 and err.splitlines() == [
        "error: --set train=5: train: expected a section (mapping), got 5"
    ]


def test_set_values_are_read_as_yaml_and_the_last_of_a_key_is_named(tmp_path):
    path = write(tmp_path, "name: x\n")
    # A value that is not YAML is the string as typed, not an error.
    assert config.load(Outer, path, ["maybe=[unclosed"]).maybe == "[unclosed"
    with pytest.raises(ConfigError, match=r"inner.width: expected an integer, got True"):
        config.load(Outer, path, ["inner.width=true"])  # a boolean is no integer (nor a 1)
    with pytest.raises(ConfigError, match=r"\(from --set inner.width=wide\)$"):
        config.load(Outer, path, ["inner.width=3", "inner.width=wide"])  # the one that took effect


def test_a_set_value_keeps_every_equals_sign_after_the_first(tmp_path):
    """`--set KEY=VALUE` splits at the first `=`: a value may hold more of them (a path, a prompt)."""
    assert config.parse_override("data.path=/a=b/c==d") == (["data", "path"], "/a=b/c==d")
    assert config.load(Outer, write(tmp_path, "name: x\n"), ["maybe=k=v"]).maybe == "k=v"


def test_recipe_values_are_checked(tmp_path):
    path = write(tmp_path, "kind: tokenizer\nmodel: {image_size: 32, patch_size: 8, num_latent_tokens: 8}\n")
    cases = {
        "train.batch_size=-4": "train.batch_size: must be a positive integer",
        "model.regularizer={kind: vq, codebook_size: 0}": "model.regularizer.codebook_size: must be",
        "model.patch_size=5": "model.patch_size: must divide image_size",
        "model.regularizer={kind: softvq, num_codebooks: 16}": "model.num_latent_tokens: must be divisible",
        # Degenerate codebooks that trained without a word: l2-normalised 1-channel codes are -1 or +1 (a
        # 64-code VQ used 2 of them), and a single code (per SoftVQ codebook) makes every token the same.
        "model.regularizer={kind: vq, token_dim: 1}": "model.regularizer.token_dim: must be at least 2",
        "model.regularizer={kind: softvq, token_dim: 1}": "model.regularizer.token_dim: must be at least 2",
        "model.regularizer={kind: vq, codebook_size: 1}": "model.regularizer.codebook_size: must be at le",
        "model.regularizer={kind: softvq, codebook_size: 4}": "model.regularizer.codebook_size: must give",
        # The file's kind is not the one refused: it said "this is a 'generator' recipe; use `smapctl
        # train-generator`", which refuses this recipe's keys.
        "kind=generator": "kind: --set kind=generator makes it a 'generator' recipe; this command takes a",
        "model.mlp_ratio=0": "model.mlp_ratio: must be positive",
        # timm's blocks have int(width x mlp_ratio) MLP units: none at 768 x 0.001 (the towers had no MLP).
        "model.mlp_ratio=0.001": r"model.mlp_ratio: gives the MLP int\(768 x mlp_ratio\) = 0 units",
        "train.seed=-1": r"train.seed: must be in \[0, 2\*\*32 - 1\]",  # accelerate's set_seed raised
        # Said when loaded, with what to write (training said "neither an embedded dataset nor a folder").
        "data.dataset=digits:train": "data.dataset: 'digits:train' names a split; training takes the",
        "data.val_dataset=digits": "data.val_dataset: must be an image folder, not 'digits'",
        "train.seed=4294967296": r"train.seed: must be in \[0, 2\*\*32 - 1\]",
        "model.regularizer={kind: kl, kl_weight: -1}": "model.regularizer.kl_weight: must be >= 0",
        "model.regularizer={kind: vq, commitment_weight: -1}": "model.regularizer.commitment_weight: must",
        "model.regularizer={kind: softvq, entropy_weight: -1}": "model.regularizer.entropy_weight: must",
        "train.betas=[0.9]": r"train.betas: expected a list of 2 \(float, float\), got \[0.9\]",
        "train.betas=[0.9, 0.95, 0.99]": "train.betas: expected a list of 2",
        "data.crop_scale=[0.5]": "data.crop_scale: expected a list of 2",
        "data.val_fraction=1.0": r"data.val_fraction: must be in \[0, 1\) \(got 1.0\)",
        "data.crop_scale=[0, 1]": "data.crop_scale: must be two numbers with 0 < low <= high <= 1",
        "data.crop_scale=[0.9, 0.5]": "data.crop_scale: must be two numbers with 0 < low <= high <= 1",
        "data.num_workers=-1": "data.num_workers: must be >= 0",
        "train.betas=[0.9, high]": r"train.betas\[1\]: expected a number",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            load_tokenizer_recipe(path, [override])


def test_train_bounds_are_checked_at_their_edges(tmp_path):
    """The optimiser's and EMA's ranges, each refused just past its edge and accepted on it."""
    path = write(tmp_path, "kind: tokenizer\nmodel: {image_size: 32, patch_size: 8, num_latent_tokens: 8}\n")
    refused = {
        "train.grad_clip=-1": "train.grad_clip: must be >= 0",
        "train.ema_decay=1": r"train.ema_decay: must be in \[0, 1\)",
        "train.min_lr_ratio=1.5": r"train.min_lr_ratio: must be in \[0, 1\]",
        "train.betas=[1.0, 0.95]": r"train.betas: must be two numbers in \[0, 1\)",
        "train.weight_decay=-0.1": "train.weight_decay: must be >= 0",
        "train.warmup_steps=-1": "train.warmup_steps: must be >= 0",
        "train.keep_checkpoints=0": "train.keep_checkpoints: must be a positive integer",
        "train.max_nonfinite_steps=0": "train.max_nonfinite_steps: must be a positive integer",
    }
    for override, expected in refused.items():
        with pytest.raises(ConfigError, match=expected):
            load_tokenizer_recipe(path, [override])
    edges = ["train.grad_clip=0", "train.ema_decay=0", "train.min_lr_ratio=1", "train.betas=[0, 0.999]"]
    train = load_tokenizer_recipe(path, edges).train
    assert (train.grad_clip, train.ema_decay, train.min_lr_ratio) == (0, 0, 1)
    assert tuple(train.betas) == (0, 0.999)


def test_generator_recipe_values_are_checked(tmp_path):
    path = write(tmp_path, "kind: generator\n")
    cases = {
        "latents.batch_size=0": "latents.batch_size: must be a positive integer",
        "sample.temperature=0": "sample.temperature: must be positive",
        "sample.top_p=0": r"sample.top_p: must be in \(0, 1\]",
        "model.mlp_ratio=0.001": r"model.mlp_ratio: gives the MLP int\(768 x mlp_ratio\) = 0 units",
        "model={kind: maskgit, mlp_ratio: 0.001}": r"model.mlp_ratio: gives the MLP int\(768 x mlp_ratio\)",
    }
    for override, expected in cases.items():
        extra = ["model={kind: llamagen}"] if "top_p" in override else []
        with pytest.raises(ConfigError, match=expected):
            load_generator_recipe(path, [*extra, override])
    # Every generator takes cfg_scale, cfg_schedule and temperature.
    for kind in ("card", "llamagen", "maskgit"):
        recipe = load_generator_recipe(path, [f"model={{kind: {kind}}}", "sample.cfg_schedule=constant"])
        assert recipe.sample.cfg_schedule == "constant"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            f"model.num_latent_tokens={2**63}",
            f"model.num_latent_tokens: expected an integer below 2^63, got {2**63}",
        ),
        (f"train.max_steps={10**30}", "train.max_steps: expected an integer below 2^63"),
        (f"sample.steps={10**400}", "sample.steps: expected an integer below 2^63"),
        (f"train.lr={10**400}", f"train.lr: expected a finite number, got {10**400}"),
    ],
)
def test_numbers_beyond_what_torch_or_a_float_holds_are_one_line(tmp_path, override, expected):
    """`model.num_latent_tokens` 2^63 overflowed in torch.zeros, and an integer too large for a float (a
    number written out, 400 digits) made math.isfinite raise OverflowError: tracebacks."""
    kind = "generator" if override.startswith("sample.") else "tokenizer"
    load = load_generator_recipe if kind == "generator" else load_tokenizer_recipe
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, f"kind: {kind}\n"), [override])
    assert expected in str(e.value) and len(str(e.value).splitlines()) == 1


def test_guidance_other_than_1_needs_class_dropout():
    from smapctl.recipe import untrained_guidance

    assert untrained_guidance(0.1, 3.0) is None and untrained_guidance(0.0, 1.0) is None
    for scale in (0.5, 3.0):  # below 1 the null class steers too
        assert "never trains" in untrained_guidance(0.0, scale)


def test_recipe_must_state_its_kind(tmp_path):
    empty = write(tmp_path, "")
    with pytest.raises(ConfigError, match="kind: required key is missing"):
        load_tokenizer_recipe(empty)
    with pytest.raises(ConfigError, match="kind: required key is missing"):
        load_generator_recipe(empty)
    tok = write(tmp_path, "kind: tokenizer\n")
    with pytest.raises(ConfigError, match="use `smapctl train-tokenizer`"):
        load_generator_recipe(tok)


def test_preset_unknown_name(tmp_path):
    path = write(tmp_path, "model: {preset: SMAP-XXL}\n")
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'SMAP-XXL'; choose from SMAP-S"):
        config.load(TokenizerRecipe, path)


def test_dump_round_trip(tmp_path):
    cfg = load_tokenizer_recipe("recipes/softvq_b_64.yaml")
    path = write(tmp_path, config.dump_yaml(cfg))
    assert config.load(TokenizerRecipe, path) == cfg


def test_yaml_12_booleans(tmp_path):
    """`no` is a string (YAML 1.2), so `precision: no` means no mixed precision, not False."""
    path = write(tmp_path, "kind: tokenizer\ntrain: {precision: no}\nmodel: {class_condition: false}\n")
    cfg = load_tokenizer_recipe(path, ["loss.gan_adaptive_weight=true"])
    assert cfg.train.precision == "no" and cfg.model.class_condition is False
    assert load_tokenizer_recipe(path, ["train.precision=no"]).train.precision == "no"


def test_yaml_12_numbers_and_no_dates(tmp_path):
    """YAML 1.1 read `0500` as octal 320 and `1:00` as 60 (base 60), `2024-05-01` as a date, and
    refused `-.5`."""
    path = write(tmp_path, "kind: tokenizer\n")
    assert config.parse_override("x=-.5e-3")[1] == -0.0005
    assert load_tokenizer_recipe(path, ["train.ema_decay=+.5"]).train.ema_decay == 0.5
    assert load_tokenizer_recipe(path, ["train.warmup_steps=1_000"]).train.warmup_steps == 1000
    for value in ("0500", "1:00"):
        with pytest.raises(ConfigError, match=f"train.warmup_steps: expected an integer, got '{value}'"):
            load_tokenizer_recipe(path, [f"train.warmup_steps={value}"])
    dated = write(tmp_path, "kind: tokenizer\ndata: {dataset: 2024-05-01}\n", "dated.yaml")
    assert load_tokenizer_recipe(dated).data.dataset.endswith("2024-05-01")  # a folder of that name


def test_a_string_that_reads_as_a_number_is_quoted_in_the_runs_recipe(tmp_path):
    """`loss.perceptual_weights: '1e3'` (a file of that name) was written bare into recipe.yaml and read
    back as 1000.0 on --resume."""
    cfg = load_tokenizer_recipe(write(tmp_path, "kind: tokenizer\nloss: {perceptual_weights: '1e3'}\n"))
    again = load_tokenizer_recipe(write(tmp_path, config.dump_yaml(cfg), "again.yaml"))
    assert again == cfg and again.loss.perceptual_weights.endswith("1e3")
    # Quoted where YAML 1.1 (other tools) would read it as something else too.
    assert "precision: 'no'" in config.dump_yaml(
        load_tokenizer_recipe(path := write(tmp_path, "kind: tokenizer\n"))
    )
    assert path.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [tokenizer]\n", r"kind: expected a name \('tokenizer'\), got \['tokenizer'\]"),
        ("kind: tokenizer\nmodel: {preset: [SMAP-S]}\n", r"model.preset: unknown preset \['SMAP-S'\]"),
        ("kind: tokenizer\nmodel: {regularizer: {kind: [vq]}}\n", "model.regularizer.kind: expected one of"),
        ("kind: tokenizer\n? [a, b]\n: 1\n", r"line 2: a list as a key; keys are names"),
        ("kind: tokenizer\n1: a\n", r"line 2: a int as a key; keys are names"),
    ],
)
def test_values_that_are_not_names_are_one_line(tmp_path, text, expected):
    """Each was a TypeError traceback (unhashable, or not comparable when sorted)."""
    with pytest.raises(ConfigError, match=expected):
        load_tokenizer_recipe(write(tmp_path, text))


def test_a_recipe_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="x.yaml: not a UTF-8 text file"):
        load_tokenizer_recipe(path)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("loop", "loop: a broken symbolic link, not a recipe file"),
        ("loop/r.yaml", "loop/r.yaml: recipe file not found"),
        ("/dev/null", "/dev/null: not a regular file, not a recipe file"),
    ],
)
def test_a_recipe_path_that_leads_to_no_file_is_one_line(tmp_path, monkeypatch, given, expected):
    """A symbolic link in a loop was a RuntimeError traceback (Path.resolve on Python 3.11 and 3.12), and
    /dev/null was "recipe file not found"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ConfigError) as e:
        load_tokenizer_recipe(given)
    assert str(e.value).endswith(expected)


def test_range_errors_give_the_value_and_where_it_came_from(tmp_path):
    path = write(tmp_path, "kind: tokenizer\n")
    cases = {  # the value was not said, and the file was blamed for a --set value
        "model.num_latent_tokens=0": "tokens: must be a positive integer (got 0) (from --set model.num",
        "loss.disc_layers=0": "loss.disc_layers: must be a positive integer (got 0)",  # named disc_width
        "train.lr=.inf": "train.lr: expected a finite number, got inf (from --set train.lr=.inf)",
        "trian.lr=1": "trian: unknown key; valid keys here are: kind, model",
        # A section given whole: said as a recipe writes it (it said "VQConfig | KLConfig | SoftVQConfig"),
        # and a key inside it named as from the --set (it said nothing).
        "model.regularizer=3": "regularizer: expected a section with kind: 'vq' | 'kl' | 'softvq', got 3",
        "model.regularizer={kind: foo}": "model.regularizer.kind: expected one of ['kl', 'softvq', 'vq']",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            load_tokenizer_recipe(path, [override])
        assert expected in str(e.value) and str(e.value).startswith(f"{path}: ")
        assert str(e.value).endswith(f"(from --set {override})")
    gen = write(tmp_path, "kind: generator\nlatents: {tokenizer: x}\n", "g.yaml")
    for override in ("sample.choice_temperature=-1", "sample.cfg_scale=.inf", "sample.temperature=.nan"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):  # `sample --cfg inf` is refused too
            load_generator_recipe(gen, [override])


def test_a_check_against_a_key_set_on_the_command_line_names_that_set(tmp_path):
    """`--set model.image_size=30` failed as `model.patch_size: must divide image_size (got 8)`, the
    file's patch size blamed and the value on the command line that made it wrong not said."""
    path = write(tmp_path, "kind: tokenizer\nmodel: {image_size: 32, patch_size: 8}\n")
    for override, expected in {
        "model.image_size=30": "model.patch_size: must divide image_size (got 8)",
        "model.enc_width=66": "model.enc_heads: must divide enc_width",
    }.items():
        with pytest.raises(ConfigError) as e:
            load_tokenizer_recipe(path, ["train.lr=1e-3", override])
        assert expected in str(e.value) and str(e.value).endswith(f"(from --set {override})")
    bad = write(tmp_path, "kind: tokenizer\nmodel: {image_size: 30, patch_size: 8}\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:  # the file's own values: no --set is blamed
        load_tokenizer_recipe(bad, ["model.num_latent_tokens=16"])
    assert str(e.value).endswith("must divide image_size (got 8)")


def test_a_sampling_setting_the_generator_does_not_use_is_refused(tmp_path):
    """`sample.top_k: 40` in a CARD recipe was kept and never used (`smapctl sample --top-k` is refused)."""
    gen = write(tmp_path, "kind: generator\nlatents: {tokenizer: x}\nsample: {top_k: 40}\n", "g.yaml")
    with pytest.raises(ConfigError, match=r"sample.top_k: a card generator does not use it, only llamagen"):
        load_generator_recipe(gen)
    with pytest.raises(ConfigError, match=r"sample.method: .* maskgit generator .*\(from --set"):
        load_generator_recipe(gen, ["model={kind: maskgit}", "sample.top_k=0", "sample.method=heun"])
    ok = load_generator_recipe(gen, ["model={kind: llamagen}", "sample.steps=25"])  # defaults say nothing
    assert ok.sample.top_k == 40


def test_changing_a_kind_with_set_names_the_change(tmp_path):
    """`--set model.regularizer.kind=vq` on a KL recipe blamed kl_weight, a key the user never wrote."""
    path = write(tmp_path, "kind: tokenizer\nmodel: {regularizer: {kind: kl, kl_weight: 1e-6}}\n")
    with pytest.raises(ConfigError) as e:
        load_tokenizer_recipe(path, ["model.regularizer.kind=vq"])
    assert "model.regularizer.kl_weight: unknown key" in str(e.value)
    assert "a setting of kind 'kl', which --set model.regularizer.kind=vq changed" in str(e.value)
    assert "--set 'model.regularizer={kind: vq, ...}'" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a key set on the command line: its own --set is named
        load_tokenizer_recipe(
            path,
            ["model.regularizer.kind=vq", "model.regularizer.kl_weight=0", "model.regularizer.token_dim=0"],
        )
    assert "(from --set model.regularizer.kl_weight=0)" in str(e.value)
    vq = load_tokenizer_recipe(path, ["model.regularizer={kind: vq, codebook_size: 64}"])
    assert vq.model.regularizer.codebook_size == 64


def test_describe_gives_a_readable_reason():
    from smapctl.errors import describe

    assert describe(KeyError(101), "fallback") == "fallback"  # torch.load on a text file
    assert describe(RuntimeError("PytorchStreamReader failed. More text\nsecond line"), "x") == (
        "PytorchStreamReader failed"
    )
    assert describe(ValueError(""), "fallback") == "fallback"


def test_folder_paths_become_absolute_and_dataset_names_stay(tmp_path, monkeypatch):
    """A run records its folders as absolute paths: `evaluate`, `train-generator` and `--resume` used to
    read a relative `data/train` from wherever they ran, other images without a word."""
    monkeypatch.chdir(tmp_path)
    tok = write(tmp_path, "kind: tokenizer\ndata: {dataset: imgs, val_dataset: ~/val}\n")
    recipe = load_tokenizer_recipe(tok)
    assert recipe.data.dataset == str(tmp_path / "imgs")
    assert recipe.data.val_dataset == str(Path("~/val").expanduser())
    assert (
        load_tokenizer_recipe(tok, ["data.dataset=digits", "data.val_dataset=null"]).data.dataset == "digits"
    )
    gen = write(
        tmp_path, "kind: generator\nlatents: {tokenizer: runs/tok, dataset: photos:train}\n", "g.yaml"
    )
    recipe = load_generator_recipe(gen)
    assert recipe.latents.tokenizer == str(tmp_path / "runs" / "tok")
    assert recipe.latents.dataset == "photos:train"
    assert load_generator_recipe(gen, ["latents.dataset=../x"]).latents.dataset == str(tmp_path.parent / "x")


def test_a_relative_perceptual_weights_file_is_recorded_absolute(tmp_path, monkeypatch):
    """A VGG-16 file kept beside the recipes (`loss.perceptual_weights: vgg16-397923af.pth`, as a user of the
    installed package keeps it next to their data) was recorded as written: a `--resume` of the run's
    recipe.yaml from another folder looked for it there, and stopped."""
    from smapctl.train.losses import perceptual_weights_problem

    project = tmp_path / "project"
    project.mkdir()
    (project / "vgg16-397923af.pth").write_bytes(b"")
    monkeypatch.chdir(project)
    text = "kind: tokenizer\nloss: {perceptual_weight: 0.1, perceptual_weights: vgg16-397923af.pth}\n"
    tok = write(project, text)
    recipe = load_tokenizer_recipe(tok)
    assert recipe.loss.perceptual_weights == str(project / "vgg16-397923af.pth")
    run_recipe = write(tmp_path, config.dump_yaml(recipe), "recipe.yaml")  # as the run keeps it
    monkeypatch.chdir(tmp_path)
    assert perceptual_weights_problem(load_tokenizer_recipe(run_recipe).loss) is None
    unset = load_tokenizer_recipe(tok, ["loss.perceptual_weights=null", "loss.perceptual_weight=0"])
    assert unset.loss.perceptual_weights is None


def test_an_empty_path_is_not_the_working_directory(tmp_path, monkeypatch):
    """`--set latents.tokenizer=` (or an empty dataset) became the working directory, made absolute."""
    monkeypatch.chdir(tmp_path)
    gen = write(tmp_path, "kind: generator\n", "g.yaml")
    tok = write(tmp_path, "kind: tokenizer\n")
    for load, key in (
        (load_generator_recipe, "latents.tokenizer"),
        (load_generator_recipe, "latents.dataset"),
        (load_tokenizer_recipe, "data.dataset"),
        (load_tokenizer_recipe, "data.val_dataset"),
    ):
        with pytest.raises(ConfigError, match=rf"{key}: must name .* \(got ''\) \(from --set {key}=\)"):
            load(gen if load is load_generator_recipe else tok, [f"{key}="])


def test_a_run_recorded_with_relative_paths_compares_equal_from_the_same_folder(tmp_path, monkeypatch):
    """`reproduce mini` reuses a finished run whose recipe equals the new one: an older run's relative
    paths must not make it "another recipe" (it was deleted and trained again)."""
    monkeypatch.chdir(tmp_path)
    loaded = load_generator_recipe(
        write(tmp_path, "kind: generator\nlatents: {tokenizer: runs/tok, dataset: imgs}\n")
    )
    old = config.to_dict(loaded)
    old["latents"] |= {"tokenizer": "runs/tok", "dataset": "imgs"}  # as recorded before
    assert config.build(GeneratorRecipe, old) != loaded
    assert with_absolute_paths(config.build(GeneratorRecipe, old)) == loaded


def test_a_discriminator_too_deep_for_the_images_is_refused_when_loaded(tmp_path):
    """16-px images leave nothing after 3 halvings: the GAN used to crash at loss.gan_start_step, which
    at paper scale is hours into the run."""
    text = (
        "kind: tokenizer\nmodel: {image_size: 16, patch_size: 4}\nloss: {gan_weight: 0.1, disc_layers: 3}\n"
    )
    with pytest.raises(
        ConfigError, match=r"loss.disc_layers: 3 halvings leave nothing of 16-px .* at most 2"
    ):
        load_tokenizer_recipe(write(tmp_path, text))
    assert load_tokenizer_recipe(write(tmp_path, text.replace("3}", "2}"))).loss.disc_layers == 2
    assert load_tokenizer_recipe(write(tmp_path, text.replace("0.1", "0.0"))).loss.gan_weight == 0  # no GAN
    tiny = text.replace("16, patch_size: 4", "4, patch_size: 2").replace("3}", "1}")
    with pytest.raises(ConfigError, match=r"4-px images .* images this small take loss.gan_weight: 0"):
        load_tokenizer_recipe(write(tmp_path, tiny))


def test_a_loss_without_a_reconstruction_term_is_refused_when_loaded(tmp_path):
    """loss.pixel_weight 0 with no perceptual loss trained the regularizer's loss alone (a loss near 1e-7,
    an untrained decoder) without a word; an adaptive GAN weight is 0 then too. A GAN at a fixed weight
    does train the decoder."""
    text = "kind: tokenizer\nmodel: {image_size: 16, patch_size: 4}\nloss: {pixel_weight: 0}\n"
    with pytest.raises(
        ConfigError, match=r"loss.pixel_weight: 0 with perceptual_weight 0 leaves nothing to train"
    ):
        load_tokenizer_recipe(write(tmp_path, text))
    gan = "gan_weight: 0.1, disc_layers: 2"
    with pytest.raises(ConfigError, match=r"the adaptive GAN weight scales with their gradient"):
        load_tokenizer_recipe(write(tmp_path, text.replace("0}", f"0, {gan}}}")))
    fixed = text.replace("0}", f"0, {gan}, gan_adaptive_weight: false}}")
    assert load_tokenizer_recipe(write(tmp_path, fixed)).loss.pixel_weight == 0


def test_a_gan_with_a_discriminator_that_never_learns_is_refused(tmp_path):
    """loss.disc_lr 0 (train.lr must be positive) trained the decoder against a discriminator kept at its
    random weights; without a GAN the rate is unused and may be anything."""
    path = write(tmp_path, "kind: tokenizer\nmodel: {image_size: 16, patch_size: 4}\n")
    gan = ["loss.gan_weight=0.1", "loss.disc_layers=2"]
    with pytest.raises(
        ConfigError, match=r"loss.disc_lr: must be positive when gan_weight is above 0 \(got 0.0\)"
    ):
        load_tokenizer_recipe(path, [*gan, "loss.disc_lr=0"])
    assert load_tokenizer_recipe(path, ["loss.disc_lr=0"]).loss.disc_lr == 0


def test_checkpoint_recipes_of_older_runs_still_build():
    """The load-time checks of embedded names and of the seed must not refuse the recipe stored in an
    older checkpoint (a run with `val_dataset: photos` read the folder ./photos; seeds up to 2**32 - 1
    trained), or its tokenizer could no longer be used."""
    from smapctl.config import to_dict
    from smapctl.train.runner import seed_in_range

    stored = to_dict(load_tokenizer_recipe(Path(__file__).parents[1] / "recipes/demo/tokenizer.yaml"))
    stored["data"]["val_dataset"] = "photos"
    stored["train"]["seed"] = 3_000_000_000
    recipe = config.build(TokenizerRecipe, stored)
    assert (recipe.data.val_dataset, recipe.train.seed) == ("photos", 3_000_000_000)
    # accelerate's set_seed adds the process index; numpy takes seeds below 2**32.
    assert seed_in_range(3_000_000_000, 8) == 3_000_000_000
    assert seed_in_range(2**32 - 1, 2) + 1 < 2**32


def test_a_preset_set_on_the_command_line_says_which_recipe_keys_still_win(tmp_path, caplog):
    """`--set model.preset=SMAP-B` on a recipe listing its sizes changed nothing without a word."""
    path = write(tmp_path, "kind: tokenizer\nmodel: {enc_width: 48, enc_heads: 4, num_classes: 1000}\n")
    with caplog.at_level("WARNING"):
        cfg = load_tokenizer_recipe(path, ["model.preset=SMAP-B", "model.enc_heads=12"])
    assert cfg.model.enc_width == 48 and cfg.model.dec_width == 1024  # the file's key wins, as documented
    [record] = caplog.records
    assert "--set model.preset=SMAP-B:" in record.message and "sets model.enc_width itself" in record.message
    assert "enc_width=768" in record.message and "num_classes" not in record.message  # same as the preset's
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_tokenizer_recipe(write(tmp_path, "kind: tokenizer\n", "plain.yaml"), ["model.preset=SMAP-B"])
    assert caplog.records == []


def test_merge_keys_folders_and_home_in_base(tmp_path, monkeypatch):
    """An explicit key after `<<: *anchor` was refused as a duplicate; a folder given as the recipe was
    "not found"; `base: ~/x.yaml` was not expanded."""
    text = "kind: tokenizer\nx: &sizes {enc_width: 48, enc_heads: 4}\n"
    path = write(tmp_path, text + "model:\n  <<: *sizes\n  enc_heads: 12\n")
    data = config.read_yaml(path)
    assert data["model"] == {"enc_width": 48, "enc_heads": 12}
    with pytest.raises(ConfigError, match=r"duplicate key 'enc_heads' \(line 6\)"):
        config.read_yaml(write(tmp_path, text + "model:\n  <<: *sizes\n  enc_heads: 12\n  enc_heads: 6\n"))
    with pytest.raises(ConfigError, match=f"{tmp_path}: a folder, not a recipe file"):
        config.read_yaml(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, "kind: tokenizer\ntrain: {seed: 7}\n", "home.yaml")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub", "base: ~/home.yaml\n")
    assert config.read_recipe_dict(child)["train"] == {"seed": 7}


def test_the_short_run_warning_is_for_runs_shorter_than_the_emas_horizon(caplog):
    """The EMA warning was checked on runs 4 to 333,333 times shorter than the EMA's horizon (1 / (1 -
    decay) steps) alone: one said for every run (the paper's 400,000 steps at 0.9999 too), or only for
    runs at least twice too short, passed. It is said for a run shorter than the horizon, not a longer one."""
    import logging
    from types import SimpleNamespace

    from smapctl.recipe import warn_if_the_ema_outlasts_the_run

    for steps, warned in ((6_000, True), (20_000, False), (400_000, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_if_the_ema_outlasts_the_run(SimpleNamespace(ema_decay=0.9999, max_steps=steps))
        assert ("averages over about 10000 steps" in caplog.text) is warned, (steps, caplog.text)


def test_the_short_run_warning_names_the_weights_each_kind_is_used_with(caplog):
    """A generator run cut short was told to pass `--weights model` to sample and evaluate, which a
    generator's samples do not take (sample refused it; evaluate --generator ignored it)."""
    import logging
    from types import SimpleNamespace

    from smapctl.recipe import warn_if_the_ema_outlasts_the_run

    short = SimpleNamespace(ema_decay=0.9999, max_steps=200)
    with caplog.at_level(logging.WARNING):
        warn_if_the_ema_outlasts_the_run(short, "generator")
    assert "(those sample, evaluate --generator use)" in caplog.text and "--weights" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_if_the_ema_outlasts_the_run(short)
    assert "(those tokenize, evaluate, cross-recon use)" in caplog.text
    assert caplog.text.rstrip().endswith("or pass --weights model to those commands")
    # The advice fits the run: a fixed 0.99 (about 100 steps) was told to a 3-step run with decay 0.9.
    assert "--set train.ema_decay=0.95 for this run" in caplog.text  # about 20 of its 200 steps
    for steps, advice in ((3, "0"), (1000, "0.99"), (3000, "0.9967"), (250_000, "0.99996")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_if_the_ema_outlasts_the_run(SimpleNamespace(ema_decay=0.999999, max_steps=steps))
        assert f"--set train.ema_decay={advice} for this run" in caplog.text, (steps, caplog.text)


def test_a_run_cut_short_within_its_warmup_is_warned_about(capsys, caplog):
    """`--max-steps 1000` on a paper recipe (100,000 warm-up steps) trained at 1% of train.lr at most,
    without a word; the --max-steps help says the schedule follows N."""
    import logging

    from tiny_tokenizer import ROOT, run_cli

    for command, recipe in (("train-tokenizer", "kl_s_128.yaml"), ("train-generator", "maskgit_l_64.yaml")):
        for steps, warned in ((1000, True), (10**6, False)):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                code, _, err = run_cli(
                    capsys, command, ROOT / "recipes" / recipe, "--max-steps", steps, "--dry-run"
                )
            assert code == 0, err
            said = f"is longer than this run's {steps} steps: the learning rate only rises to"
            assert (said in caplog.text) is warned, (recipe, caplog.text)
            assert ("--set train.warmup_steps=100 for this run" in caplog.text) is warned


def test_a_frozen_class_table_needs_the_shared_one(tmp_path):
    """`class_embed: independent` with `model.freeze_class_embed: true` trained with a random class table
    that never moved."""
    gen = write(tmp_path, "kind: generator\n", "g.yaml")
    with pytest.raises(ConfigError, match=r"model.freeze_class_embed: only with class_embed: shared"):
        load_generator_recipe(gen, ["class_embed=independent", "model.freeze_class_embed=true"])
    assert load_generator_recipe(gen, ["model.freeze_class_embed=true"]).model.freeze_class_embed
    independent = load_generator_recipe(gen, ["class_embed=independent"])
    assert independent.class_embed == "independent"
    # A run that trained so before the check is still read back (its stored recipe is not refused).
    stored = config.to_dict(independent)
    stored["model"]["freeze_class_embed"] = True
    assert config.build(GeneratorRecipe, stored).model.freeze_class_embed


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("kind: tokenizer\ntrain: {preset: SMAP-S}\n", "train.preset: section 'train' has no presets"),
        (
            "kind: tokenizer\nmodel: {regularizer: {kind: vq, preset: SMAP-S}}\n",
            "model.regularizer.preset: section 'model.regularizer' has no presets",
        ),
        ("kind: generator\nsample: {preset: CARD-B}\n", "sample.preset: section 'sample' has no presets"),
    ],
    ids=["train", "model.regularizer", "sample"],
)
def test_a_preset_in_a_section_without_presets_is_one_line(tmp_path, capsys, text, where):
    """`preset:` is a model section's key (SMAP-S, CARD-B, ...); in another section it is refused in one
    line naming the file and key, not taken for an unknown key nor ignored."""
    path = write(tmp_path, text)
    code, _, err = run_cli(capsys, f"train-{text.split()[1]}", path, "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and where in lines[0], lines[0]


def test_a_maskgit_may_take_as_many_decoding_steps_as_it_has_tokens():
    """One token fixed per step: `steps == num_tokens` fits, one more does not (other kinds: any)."""
    from smapctl.recipe import too_many_steps

    assert too_many_steps("maskgit", 8, 8) is None and too_many_steps("maskgit", 1, 8) is None
    assert too_many_steps("maskgit", 9, 8) == (
        "a MaskGIT decodes at least one of its 8 tokens per step: use at most 8"
    )
    assert too_many_steps("card", 100, 8) is None


def test_a_maskgit_recipe_without_sample_steps_decodes_in_8_steps():
    """Issue 10: T decoding steps, 8 by default. A MaskGIT recipe without `sample.steps` took CARD's 25
    flow steps (and on the demo's 16 tokens, `sample` refused them); one that gives steps keeps them."""

    def steps(kind, **sample):
        raw = {"kind": "generator", "model": {"kind": kind}, "sample": sample}
        return config.build(GeneratorRecipe, raw).sample.steps

    assert (steps("maskgit"), steps("card"), steps("llamagen")) == (8, 25, 25)
    assert steps("maskgit", steps=25) == 25 and steps("card", steps=3) == 3


def test_the_short_run_ema_decay_advice_is_a_plain_number():
    """About a tenth of the run, to one digit past its nines; 0 (no averaging) below 20 steps."""
    from smapctl.recipe import short_run_ema_decay

    assert [short_run_ema_decay(n) for n in (5, 10, 19)] == ["0", "0", "0"]
    assert short_run_ema_decay(20) == "0.5" and short_run_ema_decay(200) == "0.95"
    assert short_run_ema_decay(1000) == "0.99" and short_run_ema_decay(2000) == "0.995"


def test_a_warmup_exactly_as_long_as_the_run_is_not_warned_of(caplog):
    """`lr_at` reaches train.lr at step warmup_steps - 1: a warm-up of max_steps still gets there."""
    from smapctl.recipe import warn_if_the_warmup_outlasts_the_run
    from smapctl.train.config import TrainConfig

    with caplog.at_level(logging.WARNING):
        warn_if_the_warmup_outlasts_the_run(TrainConfig(max_steps=100, warmup_steps=100))
        assert not caplog.records
        warn_if_the_warmup_outlasts_the_run(TrainConfig(max_steps=100, warmup_steps=101))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "train.warmup_steps 101 is longer than this run's 100 steps"
    ]
