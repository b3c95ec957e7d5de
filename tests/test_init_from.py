"""`train-* --init-from`: a new run starts from another run's weights (fine-tuning). Its step-0 weights
are the checkpoint's EMA weights bit for bit (the class embedding anew for other classes), it trains
with a fresh optimizer, records where it started, resumes without the option, and every refusal is one
line, also from a dry run."""

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import (
    adam_steps,
    assert_same_checkpoint,
    error_lines,
    load,
    regularizer_sets,
    run_cli,
    tiny_generator_model,
    write_recipe,
)

from smapctl.recipe import load_generator_recipe, load_tokenizer_recipe
from smapctl.train import checkpoint as ckpt
from smapctl.train.generator import train_generator
from smapctl.train.logging import read_metrics
from smapctl.train.runner import TrainingRun
from smapctl.train.tokenizer import _built_parts, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "train.max_steps=6",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.sample_every=6",
    "train.warmup_steps=0",
]


def _record_start(mp) -> dict:
    """{weights name: its state dict} as the run hands them to `TrainingRun.start`: its step-0 weights."""
    seen: dict = {}
    start = TrainingRun.start

    def recorded(self, weights, optimizers, **kw):
        seen.update(
            {n: {k: v.detach().clone() for k, v in w.state_dict().items()} for n, w in weights.items()}
        )
        return start(self, weights, optimizers, **kw)

    mp.setattr(TrainingRun, "start", recorded)
    return seen


def _assert_equal(a: dict, b: dict, skip: str = "-") -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith(skip):
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def finetuned(tiny_kl_tokenizer, tmp_path_factory):
    """A 6-step tokenizer run started from the tiny KL tokenizer (3 steps) -> (run folder, step-0 weights)."""
    with pytest.MonkeyPatch.context() as mp:
        seen = _record_start(mp)
        recipe = load_tokenizer_recipe(tiny_kl_tokenizer / "recipe.yaml", SHORT)
        run_dir = tmp_path_factory.mktemp("finetuned")
        train_tokenizer(recipe, run_dir, init_from=tiny_kl_tokenizer)
    return run_dir, seen


def test_a_tokenizer_starts_from_the_checkpoints_ema_weights_and_trains(tiny_kl_tokenizer, finetuned):
    run_dir, seen = finetuned
    source = ckpt.latest_checkpoint(tiny_kl_tokenizer)
    ema = ckpt.load_weights(source, "ema")
    assert any(not torch.equal(ema[k], w) for k, w in ckpt.load_weights(source, "model").items())
    _assert_equal(seen["model"], ema)  # bit for bit
    _assert_equal(seen["ema"], ema)  # the new average starts from the same weights
    final = ckpt.latest_checkpoint(run_dir)
    meta = ckpt.load_meta(final)
    assert meta["step"] == 6 and adam_steps(final) == 6  # its own optimizer, from step 0
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
    trained = ckpt.load_weights(final, "model")
    assert any(not torch.equal(trained[k], w) for k, w in ema.items())
    assert meta["init_from"] == {
        "path": str(source.resolve()),
        "weights": "ema",
        "step": 3,
        "fingerprint": meta["init_from"]["fingerprint"],
    }


def test_a_resume_of_a_finetuning_run_goes_on_from_its_own_checkpoint(finetuned, tmp_path, capsys):
    run_dir, _ = finetuned
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(ckpt.checkpoint_dir(copy, 6))
    code, _, err = run_cli(capsys, "train-tokenizer", copy / "recipe.yaml", "--out", copy, "--resume")
    assert code == 0, err
    final = ckpt.latest_checkpoint(copy)
    assert_same_checkpoint(ckpt.latest_checkpoint(run_dir), final)  # as the uninterrupted run
    assert ckpt.load_meta(final)["init_from"] == ckpt.load_meta(ckpt.checkpoint_dir(run_dir, 6))["init_from"]
    code, _, err = run_cli(
        capsys, "train-tokenizer", copy / "recipe.yaml", "--out", copy, "--resume", "--init-from", run_dir
    )
    assert code == 1 and error_lines(err) == [
        "error: --init-from with --resume: a resumed run goes on with the weights of its own newest"
        " checkpoint; leave out --init-from (a run started with it goes on without it)"
    ]


def test_other_classes_start_a_new_class_embedding_and_keep_every_other_weight(
    tiny_kl_tokenizer, tmp_path, monkeypatch, caplog
):
    """The digits tokenizer on the 9 photos: the class embedding is the seed's, the rest the EMA's."""
    seen = _record_start(monkeypatch)
    sets = ["data.dataset=photos", "model.num_classes=9", "train.max_steps=1", "model.tail_drop=none"]
    recipe = load_tokenizer_recipe(tiny_kl_tokenizer / "recipe.yaml", sets)
    train_tokenizer(recipe, tmp_path / "photos", init_from=tiny_kl_tokenizer)
    source = ckpt.latest_checkpoint(tiny_kl_tokenizer)
    _assert_equal(seen["model"], ckpt.load_weights(source, "ema"), skip="class_embed.")
    fresh = _built_parts(recipe).model.class_embed.table.weight
    assert torch.equal(seen["model"]["class_embed.table.weight"], fresh)
    assert "its class embedding starts anew" in caplog.text and "are not the 10 of" in caplog.text


def test_refusals_are_one_line_before_training_and_by_a_dry_run(tiny_kl_tokenizer, tmp_path, capsys):
    recipe = tiny_kl_tokenizer / "recipe.yaml"
    source = ckpt.latest_checkpoint(tiny_kl_tokenizer)
    out = tmp_path / "new"
    base = ["train-tokenizer", recipe, "--out", out, "--init-from", tiny_kl_tokenizer]
    for dry in ([], ["--dry-run"]):
        code, _, err = run_cli(
            capsys, *base, *dry, "--set", "model.enc_depth=2", "--set", "model.mlp_ratio=2"
        )
        assert code == 1 and error_lines(err) == [
            f"error: --init-from: {source} is of another model (model.enc_depth 1, the recipe says 2;"
            " model.mlp_ratio 4.0, the recipe says 2.0); a run starts only from weights of its own model:"
            " --set model.enc_depth=1 --set model.mlp_ratio=4.0"
        ], err
        code, _, err = run_cli(
            capsys, *base, *dry, "--set", "model.regularizer={kind: vq, codebook_size: 64}"
        )
        assert code == 1 and error_lines(err) == [
            f"error: --init-from: {source} is of another model (model.regularizer.kind 'kl', the recipe says"
            " 'vq'); a run starts only from weights of its own model: --set 'model.regularizer={kind: kl,"
            " token_dim: 16, kl_weight: 1e-06}'"
        ], err
        code, _, err = run_cli(capsys, *base, *dry, "--resume")
        assert code == 1 and error_lines(err)[0].startswith("error: --init-from with --resume:")
        code, _, err = run_cli(capsys, *base[:4], "--init-from", tmp_path / "none", *dry)
        assert code == 1 and error_lines(err) == [
            f"error: --init-from: {tmp_path / 'none'}: no such checkpoint or run folder"
        ]
        # (it was taken without a word; `ema`, the weights --init-from takes by default, too: a forgotten
        # --init-from trained from random weights)
        for command, weights in itertools.product(("train-tokenizer", "train-generator"), ("model", "ema")):
            code, _, err = run_cli(capsys, command, recipe, "--out", out, "--init-weights", weights, *dry)
            assert code == 1 and error_lines(err) == [
                f"error: --init-weights {weights}: only with --init-from (the checkpoint to start from)"
            ], err
    assert not out.exists()
    code, stdout, err = run_cli(capsys, *base, "--dry-run", "--init-weights", "model")
    assert code == 0, err
    assert f"starts from {source} (its model weights, step 3)" in " ".join(stdout.split())


def test_a_checkpoint_without_the_weights_to_start_from_is_refused(tiny_kl_tokenizer, tmp_path, capsys):
    """A checkpoint folder that lacks the weights --init-weights names (its ema.safetensors taken away, say)
    is refused in one line naming the weights it has, by a dry run too."""
    source = tmp_path / "checkpoint"
    shutil.copytree(ckpt.latest_checkpoint(tiny_kl_tokenizer), source)
    (source / "ema.safetensors").unlink()
    have = ", ".join(ckpt.weight_names(source))
    assert "ema" not in ckpt.weight_names(source) and have
    out = tmp_path / "new"
    base = ["train-tokenizer", tiny_kl_tokenizer / "recipe.yaml", "--out", out, "--init-from", source]
    for dry in (["--dry-run"], []):
        code, _, err = run_cli(capsys, *base, *dry)
        assert code == 1 and error_lines(err) == [
            f"error: --init-from: {source} has no ema weights (it has: {have})"
        ], err
    assert not out.exists()


def test_a_setting_of_the_objective_alone_may_change_and_is_logged(tmp_path, caplog):
    """SoftVQ's entropy_temperature sharpens only its entropy loss: a fine-tuning run may change it (it was
    refused as another model); its temperature makes the latents (eq. 11), another one is refused."""
    from smapctl.config import to_dict
    from smapctl.errors import UserError
    from smapctl.train.init import InitFrom, check_same_model

    recipe = write_recipe(tmp_path)
    saved = load(recipe, *regularizer_sets("softvq"))
    init = InitFrom(tmp_path, {"recipe": {"model": to_dict(saved.model)}}, "ema")
    sharper = load(recipe, *regularizer_sets("softvq"), "model.regularizer.entropy_temperature=0.05")
    with caplog.at_level("INFO", logger="smapctl.train"):
        check_same_model(init, sharper, "tokenizer")
    assert "model.regularizer.entropy_temperature 0.01 -> 0.05" in caplog.text
    other = load(recipe, *regularizer_sets("softvq"), "model.regularizer.temperature=0.5")
    with pytest.raises(UserError, match="is of another model \\(model.regularizer.temperature 0.07,"):
        check_same_model(init, other, "tokenizer")


def test_the_discriminator_starts_from_the_checkpoints_when_it_fits(tmp_path, monkeypatch, caplog):
    gan = ["loss.gan_weight=0.1", "loss.gan_start_step=2", "loss.disc_width=8", "loss.disc_layers=2"]
    recipe = write_recipe(tmp_path)
    train_tokenizer(load(recipe, *gan, "train.max_steps=3"), tmp_path / "source")
    source = ckpt.latest_checkpoint(tmp_path / "source")
    seen = _record_start(monkeypatch)
    at_once = ["loss.gan_start_step=0", "train.max_steps=1"]
    train_tokenizer(load(recipe, *gan, *at_once), tmp_path / "same", init_from=source)
    _assert_equal(seen["discriminator"], ckpt.load_weights(source, "discriminator"))
    _assert_equal(seen["model"], ckpt.load_weights(source, "ema"))
    wider = [*gan, *at_once, "loss.disc_width=16"]
    train_tokenizer(load(recipe, *wider), tmp_path / "wider", init_from=source, init_weights="model")
    _assert_equal(seen["model"], ckpt.load_weights(source, "model"))
    assert "discriminator is of another shape (loss.disc_width 8 -> 16); the run's starts anew" in caplog.text


def test_a_checkpoint_without_a_discriminator_starts_the_runs_anew(tmp_path, monkeypatch, caplog):
    """A run without the GAN (loss.gan_weight 0) saved no discriminator: a fine-tuning run with it starts
    its discriminator anew, said in one line, and trains (the tokenizer's weights are what it starts
    from)."""
    recipe = write_recipe(tmp_path)
    train_tokenizer(load(recipe, "loss.gan_weight=0", "train.max_steps=1"), tmp_path / "source")
    source = ckpt.latest_checkpoint(tmp_path / "source")
    assert "discriminator" not in ckpt.weight_names(source)
    seen = _record_start(monkeypatch)
    gan = ["loss.gan_weight=0.1", "loss.gan_start_step=0", "loss.disc_width=8", "loss.disc_layers=2"]
    with caplog.at_level("INFO", logger="smapctl.train"):
        train_tokenizer(load(recipe, *gan, "train.max_steps=1"), tmp_path / "gan", init_from=source)
    said = [r.getMessage() for r in caplog.records if "discriminator" in r.getMessage()]
    assert said == [f"--init-from: {source} has no discriminator; the run's starts anew"], said
    _assert_equal(seen["model"], ckpt.load_weights(source, "ema"))
    trained = ckpt.latest_checkpoint(tmp_path / "gan")
    assert ckpt.load_meta(trained)["step"] == 1 and "discriminator" in ckpt.weight_names(trained)


@pytest.fixture(scope="module")
def tiny_card(tiny_kl_tokenizer, tmp_path_factory):
    """A CARD trained 3 steps on the tiny KL tokenizer -> its run folder."""
    run_dir = tmp_path_factory.mktemp("card")
    train_generator(_generator_recipe(tiny_kl_tokenizer, "train.max_steps=3"), run_dir)
    return run_dir


def _generator_recipe(tokenizer: Path, *sets: str):
    train = ["train.batch_size=16", "train.precision='no'", "train.warmup_steps=0", "train.ckpt_every=3"]
    sets = [f"latents.tokenizer={tokenizer}", *tiny_generator_model("card"), *train, *sets]
    return load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets)


def test_a_generator_starts_from_the_checkpoints_ema_weights(
    tiny_kl_tokenizer, tiny_card, tmp_path, monkeypatch
):
    seen = _record_start(monkeypatch)
    recipe = _generator_recipe(tiny_kl_tokenizer, "train.max_steps=2", "train.lr=3e-4")
    final = train_generator(recipe, tmp_path / "more", init_from=tiny_card)
    ema = ckpt.load_weights(ckpt.latest_checkpoint(tiny_card), "ema")
    _assert_equal(seen["model"], ema)
    _assert_equal(seen["ema"], ema)
    assert adam_steps(final) == 2 and ckpt.load_meta(final)["init_from"]["step"] == 3


def test_a_generator_loads_its_start_before_tokenizing(tiny_kl_tokenizer, tiny_card, tmp_path, monkeypatch):
    """The --init-from checkpoint of a run still training may be pruned while the token cache is built
    (minutes to hours): it was loaded after, and the run failed there."""
    import smapctl.train.generator as generator

    source = tmp_path / "source"
    shutil.copytree(tiny_card, source)
    ema = ckpt.load_weights(ckpt.latest_checkpoint(source), "ema")
    tokens = generator._training_tokens

    def pruned_meanwhile(*args, **kwargs):
        shutil.rmtree(ckpt.latest_checkpoint(source))
        return tokens(*args, **kwargs)

    monkeypatch.setattr(generator, "_training_tokens", pruned_meanwhile)
    seen = _record_start(monkeypatch)
    recipe = _generator_recipe(tiny_kl_tokenizer, "train.max_steps=1")
    train_generator(recipe, tmp_path / "more", init_from=source)
    _assert_equal(seen["model"], ema)


def test_a_generator_of_another_tokenizer_is_refused_naming_both(
    tiny_kl_tokenizer, tiny_card, tmp_path, capsys
):
    """The tokenizer's raw weights give other tokens than the EMA ones the generator was trained on."""
    source = ckpt.latest_checkpoint(tiny_card)
    tokenizer = ckpt.latest_checkpoint(tiny_kl_tokenizer).resolve()
    args = ["train-generator", tiny_card / "recipe.yaml", "--out", tmp_path / "g", "--init-from", tiny_card]
    for dry in ([], ["--dry-run"]):
        code, _, err = run_cli(capsys, *args, *dry, "--set", "latents.tokenizer_weights=model")
        assert code == 1 and error_lines(err) == [
            f"error: --init-from: {source} was trained on the tokenizer {tokenizer} (ema weights), but"
            f" latents.tokenizer is {tokenizer} (model weights), whose tokens mean something else; train on"
            f" the same tokenizer: --set latents.tokenizer={tokenizer} --set latents.tokenizer_weights=ema"
        ], err
    code, _, err = run_cli(capsys, *args, "--dry-run", "--set", "model.depth=2")
    assert code == 1 and "is of another model (model.depth 1, the recipe says 2)" in error_lines(err)[0]
    code, out, err = run_cli(capsys, *args, "--dry-run")
    assert code == 0 and f"starts from {source} (its ema weights, step 3)" in " ".join(out.split()), err
    assert not (tmp_path / "g").exists()


def test_a_generators_class_dropout_may_change_but_not_its_classes_or_class_table(tmp_path, caplog):
    """A fine-tuning generator may train with another class dropout (the objective), not with another
    class count or class table; a checkpoint that recorded no class_embed is of a run whose table was the
    tokenizer's ("shared")."""
    from smapctl.config import to_dict
    from smapctl.errors import UserError
    from smapctl.train.init import InitFrom, check_same_model

    saved = _generator_recipe(tmp_path)
    init = InitFrom(tmp_path, {"recipe": {"model": to_dict(saved.model)}}, "ema")  # no class_embed: shared
    with caplog.at_level("INFO", logger="smapctl.train"):
        check_same_model(init, _generator_recipe(tmp_path, "model.class_dropout=0.2"), "generator")
    assert "model.class_dropout 0.1 -> 0.2" in caplog.text
    with pytest.raises(UserError, match="another model \\(model.num_classes 10, the recipe says 7\\)"):
        check_same_model(init, _generator_recipe(tmp_path, "model.num_classes=7"), "generator")
    with pytest.raises(
        UserError, match="another model \\(class_embed 'shared', the recipe says 'independent'"
    ):
        check_same_model(init, _generator_recipe(tmp_path, "class_embed=independent"), "generator")


def test_the_record_of_the_start_names_the_weights_it_started_from(tmp_path, monkeypatch):
    import smapctl.ops.load as load_module
    from smapctl.train.init import InitFrom

    monkeypatch.setattr(load_module, "fingerprint", lambda path, weights: f"print of {weights}")
    record = InitFrom(tmp_path, {"step": 7}, "model").record()
    assert record == {
        "path": str(tmp_path.resolve()),
        "weights": "model",
        "step": 7,
        "fingerprint": "print of model",
    }
