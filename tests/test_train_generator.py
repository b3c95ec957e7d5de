"""Generator training end to end on tiny tokenizers: the loss falls for every family, the class table is
the tokenizer's, the latent cache is built once and refused when foreign, and a resumed run repeats an
uninterrupted one."""

import copy
import gc
import json
import os
import re
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import add_broken_images
from PIL import Image
from tiny_tokenizer import (
    DEMO_TOKENIZER_TINY,
    adam_steps,
    before_torchrun,
    cli_args,
    image_folder,
    run_cli,
    tiny_generator_model,
    two_nodes,
)

from smapctl.data import latents
from smapctl.data.datasets import build_datasets, build_eval_dataset
from smapctl.data.images import BadImageError, SampleKey, to_signed_float, to_uint8
from smapctl.data.latents import LatentCache, LatentDataset, LatentStats, cache_path, write_latents
from smapctl.errors import UserError
from smapctl.models.card import CARD
from smapctl.models.smap import SMAP
from smapctl.ops.load import load_tokenizer
from smapctl.recipe import load_generator_recipe, load_tokenizer_recipe
from smapctl.train import generator as gen_train
from smapctl.train.checkpoint import latest_checkpoint, load_meta, load_weights
from smapctl.train.generator import (
    build_generator,
    check_compatible,
    generate,
    load_generator,
    train_generator,
)
from smapctl.train.logging import read_metrics
from smapctl.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TABLE = "class_cond.embed.table.weight"  # the generator's class table; the tokenizer's is class_embed.table
VQ = "model.regularizer={kind: vq, codebook_size: 64, token_dim: 8}"


def tiny_tokenizer(tmp_path_factory, name: str, *overrides: str) -> Path:
    """A 3-step SMAP on 16 px digits; returns its run folder."""
    run_dir = tmp_path_factory.mktemp(name)
    train_tokenizer(
        load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, *overrides]),
        run_dir,
    )
    return run_dir


def tiny_recipe(tokenizer: Path, kind: str = "card", steps: int = 30, *overrides: str):
    """The demo generator recipe shrunk to the tiny tokenizers (CARD, LlamaGen or MaskGIT)."""
    return load_generator_recipe(
        ROOT / "recipes/demo/generator.yaml", tiny_sets(tokenizer, kind, steps, *overrides)
    )


def tiny_sets(tokenizer: Path, kind: str = "card", steps: int = 30, *overrides: str) -> list[str]:
    """`tiny_recipe`'s overrides of the demo recipe."""
    model = tiny_generator_model(kind)
    train = [
        f"train.max_steps={steps}",
        "train.batch_size=16",
        "train.precision='no'",
        "train.warmup_steps=0",
    ]
    train += ["train.log_every=1", f"train.sample_every={steps}", f"train.ckpt_every={steps}"]
    return [f"latents.tokenizer={tokenizer}", *model, *train, *overrides]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


@pytest.fixture(scope="module")
def kl_tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory, "kl-tok")


@pytest.fixture(scope="module")
def vq_tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory, "vq-tok", VQ)


@pytest.fixture(scope="module")
def card_run(kl_tok, tmp_path_factory):
    """A CARD trained 30 steps with the default, fine-tuned shared class embedding."""
    run_dir = tmp_path_factory.mktemp("card")
    return train_generator(tiny_recipe(kl_tok), run_dir), run_dir


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("kind", ["card", "llamagen", "maskgit"])
def test_loss_decreases_and_run_folder_is_complete(kind, request, card_run, tmp_path):
    if kind == "card":
        final, run_dir = card_run
    else:
        run_dir = tmp_path / kind
        final = train_generator(tiny_recipe(request.getfixturevalue("vq_tok"), kind), run_dir)
    loss = losses(run_dir)
    assert len(loss) == 30
    assert sum(loss[-5:]) < 0.95 * sum(loss[:5]), loss
    meta = load_meta(final)
    assert meta["kind"] == "generator" and meta["step"] == 30
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert (meta["latent_stats"] is not None) == (kind == "card")  # continuous latents only
    assert Path(meta["tokenizer"]["path"]).is_absolute()
    assert {"model.safetensors", "ema.safetensors"} <= {p.name for p in final.iterdir()}
    # The preview: one class a row (8 of the 10 classes, 2 images each), 2 px padding.
    with Image.open(run_dir / "samples" / "step_000000030.png") as preview:
        size = preview.size
    side = (size[0] - 2) // 2
    assert size == (2 * side + 2, 8 * side + 2) and side > 2
    assert (run_dir / "recipe.yaml").is_file()
    # What `sample` and `evaluate` do: load it (built on the meta device) and draw tokens. LlamaGen's
    # rotary tables are not in the checkpoint; they were left on the meta device and sampling crashed.
    loaded = load_generator(final)
    model, recipe = loaded.model, loaded.recipe
    tokens = generate(model, recipe, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert tokens.shape[:2] == (2, recipe.model.num_tokens) and not tokens.is_meta


def test_metrics_log_the_learning_rate_each_step_used(kl_tok, tmp_path):
    """Warm-up 2 over 4 steps: the rates the optimiser used, not the next steps'."""
    sets = ["train.warmup_steps=2", "train.lr=1e-3", "train.min_lr_ratio=0.05"]
    train_generator(tiny_recipe(kl_tok, "card", 4, *sets), tmp_path / "run")
    logged = [row["lr"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 5.25e-4])


def test_a_generators_metrics_reach_tensorboard(kl_tok, tmp_path):
    """train.log_with for a generator (the tokenizer's run is tested in test_trackers.py)."""
    pytest.importorskip("tensorboard")
    from test_trackers import scalars

    train_generator(tiny_recipe(kl_tok, "card", 3, "train.log_with=[tensorboard]"), tmp_path / "gen")
    rows = [row for row in read_metrics(tmp_path / "gen" / "metrics.jsonl") if "loss" in row]
    logged = scalars(tmp_path / "gen")
    assert [s for s, _ in logged["loss"]] == [1, 2, 3]
    assert [v for _, v in logged["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def _nan_forward_on(monkeypatch, bad_calls) -> list[int]:
    """CARD's training forward gives a NaN loss on the given (0-based) calls; it is called once per
    micro-batch. Returns the list of calls made (their indices)."""
    from smapctl.models.card import CARD, CARDOutput

    real, calls = CARD.forward, []

    def forward(self, *args, **kwargs):
        calls.append(len(calls))
        out = real(self, *args, **kwargs)
        return CARDOutput(loss=out.loss * float("nan"), z=out.z) if calls[-1] in bad_calls else out

    monkeypatch.setattr(CARD, "forward", forward)
    return calls


def test_non_finite_limit_counts_accumulated_generator_steps(kl_tok, tmp_path, monkeypatch):
    """The second micro-batch of every step is NaN (each step's first one is finite): every step is
    skipped, so the third stops the run before any checkpoint (the limit counts optimiser steps, not
    micro-batches: counting those stopped the run in its second step)."""
    calls = _nan_forward_on(monkeypatch, bad_calls=range(1, 100, 2))
    sets = ["train.grad_accum_steps=2", "train.max_nonfinite_steps=3"]
    with pytest.raises(UserError) as raised:
        train_generator(tiny_recipe(kl_tok, "card", 10, *sets), tmp_path / "run")
    assert str(raised.value) == (
        "the loss was not finite 3 steps in a row; stopping (no checkpoint was written). "
        "Try a lower train.lr (in a new run: --out) or train.precision=no"
    )
    assert len(calls) == 6  # 3 steps of 2 micro-batches
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_completed_generator_step_resets_the_non_finite_count(kl_tok, tmp_path, monkeypatch):
    """Accumulation 2, max_nonfinite_steps 2. A NaN first micro-batch skips the step without running its
    second one: calls 0-1 step 1 (skipped), 2-3 step 2, 4 step 3 (skipped), 5-6 step 4, 7-8, 9-10."""
    sets = ["train.grad_accum_steps=2", "train.max_nonfinite_steps=2"]
    calls = _nan_forward_on(monkeypatch, bad_calls={1, 4})  # steps 1 and 3 skipped, not in a row
    final = train_generator(tiny_recipe(kl_tok, "card", 6, *sets), tmp_path / "ok")
    assert len(calls) == 11  # step 3's second micro-batch was not run
    assert adam_steps(final) == 4 and load_meta(final)["step"] == 6
    assert [row["step"] for row in read_metrics(tmp_path / "ok" / "metrics.jsonl") if "loss" in row] == [
        2, 4, 5, 6
    ]  # fmt: skip
    assert all(torch.isfinite(w).all() for w in load_weights(final, "ema").values())
    calls = _nan_forward_on(monkeypatch, bad_calls={1, 4, 6})  # steps 3 and 4 in a row
    with pytest.raises(UserError, match=r"^the loss was not finite 2 steps in a row; stopping"):
        train_generator(tiny_recipe(kl_tok, "card", 6, *sets), tmp_path / "stopped")
    assert len(calls) == 7
    assert [r["step"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")] == [2]


def test_latent_stats_in_checkpoint_are_the_caches(card_run, kl_tok):
    final, _ = card_run
    tok = load_tokenizer(kl_tok)
    cache = latents.load_or_build_latents(tok, "digits", False, 64, "cpu")  # what the run trained on
    stats = LatentStats.from_meta(load_meta(final)["latent_stats"])
    assert torch.allclose(stats.mean, cache.tokens.mean((0, 1)), atol=1e-5)
    assert torch.allclose(stats.std, cache.tokens.flatten(0, 1).std(0), atol=1e-5)
    z = stats.normalize(cache.tokens).flatten(0, 1)  # (N K, C)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(16), atol=1e-4)
    assert torch.allclose(stats.denormalize(stats.normalize(cache.tokens)), cache.tokens, atol=1e-5)


def test_latent_stats_are_exact_in_chunks():
    x = torch.randn(10, 7, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    a, b = LatentStats.of(x), LatentStats.of(x, chunk=4)
    assert torch.allclose(a.mean, x.flatten(0, 1).mean(0)) and torch.allclose(a.std, x.flatten(0, 1).std(0))
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)
    c = LatentStats.from_meta(a.to_meta())
    assert torch.equal(c.mean, a.mean) and torch.equal(c.std, a.std)


def test_a_latent_dataset_item_is_its_normalised_tokens_with_its_own_label():
    """Each cache row keeps its label (a plain index or the training sampler's `SampleKey`), and only the
    tokens are normalised."""
    tokens = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)  # (N, K, C)
    labels = torch.tensor([3, 0, 2, 1])
    stats = LatentStats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5]))
    data = LatentDataset(tokens, labels, stats)
    assert len(data) == 4
    for i in range(4):
        for key in (i, SampleKey(i, 123)):
            z, y = data[key]
            assert int(y) == int(labels[i])
            torch.testing.assert_close(z, (tokens[i] - stats.mean) / stats.std)
    assert torch.equal(LatentDataset(tokens, labels)[2][0], tokens[2])  # no stats: as cached (VQ indices)


# ------------------------------------------------------------------------------- class embedding


def test_shared_class_embedding_is_a_copy_of_the_tokenizers(kl_tok):
    tok = load_tokenizer(kl_tok)
    table = tok.model.class_embed.table.weight
    shared = build_generator(tiny_recipe(kl_tok), tok.model.class_embed).state_dict()[TABLE]
    assert torch.equal(shared, table) and shared.data_ptr() != table.data_ptr()
    own = build_generator(tiny_recipe(kl_tok, "card", 30, "class_embed=independent"), tok.model.class_embed)
    assert not torch.allclose(own.state_dict()[TABLE], table)


def test_the_shared_class_embedding_is_copied_to_the_cpu_with_the_rest_of_the_generator(kl_tok):
    """On a GPU the tokenizer's table sits on the GPU while the generator is built on the CPU: the copy
    must come to the CPU (left there, the EMA snapshot kept two devices and its first update crashed).
    No second device here: the copy records the move."""
    tok = load_tokenizer(kl_tok)

    class OnTheGpu(type(tok.model.class_embed)):
        def cpu(self):
            self.moved_to_the_cpu = True
            return super().cpu()

    embed = copy.deepcopy(tok.model.class_embed)
    embed.__class__ = OnTheGpu
    model = build_generator(tiny_recipe(kl_tok), embed)
    assert getattr(model.class_cond.embed, "moved_to_the_cpu", False)


def test_the_other_processes_let_the_tokenizer_go_to_the_cpu_once_the_tokens_are_cached(
    kl_tok, monkeypatch, tmp_path
):
    """Under a launcher every GPU kept the tokenizer for the whole of the generator's training, though only
    the main process decodes with it (its previews) and none encodes once the tokens are cached: the
    main process keeps the decoder, the others neither tower. No GPU here: the moves are recorded."""
    from smapctl.train import generator

    events, keep, tokens = [], generator._keep_what_training_uses, generator._training_tokens

    def kept(tok, weights, is_main):
        events.append(("keep", weights, is_main))
        keep(tok, weights, is_main)

    def cached(*args, **kwargs):
        events.append("tokens")
        return tokens(*args, **kwargs)

    monkeypatch.setattr(generator, "_keep_what_training_uses", kept)
    monkeypatch.setattr(generator, "_training_tokens", cached)
    train_generator(tiny_recipe(kl_tok, "card", 1), tmp_path / "run")
    assert events == ["tokens", ("keep", "ema", True)]  # once the tokens are cached; the main process
    moves, towers = [], {}
    monkeypatch.setattr(SMAP, "cpu", lambda self: moves.append(("cpu", self.decoder is None)))
    for is_main in (True, False):
        tok = load_tokenizer(kl_tok)
        generator._keep_what_training_uses(tok, "ema", is_main)
        towers[is_main] = {name.split(".")[0] for name in tok.model.state_dict()} & {"encoder", "decoder"}
    assert towers == {True: {"decoder"}, False: set()}
    assert moves == [("cpu", True)]  # the others' rest; the main process still draws its previews with it


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_a_tokenizer_checkpoint_gone_while_tokenizing_keeps_the_weights_loaded(kl_tok, tmp_path, change):
    """On the CPU the tokenizer's weights are mapped again once the tokens are cached; a checkpoint
    removed meanwhile ended the run ("does not exist"), and one replaced (another meta.json) would decode
    the previews with other weights. The weights loaded stay (still mapped), the encoder goes, and the
    decoder decodes as before."""
    from smapctl.train import generator

    folder = tmp_path / "ckpt"
    shutil.copytree(load_tokenizer(kl_tok).path, folder)
    tok = load_tokenizer(folder)
    cfg = tok.model.cfg
    z, labels = torch.randn(2, cfg.num_latent_tokens, cfg.regularizer.token_dim), torch.tensor([0, 1])
    with torch.no_grad():
        expected = tok.model.decode(z, labels)
    if change == "removed":
        shutil.rmtree(folder)
    else:  # retrained in place: other weights of the same shapes, another meta.json
        from safetensors.torch import load_file, save_file

        other = {
            k: t + 1 if t.is_floating_point() else t for k, t in load_file(folder / "ema.safetensors").items()
        }
        save_file(other, folder / "new.safetensors")
        os.replace(folder / "new.safetensors", folder / "ema.safetensors")  # (the old file stays mapped)
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(meta | {"step": meta.get("step", 0) + 1}))
    generator._keep_what_training_uses(tok, "ema", is_main=True)
    assert tok.model.encoder is None
    with torch.no_grad():
        assert torch.equal(tok.model.decode(z, labels), expected)


def test_once_the_tokens_are_cached_training_holds_no_encoder_and_previews_as_before(
    kl_tok, monkeypatch, tmp_path
):
    """The training loop held the whole tokenizer for the whole run, its encoder included (SMAP-B's
    0.34 GB), though nothing encodes once the tokens are cached. The tokenizer its previews decode with
    holds none of the encoder's weights, the tokenizer that cached the tokens is gone (on the CPU its
    weights were views of the file mapping, which kept the encoder's pages the tokenizing read), and the
    grid is the one the whole tokenizer decodes."""
    import gc
    import weakref

    from smapctl.data.images import save_png
    from smapctl.train import generator
    from smapctl.train.generator import decode_samples

    loaded, previewed = [], []
    tokens, preview = generator._training_tokens, generator._preview

    def cached(recipe, tok, *args, **kwargs):
        loaded.extend(weakref.ref(p) for p in tok.model.parameters())
        return tokens(recipe, tok, *args, **kwargs)

    def previews(model, recipe, tok, *args):
        gc.collect()
        gone = all(ref() is None for ref in loaded)  # every tensor of the file mapping the tokenizing read
        previewed.append((gone, {name.split(".")[0] for name in tok.model.state_dict()}))
        return preview(model, recipe, tok, *args)

    monkeypatch.setattr(generator, "_training_tokens", cached)
    monkeypatch.setattr(generator, "_preview", previews)
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
    assert previewed == [(True, {"class_embed", "decoder"})]  # (a KL has no codes; one width: no projection)

    loaded = load_generator(tmp_path / "run")  # the whole tokenizer
    model, recipe, tok, stats = loaded.model, loaded.recipe, loaded.tokenizer, loaded.stats
    assert tok.model.encoder is not None
    labels = torch.arange(min(8, tok.model.cfg.num_classes)).repeat_interleave(2)
    tokens = generate(model, recipe, labels, generator=torch.Generator().manual_seed(0))
    save_png(decode_samples(tok, tokens, labels, stats), tmp_path / "expected.png", 2)
    written = tmp_path / "run" / "samples" / "step_000000002.png"
    assert np.array_equal(np.array(Image.open(written)), np.array(Image.open(tmp_path / "expected.png")))


@pytest.mark.parametrize("setting", ["frozen", "fine-tuned", "independent"])
def test_class_table_after_training(setting, kl_tok, tmp_path):
    extra = {
        "frozen": ["model.freeze_class_embed=true"],
        "fine-tuned": [],
        "independent": ["class_embed=independent"],
    }[setting]
    final = train_generator(tiny_recipe(kl_tok, "card", 5, "train.lr=1e-2", *extra), tmp_path / "run")
    tok_table = load_weights(load_tokenizer(kl_tok).path, "ema")["class_embed.table.weight"]
    for weights in ("model", "ema"):
        table = load_weights(final, weights)[TABLE]
        if setting == "frozen":
            assert torch.equal(table, tok_table)
        elif setting == "fine-tuned":  # moved away from the tokenizer's table, but starting from it
            assert not torch.equal(table, tok_table)
            assert (table - tok_table).norm() < 0.5 * tok_table.norm()
        else:
            assert (table - tok_table).norm() > tok_table.norm()


# ------------------------------------------------------------------------------------ latent cache


def test_seeding_the_initial_weights_leaves_each_gpus_generator_alone(kl_tok, tmp_path, monkeypatch):
    """torch.manual_seed(train.seed) for the initial weights also reseeded every GPU's generator with the
    same seed, after accelerate's set_seed had given each process its own: on GPUs every process drew
    the same tail-drop lengths, posterior noise, flow times and class dropout."""
    import accelerate.utils

    outside, inside = [], []  # GPU seeds set outside / inside accelerate's set_seed (seed + process index)
    monkeypatch.setattr(
        torch.cuda, "manual_seed_all", lambda seed: (inside if inside else outside).append(seed)
    )
    set_seed = accelerate.utils.set_seed

    def own_seed_per_process(seed, **kw):
        inside.append(seed)
        try:
            set_seed(seed, **kw)
        finally:
            del inside[:]

    monkeypatch.setattr(accelerate.utils, "set_seed", own_seed_per_process)
    recipe = load_tokenizer_recipe(
        ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, "train.seed=5"]
    )
    train_tokenizer(recipe, tmp_path / "tok", resume=False)
    train_generator(tiny_recipe(kl_tok, "card", 1, "train.seed=7"), tmp_path / "gen")
    assert outside == []


def test_a_resumed_tokenizer_run_keeps_the_checkpoint_its_generators_use(tmp_path, caplog):
    """Checkpoint rotation of a resumed tokenizer run deleted the checkpoint a generator was trained on,
    leaving the generator unusable ("its tokenizer ... no longer exists")."""
    short = [*DEMO_TOKENIZER_TINY, "train.ckpt_every=3", "train.keep_checkpoints=1"]
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", short)
    used = train_tokenizer(recipe, tmp_path / "tok")
    train_generator(tiny_recipe(tmp_path / "tok", "card", 1), tmp_path / "gen")
    assert (used / "pinned_by.txt").read_text() == f"{(tmp_path / 'gen').resolve()}\n"
    train_generator(tiny_recipe(tmp_path / "tok", "card", 2), tmp_path / "gen", resume=True)
    assert (used / "pinned_by.txt").read_text().count("\n") == 1  # recorded once
    longer = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*short, "train.max_steps=9"])
    train_tokenizer(longer, tmp_path / "tok", resume=True)
    names = [p.name for p in (tmp_path / "tok" / "checkpoints").iterdir()]
    assert sorted(names) == ["step_000000003", "step_000000009"]  # step 6 pruned, step 3 kept
    load_generator(tmp_path / "gen")  # still usable
    # Its resume command (latents.tokenizer is the run folder, now at step 9) goes on with step 3: it
    # was refused as "trained on tokenizer ..., but latents.tokenizer ... is now ...".
    train_generator(tiny_recipe(tmp_path / "tok", "card", 3), tmp_path / "gen", resume=True)
    meta = load_meta(latest_checkpoint(tmp_path / "gen"))
    assert meta["step"] == 3 and meta["tokenizer"]["path"] == str(used.resolve())
    # Moved, the generator's pin still holds: its run cannot be told from one deleted (it was pruned).
    (tmp_path / "gen").rename(tmp_path / "gen-moved")
    longer = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*short, "train.max_steps=15"])
    caplog.clear()
    train_tokenizer(longer, tmp_path / "tok", resume=True)
    assert re.search(r"step_000000003: kept for the generator run .*gen, which is not", caplog.text)
    assert used.is_dir()
    load_generator(tmp_path / "gen-moved")


def test_a_generator_run_that_fails_at_its_start_takes_its_pin_back(kl_tok, tmp_path, monkeypatch):
    """Its folder is removed: a pin of it would keep the tokenizer checkpoint for good."""
    from smapctl.train import checkpoint as ckpt
    from smapctl.train import generator

    def failing(*args, **kwargs):
        raise UserError("no tokens")

    monkeypatch.setattr(generator, "_training_tokens", failing)
    used = ckpt.latest_checkpoint(kl_tok)
    before = (used / "pinned_by.txt").read_text() if (used / "pinned_by.txt").exists() else None
    with pytest.raises(UserError, match="no tokens"):
        train_generator(tiny_recipe(kl_tok, "card", 1), tmp_path / "gen")
    assert not (tmp_path / "gen").exists()
    after = (used / "pinned_by.txt").read_text() if (used / "pinned_by.txt").exists() else None
    assert after == before
    # The folder's line there already (an earlier run of it, since renamed): the failed run leaves it.
    ckpt.pin_checkpoint(used, tmp_path / "gen")
    with pytest.raises(UserError, match="no tokens"):
        train_generator(tiny_recipe(kl_tok, "card", 1), tmp_path / "gen")
    assert f"{(tmp_path / 'gen').resolve()}\n" in (used / "pinned_by.txt").read_text()


def test_previews_without_ema_use_the_model_itself_and_give_it_back_in_training_mode(
    kl_tok, tmp_path, monkeypatch
):
    """`ema_decay: 0` built a second model for each preview (12 GB more for llamagen_3b)."""
    import smapctl.train.generator as generator

    previews, steps = [], []
    real_preview, real_step = generator._preview, generator._train_step
    monkeypatch.setattr(
        generator, "_preview", lambda m, *a: previews.append(m.training) or real_preview(m, *a)
    )
    monkeypatch.setattr(
        generator, "_train_step", lambda r, m, *a: steps.append(m.training) or real_step(r, m, *a)
    )
    built = []
    real_build = generator.build_generator
    monkeypatch.setattr(generator, "build_generator", lambda *a: built.append(1) or real_build(*a))
    recipe = tiny_recipe(kl_tok, "card", 4, "train.ema_decay=0.0", "train.sample_every=2")
    train_generator(recipe, tmp_path / "run")
    assert previews == [False, False] and steps == [True] * 4
    assert len(built) == 1  # the model, and no copy of it for the previews


@pytest.mark.parametrize("kind", ["card", "llamagen", "maskgit"])
def test_the_sample_grid_shows_its_progress_step_by_step(kind, request, tmp_path, monkeypatch, caplog):
    """CARD-B's end-of-run sample grid took 4 min 44 s on a CPU without a word: its sampling steps (a
    token each for CARD and LlamaGen, MaskGIT's decoding steps) and the decode go through the progress
    helper (its lines without a terminal); the grid is the one the trained generator draws."""
    from smapctl.data.images import save_png
    from smapctl.train.generator import decode_samples

    tokenizer = request.getfixturevalue("kl_tok" if kind == "card" else "vq_tok")
    steps = {"card": ["sample.steps=3"], "maskgit": ["sample.steps=4"]}.get(kind, [])  # (CARD's: flow steps)
    recipe = tiny_recipe(tokenizer, kind, 2, *steps)
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")
    with caplog.at_level("INFO", logger="smapctl"):
        train_generator(recipe, tmp_path / "run")
    said = [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("the sample")]
    steps = 4 if kind == "maskgit" else 8  # K = 8 tokens one by one; 4 decoding steps
    assert said == [f"the sample grid: {i} of {steps + 1} steps" for i in range(1, steps + 2)]

    loaded = load_generator(tmp_path / "run")
    model, recipe, tok, stats = loaded.model, loaded.recipe, loaded.tokenizer, loaded.stats
    labels = torch.arange(min(8, tok.model.cfg.num_classes)).repeat_interleave(2)
    tokens = generate(model, recipe, labels, generator=torch.Generator().manual_seed(0))
    save_png(decode_samples(tok, tokens, labels, stats), tmp_path / "expected.png", 2)
    written = tmp_path / "run" / "samples" / "step_000000002.png"
    assert np.array_equal(np.array(Image.open(written)), np.array(Image.open(tmp_path / "expected.png")))


@pytest.mark.parametrize(("kind", "sets", "steps"), [("card", [], 8), ("maskgit", ["sample.steps=12"], 8)])
def test_sampling_steps_count_the_steps_generate_takes(kind, sets, steps, kl_tok):
    """A bar's total: a token each for CARD (a prefix's when `num_tokens` is given), MaskGIT's decoding
    steps (fewer than `sample.steps` past one a token)."""
    from functools import partial

    from smapctl.train.generator import sampling_steps

    recipe = tiny_recipe(kl_tok, kind, 2, *sets)
    model = build_generator(recipe, None).eval()
    for overrides, expected in (({}, steps), ({"num_tokens": 3}, 3), ({"num_tokens": 0}, 0)):
        taken = []
        generate(model, recipe, torch.tensor([0, 1]), on_step=partial(taken.append, 1), **overrides)
        assert len(taken) == sampling_steps(recipe, **overrides) == expected, overrides


def test_a_generator_run_inside_the_tokenizers_image_folder_is_refused(tmp_path):
    """With `latents.dataset: null` the generator reads the tokenizer's images; `--out` inside them put
    its sample PNGs into the dataset."""
    from test_train_tokenizer import _image_folder

    _image_folder(tmp_path / "images")
    sets = [f"data.dataset={tmp_path / 'images'}", "data.on_error=skip", "model.num_classes=3"]
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, *sets])
    train_tokenizer(recipe, tmp_path / "tok")
    with pytest.raises(
        UserError, match=r"inside the tokenizer's data.dataset .*images, whose images the run"
    ):
        train_generator(tiny_recipe(tmp_path / "tok", "card", 1), tmp_path / "images" / "cat" / "gen")
    assert not (tmp_path / "images" / "cat" / "gen").exists()


def test_a_bad_image_a_data_worker_meets_as_the_cache_is_built_keeps_nothing(tmp_path, monkeypatch):
    """A bad image the tokenizer's data worker meets as the token cache is built (its `on_error: fail`)
    stops the run and keeps nothing: torch re-raised the worker's error from a frame that kept it in a
    local, a cycle that held the tokenizer and the caching frames until Python's next full collection."""
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", ("a", "b"), 8)
    sets = [f"data.dataset={folder}", "data.on_error=fail", "data.num_workers=2", "data.val_fraction=0"]
    sets.append("model.num_classes=2")
    train_tokenizer(
        load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, *sets]),
        tmp_path / "tok",
    )
    add_broken_images(folder / "b")  # (they sort after the images: met by a worker, not the first batch)
    toks, real = [], gen_train.load_tokenizer
    monkeypatch.setattr(gen_train, "load_tokenizer", lambda *a, **k: toks.append(real(*a, **k)) or toks[-1])
    for run, collect in (("warm", True), ("run", False)):  # (what the first run imports: its own cycles)
        gc.disable() if not collect else gc.collect()
        try:
            with pytest.raises(BadImageError):
                train_generator(
                    tiny_recipe(tmp_path / "tok", "card", 1, "model.num_classes=2"), tmp_path / run
                )
            gone = weakref.ref(toks.pop().model)
            assert collect or gone() is None
        finally:
            gc.enable()


def test_cache_is_built_once_and_reused(kl_tok, tmp_path, monkeypatch, caplog):
    # A cache of its own: another test of the session's (one that ran first) may have built the mirrored one.
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(kl_tok)
    path = cache_path(tok.fingerprint, "digits", hflip=False)
    calls = []
    encode = latents.encode_dataset
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: calls.append(a) or encode(*a, **k))
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "first")
    assert len(calls) == 1 and path.is_file()
    written = path.stat().st_mtime_ns
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "second")
    assert len(calls) == 1 and path.stat().st_mtime_ns == written
    # Building the cache draws no random numbers from the training stream: the same run either way.
    assert losses(tmp_path / "first") == losses(tmp_path / "second")
    # A damaged cache (cut short) is made again, with a warning: it stopped the run ("delete it").
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="smapctl.data"):
        train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "third")
    assert len(calls) == 2 and f"{path}: unreadable latent cache (" in caplog.text
    assert "): tokenizing the images again" in caplog.text
    assert losses(tmp_path / "third") == losses(tmp_path / "first")
    train_generator(tiny_recipe(kl_tok, "card", 2, "latents.hflip=true"), tmp_path / "flipped")
    assert len(calls) == 3 and cache_path(tok.fingerprint, "digits", hflip=True).is_file()


def test_a_cache_in_a_folder_whose_name_is_not_utf8_is_read_back(kl_tok, tmp_path, monkeypatch):
    # safetensors reads UTF-8 paths only: under SMAPCTL_CACHE named in Latin-1 the cache was written and
    # then "unreadable", made again by every run.
    monkeypatch.setenv("SMAPCTL_CACHE", os.fsdecode(os.path.join(os.fsencode(tmp_path), b"cach\xe9")))
    calls = []
    encode = latents.encode_dataset
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: calls.append(a) or encode(*a, **k))
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "first")
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "second")
    assert len(calls) == 1 and losses(tmp_path / "first") == losses(tmp_path / "second")


def test_a_dataset_folder_whose_name_is_not_utf8_is_cached_and_read_back(kl_tok, tmp_path, monkeypatch):
    # Its token cache's name hashed the path strictly (a UnicodeEncodeError before anything was encoded),
    # and its header could not hold the path (safetensors writes UTF-8): the run could not start.
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"imgs\xe9"))
    _digit_folder(Path(folder), per_class=2)
    calls = []
    encode = latents.encode_dataset
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: calls.append(a) or encode(*a, **k))
    for run in ("first", "second"):
        train_generator(tiny_recipe(kl_tok, "card", 1, f"latents.dataset={folder}"), tmp_path / run)
    assert len(calls) == 1 and losses(tmp_path / "first") == losses(tmp_path / "second")


def test_cache_holds_the_tokens_and_their_mirror_images(kl_tok):
    tok = load_tokenizer(kl_tok)
    data = build_eval_dataset("digits:train", 16, tok.class_names)
    cache = latents.encode_dataset(tok, "digits", True, 64, "cpu")
    assert cache.tokens.shape == (2 * len(data), 8, 16) and cache.fingerprint == tok.fingerprint
    images = torch.stack([data[i][0] for i in range(64)])
    labels = torch.tensor([data[i][1] for i in range(64)])
    with torch.no_grad():
        # Batch by batch: [batch 0, its mirror image, batch 1, ...]; eval mode gives the posterior mean.
        assert torch.allclose(cache.tokens[:64], tok.model.encode(images, labels).z, atol=1e-5)
        assert torch.allclose(cache.tokens[64:128], tok.model.encode(images.flip(-1), labels).z, atol=1e-5)
    assert torch.equal(cache.labels[:64], labels) and torch.equal(cache.labels[64:128], labels)


def test_a_cache_holds_its_tokens_once_as_it_is_built(kl_tok, monkeypatch):
    """Each round's tokens were kept (views of both their views) in a list until a final torch.cat
    copied them all again: twice the cache in memory, 42 GB for ImageNet with mirror images. Now they
    are copied into the cache's tensor as they come, and each round's tensor is let go."""
    import gc
    import weakref

    real, rounds, alive = latents.gather_rows, [], []

    def watched(tensors, *args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in rounds))  # earlier rounds' tokens still held
        rounds.append(weakref.ref(tensors[0]))
        return real(tensors, *args)

    monkeypatch.setattr(latents, "gather_rows", watched)
    cache = latents.encode_dataset(load_tokenizer(kl_tok), "digits", True, 256, "cpu")
    assert len(alive) > 2 and max(alive) <= 1  # the last round's (the loop's variables), not all of them
    assert cache.tokens.untyped_storage().nbytes() == cache.tokens.numel() * 4  # no spare rows


# Two processes build a token cache (torchrun, gloo): each encodes its share of the batches, and both
# end with the whole cache, as one process makes it.
# The end of a launched test script: close the group as smapctl does when a command ends. One left open
# at exit sometimes aborted a process ("terminate called without an active exception", SIGABRT, as its
# peer went), and torchrun then failed the launch.
CLOSE_THE_GROUP = """
accelerator.wait_for_everyone()
import torch.distributed

torch.distributed.destroy_process_group()
"""

TWO_PROCESS_CACHE = (
    """\
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from smapctl.data import latents
from smapctl.launch import process_state
from smapctl.models.smap import SMAP
from smapctl.ops.load import load_tokenizer

out, tokenizer = Path(sys.argv[1]), sys.argv[2]
process_state()
accelerator = Accelerator(cpu=True)
calls, encode = [], SMAP.encode
SMAP.encode = lambda self, images, labels: calls.append(len(images)) or encode(self, images, labels)
tok = load_tokenizer(tokenizer)
for i, batch_size in enumerate(map(int, sys.argv[3:])):
    os.environ["SMAPCTL_CACHE"] = str(out / f"cache-{batch_size}")
    calls.clear()
    cache = latents.load_or_build_latents(tok, "digits", True, batch_size, "cpu", processes=accelerator)
    torch.save(
        {"calls": list(calls), "tokens": cache.tokens.clone(), "labels": cache.labels.clone()},
        out / f"rank{accelerator.process_index}-{i}.pt",
    )
"""
    + CLOSE_THE_GROUP
)


@pytest.mark.slow
def test_two_processes_share_the_tokenizing_of_a_cache(kl_tok, tmp_path):
    """One process used to tokenize the whole dataset while the others waited at a barrier, which times
    out (gloo 30 min, NCCL 10 min) before an ImageNet-sized cache is done."""
    import subprocess

    from tiny_tokenizer import subprocess_env

    script = tmp_path / "cache.py"
    script.write_text(TWO_PROCESS_CACHE)
    # 1618 training digits: 600 -> 3 batches (the second process has none in the last round);
    # 2000 -> 1 batch (the second has none at all).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(tmp_path), str(kl_tok), "600", "2000", "600"]  # the last reuses the first's
    env = subprocess_env(OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = load_tokenizer(kl_tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the same numbers
    try:
        alone = {b: latents.encode_dataset(tok, "digits", True, b, "cpu") for b in (600, 2000)}
    finally:
        torch.set_num_threads(threads)
    n = len(alone[600].labels) // 2
    assert n == 1618
    runs = [(600, ([600, 600, 418, 418], [600, 600])), (2000, ([n, n], [1, 1])), (600, ([], []))]
    for i, (batch_size, shares) in enumerate(runs):
        for rank, share in enumerate(shares):
            got = torch.load(tmp_path / f"rank{rank}-{i}.pt", weights_only=True)
            assert got["calls"] == share  # its own batches and their mirror images (or one image's shapes)
            assert torch.allclose(got["tokens"], alone[batch_size].tokens, atol=1e-6)
            assert torch.equal(got["labels"], alone[batch_size].labels)


# Each process of the launch writes what load_or_build_latents did to OUT/rank{r}.txt.
TWO_PROCESS_FOREIGN_CACHE = (
    """\
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from smapctl.data import latents
from smapctl.launch import process_state
from smapctl.ops.load import load_tokenizer

out, tokenizer = Path(sys.argv[1]), sys.argv[2]
process_state()
accelerator = Accelerator(cpu=True)
tok = load_tokenizer(tokenizer)
try:
    latents.load_or_build_latents(tok, "digits", True, 600, "cpu", processes=accelerator)
    what = "no error"
except Exception as e:
    # agreed: raised by every process after the same collective, so the CLI may close the group
    what = f"{type(e).__name__}: {e}" + (" (agreed)" if getattr(e, "agreed", False) else "")
(out / f"rank{accelerator.process_index}.txt").write_text(what)
"""
    + CLOSE_THE_GROUP
)


@pytest.mark.slow
def test_a_cache_the_main_process_refuses_is_refused_by_every_process(kl_tok, tmp_path, monkeypatch):
    """The node's main process checks the cache; its refusal reaches the others, which would otherwise
    wait at the next collective (under NCCL until the launcher kills them, or an hour)."""
    import subprocess

    from tiny_tokenizer import subprocess_env

    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(kl_tok)
    path = cache_path(tok.fingerprint, "digits", hflip=True)
    tokens, labels = torch.zeros(32, 8, 16), torch.zeros(32, dtype=torch.long)
    write_latents(path, LatentCache(tokens, labels, "0123456789abcdef", "digits:train"))
    script = tmp_path / "foreign.py"
    script.write_text(TWO_PROCESS_FOREIGN_CACHE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(tmp_path), str(kl_tok)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = f"UserError: {path}: made by another tokenizer (0123456789abcdef); delete it to rebuild (agreed)"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [said, said]


@pytest.mark.parametrize(
    ("fingerprint", "dataset", "error"),
    [
        ("0123456789abcdef", "digits:train", "made by another tokenizer (0123456789abcdef)"),
        (None, "photos:train", "the tokens of photos:train, not digits:train"),
    ],
)
def test_foreign_cache_is_refused(fingerprint, dataset, error, kl_tok, tmp_path):
    tok = load_tokenizer(kl_tok)
    path = cache_path(tok.fingerprint, "digits", hflip=False)
    tokens, labels = torch.zeros(32, 8, 16), torch.zeros(32, dtype=torch.long)
    write_latents(path, LatentCache(tokens, labels, fingerprint or tok.fingerprint, dataset))
    try:
        with pytest.raises(UserError) as e:
            train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{path}: ") and error in message
    finally:
        path.unlink()


def test_cache_names_say_which_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-data").mkdir()
    assert latents.dataset_key("digits") == latents.dataset_key("digits:train") == "digits:train"
    assert latents.dataset_key("photos:val") == "photos:val"
    assert latents.dataset_key("my-data") == str(tmp_path / "my-data")
    names = {cache_path("f" * 16, d, False).name for d in ("my-data", "my_data", "digits", "digits:val")}
    assert len(names) == 4 and all(n.startswith("f" * 16) for n in names)
    assert cache_path("f" * 16, "digits", True) != cache_path("f" * 16, "digits", False)


def _digit_folder(root: Path, per_class: int = 4) -> Path:
    """root/<0..9>/<i>.png: `per_class` digit images (16 px) of each class."""
    digits = build_eval_dataset("digits", 16)
    counts = dict.fromkeys(range(10), 0)
    for i in range(len(digits)):
        image, label = digits[i]
        if counts[label] < per_class:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(root / str(label) / f"{i}.png")
            counts[label] += 1
    return root


def test_classes_without_an_image_among_the_tokens_are_named(kl_tok, tmp_path, caplog):
    """An empty class folder is still a class: the generator learned it from nothing, and `sample` drew
    and `evaluate` scored its images, without a word."""
    folder = _digit_folder(tmp_path / "imgs", per_class=2)
    for name in ("7", "9"):
        shutil.rmtree(folder / name)
    (folder / "9").mkdir()  # empty
    with caplog.at_level("WARNING", logger="smapctl.train"):
        train_generator(tiny_recipe(kl_tok, "card", 1, f"latents.dataset={folder}"), tmp_path / "run")
    said = f"2 of the 10 classes have no image in {folder}: 7, 9; the generator learns nothing of them"
    assert said in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="smapctl.train"):
        train_generator(tiny_recipe(kl_tok, "card", 1), tmp_path / "run2")  # every class has images
    assert "have no image" not in caplog.text


def test_a_folder_tokenizers_held_out_images_are_left_out_of_the_tokens(tmp_path_factory, tmp_path):
    """latents.dataset null means the tokenizer's training images. Of a folder without data.val_dataset
    that is the folder without the held-out split `evaluate` scores against (the whole folder, held-out
    images included, used to be tokenized)."""
    folder = _digit_folder(tmp_path / "images")
    tok_dir = tiny_tokenizer(
        tmp_path_factory,
        "folder-tok",
        f"data.dataset='{folder}'",
        "data.val_fraction=0.25",
        "data.num_workers=0",
    )
    tok = load_tokenizer(tok_dir)
    split = build_datasets(tok.recipe.data, 16, train_augment=False)
    assert (len(split.train), len(split.val)) == (30, 10)
    train_generator(tiny_recipe(tok_dir, "card", 2), tmp_path / "run")
    path = cache_path(tok.fingerprint, str(folder), hflip=False, held_out=0.25)
    cache = latents.read_latents(path)
    assert cache.dataset == f"{folder} without its held-out 0.25"
    images = to_signed_float(torch.stack([split.train[i][0] for i in range(len(split.train))]))
    labels = torch.tensor([split.train[i][1] for i in range(len(split.train))])
    assert torch.equal(cache.labels, labels)
    with torch.no_grad():
        assert torch.allclose(cache.tokens, tok.model.encode(images, labels).z, atol=1e-5)
    # A named latents.dataset is tokenized whole, as before.
    assert latents.dataset_key(str(folder)) == str(folder)
    # A run from before the split was recorded trained on the whole folder: resuming it is refused.
    meta_file = next((tmp_path / "run" / "checkpoints").glob("step_*/meta.json"))
    meta = json.loads(meta_file.read_text())
    assert meta["tokenizer"].pop("images") == cache.dataset
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"^--resume: .* the tokens of {folder}, this recipe gives those of"):
        train_generator(tiny_recipe(tok_dir, "card", 4), tmp_path / "run", resume=True)


def test_a_changed_folder_is_tokenized_again_or_refused_where_its_split_would_move(
    tmp_path_factory, tmp_path, caplog, capsys
):
    """The token cache of a folder is made again when an image is rewritten (it used to be reused). An
    image added or removed moves others across the held-out split, so the tokenizer's training images
    cannot be told apart any more: its generator tokens, its evaluation and its --resume refuse."""
    from smapctl.eval.reconstruction import evaluate_tokenizer

    folder = _digit_folder(tmp_path / "images", per_class=3)
    sets = [f"data.dataset='{folder}'", "data.val_fraction=0.25", "data.num_workers=0"]
    tok_dir = tiny_tokenizer(tmp_path_factory, "changing-tok", *sets)
    tok = load_tokenizer(tok_dir)
    assert load_meta(tok.path)["data_listing"]["images"] == 30
    train_generator(tiny_recipe(tok_dir, "card", 1), tmp_path / "gen1")
    path = cache_path(tok.fingerprint, str(folder), hflip=False, held_out=0.25)
    first = latents.read_latents(path)
    assert first.images and len(first.labels) == 20  # 2 of each class's 3 images (the demo's no flip)
    # An image rewritten in place: same split, new pixels -> encoded again, with a warning.
    image = sorted(folder.glob("3/*.png"))[0]
    original, stat = image.read_bytes(), image.stat()
    Image.new("RGB", (16, 16), "white").save(image)
    with pytest.raises(UserError, match=r"^--resume: the images of .* changed since the run's tokens"):
        train_generator(tiny_recipe(tok_dir, "card", 2), tmp_path / "gen1", resume=True)  # not mid-run
    with caplog.at_level("WARNING", logger="smapctl.data"):
        train_generator(tiny_recipe(tok_dir, "card", 1), tmp_path / "gen2")
    assert "changed since their tokens were cached: tokenizing them again" in caplog.text
    again = latents.read_latents(path)
    assert again.images != first.images and not torch.equal(again.tokens, first.tokens)
    # ... and once the cache has been made again, the run still knows its tokens were of other images.
    with pytest.raises(UserError, match=r"^--resume: .* trained on the tokens of other images"):
        train_generator(tiny_recipe(tok_dir, "card", 2), tmp_path / "gen1", resume=True)
    train_generator(tiny_recipe(tok_dir, "card", 2), tmp_path / "gen2", resume=True)  # its own: goes on
    # The image restored (with its time, as `cp -p` does): gen1 goes on, its tokens made again (gen2's
    # cache of the changed folder was refused before, and so was the restored folder: a dead end).
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train_generator(tiny_recipe(tok_dir, "card", 2), tmp_path / "gen1", resume=True)
    assert torch.equal(latents.read_latents(path).tokens, first.tokens)
    # A cache from before the images were recorded is reused as it was (not hours of tokenizing), said so.
    write_latents(path, LatentCache(again.tokens, again.labels, again.fingerprint, again.dataset))
    caplog.clear()
    with caplog.at_level("WARNING", logger="smapctl.data"):
        train_generator(tiny_recipe(tok_dir, "card", 1), tmp_path / "gen-old-cache")
    assert "made before token caches recorded their images" in caplog.text
    assert latents.read_latents(path).images == ""
    # Another held-out fraction on --resume would move the split too.
    recipe = load_tokenizer_recipe(tok_dir / "recipe.yaml", ["train.max_steps=4", "data.val_fraction=0.5"])
    with pytest.raises(UserError, match=r"held-out fraction was 0.25 when the run started, it is 0.5 now"):
        train_tokenizer(recipe, tok_dir, resume=True)
    # An image added: the split would move.
    Image.new("RGB", (16, 16), "black").save(folder / "3" / "new.png")
    changed = r"images: its images changed since .* \(30 images then, 31 now\)"
    with pytest.raises(UserError, match=rf"{changed}.*set latents.dataset"):
        train_generator(tiny_recipe(tok_dir, "card", 1), tmp_path / "gen3")
    # Its dry run passed, listing the folder for nothing.
    sets = [a for x in tiny_sets(tok_dir, "card", 1) for a in ("--set", x)]
    code, _, err = run_cli(
        capsys, "train-generator", ROOT / "recipes/demo/generator.yaml", *sets, "--dry-run"
    )
    assert code == 1 and re.search(rf"{changed}.*set latents.dataset", " ".join(err.split())), err
    with pytest.raises(UserError, match=rf"{changed}.*pass --data"):
        evaluate_tokenizer(tok_dir, out=tmp_path / "eval", semantic=False)
    recipe = load_tokenizer_recipe(tok_dir / "recipe.yaml", ["train.max_steps=4"])
    with pytest.raises(UserError, match=rf"{changed}.*would train on images it held out"):
        train_tokenizer(recipe, tok_dir, resume=True)


# ------------------------------------------------------------------------------------------ resume


def test_resume_of_a_run_that_recorded_a_relative_latents_dataset(kl_tok, tmp_path, monkeypatch):
    """Runs of an older smapctl kept `latents.dataset: imgs` relative; resuming one from the same
    folder is the same images (it was refused: 'imgs' against the absolute path now loaded)."""
    monkeypatch.chdir(tmp_path)
    _digit_folder(tmp_path / "imgs", per_class=2)
    train_generator(tiny_recipe(kl_tok, "card", 1, "latents.dataset=imgs"), tmp_path / "run")
    [meta_file] = (tmp_path / "run" / "checkpoints").glob("step_*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta["recipe"]["latents"]["dataset"] == str(tmp_path / "imgs")
    meta["recipe"]["latents"]["dataset"] = "imgs"
    meta_file.write_text(json.dumps(meta))
    train_generator(tiny_recipe(kl_tok, "card", 2, "latents.dataset=imgs"), tmp_path / "run", resume=True)
    assert len(losses(tmp_path / "run")) == 2


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("card", ()), ("maskgit", ()), ("card", ("train.ema_decay=0.0",))],
    ids=["card", "maskgit", "card-no-ema"],
)
def test_resume_repeats_an_uninterrupted_run(kind, extra, request, tmp_path):
    tokenizer = request.getfixturevalue("kl_tok" if kind == "card" else "vq_tok")
    recipe = tiny_recipe(
        tokenizer, kind, 8, "train.ckpt_every=4", "train.sample_every=3", "model.class_dropout=0.5", *extra
    )
    straight = train_generator(recipe, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / straight.name)  # as if stopped after step 4
    resumed = train_generator(recipe, tmp_path / "resumed", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "resumed")) == 8
    for name in ("model", "ema"):
        a, b = load_weights(straight, name), load_weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    if extra:  # ema_decay 0: no average kept, the "ema" weights are the model's
        a, b = load_weights(resumed, "model"), load_weights(resumed, "ema")
        assert all(torch.equal(a[k].float(), b[k]) for k in a)


def test_resume_of_runs_moved_together_finds_its_tokenizer(kl_tok, tmp_path, capsys, caplog):
    """The printed resume command (the run's own recipe.yaml, whose latents.tokenizer is the absolute
    place of training) goes on after the tokenizer and generator runs moved together, as sampling does,
    and repeats an uninterrupted run; a tokenizer moved alone is one line naming the key to set."""
    from tiny_tokenizer import error_lines, run_cli

    shutil.copytree(kl_tok, tmp_path / "proj" / "tok")
    recipe = tiny_recipe(tmp_path / "proj" / "tok", "card", 4, "train.ckpt_every=2")
    straight = train_generator(recipe, tmp_path / "proj" / "gen")
    shutil.copytree(tmp_path / "proj" / "gen", tmp_path / "straight")
    shutil.rmtree(straight)  # as if stopped after step 2
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    run, tok = tmp_path / "moved" / "gen", (tmp_path / "moved" / "tok").resolve()
    resume = ("train-generator", run / "recipe.yaml", "--out", run, "--resume")

    code, out, err = run_cli(capsys, *resume, "--dry-run")
    assert code == 0 and f"resumes from {run / 'checkpoints' / 'step_000000002'}" in out, err
    assert "holds no trained tokenizer" not in out + err  # checked against the tokenizer found
    with caplog.at_level("INFO", logger="smapctl"):
        code, _, err = run_cli(capsys, *resume)
    assert code == 0, err
    assert "the run goes on with the tokenizer it was trained on, found at" in caplog.text
    assert losses(run) == losses(tmp_path / "straight") and len(losses(run)) == 4
    a, b = (
        load_weights(latest_checkpoint(run), "ema"),
        load_weights(latest_checkpoint(tmp_path / "straight"), "ema"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = load_meta(latest_checkpoint(run))["tokenizer"]
    assert Path(meta["path"]).parent.parent == tok  # recorded where it is now
    assert str(tok) in (run / "recipe.yaml").read_text()  # so the next resume needs no search

    shutil.move(tok, tmp_path / "tok-alone")  # the tokenizer alone
    code, _, err = run_cli(capsys, *resume, "--max-steps", 6)
    [line] = error_lines(err)
    assert code == 1 and f"its tokenizer {meta['path']} no longer exists" in line
    assert "name its new place with --set latents.tokenizer=FOLDER" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="smapctl"):
        code, _, err = run_cli(
            capsys, *resume, "--max-steps", 6, "--set", f"latents.tokenizer={tmp_path / 'tok-alone'}"
        )
    assert code == 0, err
    assert len(losses(run)) == 6
    assert "averages over about" not in caplog.text  # (advice for a new run, said as it started)


def test_resume_on_another_tokenizer_is_refused(kl_tok, tmp_path_factory, tmp_path):
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
    other = tiny_tokenizer(tmp_path_factory, "kl-other", "train.seed=1")
    with pytest.raises(UserError, match=r"^--resume: .* was trained on tokenizer [0-9a-f]{16}, but"):
        train_generator(tiny_recipe(other, "card", 4), tmp_path / "run", resume=True)


def test_resume_on_other_images_flips_or_weights_is_refused(kl_tok, tmp_path):
    """Other images or flips are other tokens: the stream position and the latent statistics of the
    checkpoint refer to the ones it started on (a resume used to go on with the new ones silently)."""
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
    for change in ("latents.hflip=true", "latents.dataset=digits:val", "latents.tokenizer_weights=model"):
        key = change.split("=")[0]
        with pytest.raises(UserError, match=rf"^--resume: {key} was .* the tokens it started on"):
            train_generator(tiny_recipe(kl_tok, "card", 4, change), tmp_path / "run", resume=True)


def test_a_resume_without_a_recorded_images_digest_goes_on(kl_tok, tmp_path):
    """The images digest is compared only where both the checkpoint and the cache have one: a run from
    before checkpoints recorded it (or a cache from before caches did) resumes. Comparing the missing
    digest as it is (None against an embedded dataset's "") refused every such run as "trained on the
    tokens of other images", and no test resumed one."""
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
    meta_file = latest_checkpoint(tmp_path / "run") / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["tokenizer"].pop("images_digest") == ""  # an embedded dataset's
    meta_file.write_text(json.dumps(meta))
    final = train_generator(tiny_recipe(kl_tok, "card", 3), tmp_path / "run", resume=True)
    assert load_meta(final)["step"] == 3


def test_resume_with_another_class_embed_is_refused(kl_tok, tmp_path):
    """The restored weights hold the class table the run began with: a resume with class_embed changed
    went on unchanged but recorded the new setting, mislabelling the run (figure 5's comparison)."""
    train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")  # shared
    with pytest.raises(
        UserError, match=r"^--resume: class_embed was 'shared' in .*, the recipe says 'independent'"
    ):
        train_generator(
            tiny_recipe(kl_tok, "card", 4, "class_embed=independent"), tmp_path / "run", resume=True
        )


def test_resume_in_a_tokenizer_run_is_refused(kl_tok):
    before = sorted(p for p in kl_tok.rglob("*"))
    with pytest.raises(
        UserError, match=r"^--resume: .*step_000000003 is a tokenizer checkpoint, not a generator one$"
    ):
        train_generator(tiny_recipe(kl_tok, "card", 4), kl_tok, resume=True)
    assert sorted(p for p in kl_tok.rglob("*")) == before  # refused before anything was written


# --------------------------------------------------------------------------- generator vs tokenizer


@pytest.mark.parametrize(
    ("kind", "overrides", "error"),
    [
        ("card", ["model.num_tokens=16"], "model.num_tokens: is 16 but the tokenizer"),
        ("card", ["model.token_dim=8"], "model.token_dim: is 8"),
        ("card", ["model.class_dim=64"], "model.class_dim: is 64"),
        ("card", ["model.num_classes=100"], "model.num_classes: is 100"),
        ("llamagen", [], "model.kind: "),
    ],
)
def test_generator_must_fit_the_kl_tokenizer(kind, overrides, error, kl_tok):
    with pytest.raises(UserError, match=f"^{error}"):
        check_compatible(tiny_recipe(kl_tok, kind, 2, *overrides), load_tokenizer(kl_tok))


def test_generator_must_fit_the_vq_tokenizer(vq_tok, kl_tok):
    tok = load_tokenizer(vq_tok)
    check_compatible(tiny_recipe(vq_tok, "maskgit"), tok)
    check_compatible(tiny_recipe(vq_tok, "llamagen", 2, "class_embed=independent", "model.class_dim=7"), tok)
    with pytest.raises(
        UserError, match="^model.kind: .* has vq tokens; use a llamagen or maskgit"
    ) as refused:
        check_compatible(tiny_recipe(vq_tok, "card"), tok)
    # A model section of another kind has other keys: a recipe to start from is named.
    assert str(refused.value).endswith(
        " (discrete) generator (a recipe like recipes/demo/generator_llamagen.yaml)"
    )
    kl = load_tokenizer(kl_tok)
    with pytest.raises(UserError, match="^model.kind: .* has kl tokens; use a CARD") as refused:
        check_compatible(tiny_recipe(kl_tok, "maskgit"), kl)
    assert str(refused.value).endswith(" (continuous) generator (a recipe like recipes/demo/generator.yaml)")
    with pytest.raises(UserError, match=r"^model.vocab_size: is 128 but the tokenizer has 64 \(.*\); to fit"):
        check_compatible(tiny_recipe(vq_tok, "maskgit", 2, "model.vocab_size=128"), tok)


def test_a_shared_class_embedding_needs_a_tokenizer_that_has_one(tiny_unconditioned_tokenizer, tmp_path):
    """`class_embed: shared` (the demo recipe's) of a TiTok-style tokenizer, trained without classes: one
    line naming the way out, before any tokens are made; `independent` fits it."""
    tok = load_tokenizer(tiny_unconditioned_tokenizer)
    assert tok.model.class_embed is None
    with pytest.raises(UserError) as refused:
        train_generator(tiny_recipe(tiny_unconditioned_tokenizer, "card", 2), tmp_path / "run")
    assert str(refused.value) == (
        f"class_embed: {tok.path} has no class embedding (TiTok-style); use 'independent'"
    )
    check_compatible(tiny_recipe(tiny_unconditioned_tokenizer, "card", 2, "class_embed=independent"), tok)


def test_cli_names_the_mismatched_key_in_one_line(kl_tok, tmp_path, capsys, monkeypatch):
    # The demo recipe expects 16 tokens; the tiny tokenizer has 8.
    from smapctl import cli

    out = tmp_path / "run"
    argv = [
        "smapctl",
        "train-generator",
        "recipes/demo/generator.yaml",
        "--set",
        f"latents.tokenizer={kl_tok}",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.num_tokens: is 16 but the tokenizer has 8")
    assert not out.exists()
    # Every mismatch at once, with the overrides that fit (one per run took four runs to fix a recipe);
    # and --dry-run checks too, once the tokenizer is trained.
    wrong = [*argv, "--set", "model.num_classes=7", "--set", "model.token_dim=4"]
    fit = " ".join(
        f"--set model.{k}" for k in ("num_tokens=8", "num_classes=10", "token_dim=16", "class_dim=32")
    )
    for extra in (["--out", str(out)], ["--dry-run"]):
        monkeypatch.setattr(sys, "argv", [*wrong, *extra])
        with pytest.raises(SystemExit) as e:
            cli.main()
        [line] = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error:")]
        assert e.value.code == 1 and "; model.num_classes: is 7 but the tokenizer has 10;" in line
        assert line.endswith(f"to fit it: {fit}")


@pytest.mark.parametrize("n", [0, 40])
def test_cache_is_read_as_a_memory_map(n, tmp_path):
    """The tokens are mapped from the cache file (an ImageNet cache would not fit in memory), equal to
    what was written, writable without touching the file (copy-on-write), and an empty cache reads too."""
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randn(n, 8, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    path = tmp_path / "cache.safetensors"
    write_latents(path, LatentCache(tokens, labels, "f" * 16, "digits:train"))
    cache = latents.read_latents(path)
    assert torch.equal(cache.tokens, tokens) and torch.equal(cache.labels, labels)
    assert (cache.fingerprint, cache.dataset, cache.discrete) == ("f" * 16, "digits:train", False)
    if n and sys.platform == "linux":
        assert str(path) in Path("/proc/self/maps").read_text()  # mapped, not read
    if n:
        cache.tokens[0] = 0.0
        assert torch.equal(latents.read_latents(path).tokens, tokens)  # the file is unchanged


def test_a_damaged_cache_is_one_line_naming_it(tmp_path):
    path = tmp_path / "cache.safetensors"
    write_latents(path, LatentCache(torch.zeros(4, 8, 16), torch.zeros(4, dtype=torch.long), "f" * 16, "d"))
    path.write_bytes(path.read_bytes()[:40])  # cut short: safetensors raised its own error, a traceback
    with pytest.raises(UserError, match=r"cache\.safetensors: unreadable latent cache \(.+\); delete it"):
        latents.read_latents(path)


def test_a_token_cache_folder_that_cannot_be_made_names_smapctl_cache(tmp_path, monkeypatch):
    """A home folder not writable (the default cache is under it): the error named the folder only, not
    the setting that moves it."""
    (tmp_path / "home").write_text("a file where the cache's folders go")
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "home" / "cache"))
    path = cache_path("f" * 16, "digits", hflip=False)
    with pytest.raises(UserError, match=r"is a file, not a folder; SMAPCTL_CACHE sets where the caches go$"):
        latents._checked_cache(path, None, "digits", 0.0, None, alone=True)


def test_missing_tokenizer_names_the_recipe_key(tmp_path):
    """The demo recipe's `latents.tokenizer: runs/demo-tokenizer` is relative to where the command runs;
    without it the error says which key, from where, and how to get one."""
    root = Path(__file__).resolve().parents[1]
    recipe = load_generator_recipe(
        root / "recipes/demo/generator.yaml", [f"latents.tokenizer={tmp_path}/none"]
    )
    with pytest.raises(
        UserError, match=r"^latents.tokenizer: .*/none does not exist .*smapctl train-tokenizer"
    ):
        train_generator(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_latents_dataset_that_does_not_fit_names_the_key(kl_tok, tmp_path):
    """`--set latents.dataset=photos` on a digits tokenizer said "photos:train: its classes [...] are not
    the model's [...]", without the key that named it; a missing folder likewise."""
    _digit_folder(tmp_path / "other", per_class=1)
    (tmp_path / "other" / "cat").mkdir()
    (tmp_path / "flat").mkdir()
    for spec, reason in (
        ("photos", "photos: its classes (astronaut, chelsea, coffee, rocket, motorcycle, ...) are not those"),
        (str(tmp_path / "nope"), f"'{tmp_path / 'nope'}' is neither an embedded dataset"),
        (str(tmp_path / "other"), f"{tmp_path / 'other'}: class folder(s) cat not among the 10 classes"),
        (str(tmp_path / "flat"), f"{tmp_path / 'flat'}: no class sub-folders"),
    ):
        with pytest.raises(UserError, match=rf"^latents\.dataset: {re.escape(reason)}"):
            train_generator(tiny_recipe(kl_tok, "card", 1, f"latents.dataset={spec}"), tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_a_dry_run_warns_of_a_latents_dataset_of_other_classes(kl_tok, tmp_path, capsys):
    """`--dry-run --set latents.dataset=photos` on a digits tokenizer passed without a word; the run then
    stopped at its first check. The dry run says it, as it says a dataset that is not there."""
    _digit_folder(tmp_path / "other", per_class=1)
    (tmp_path / "other" / "cat").mkdir()
    for spec, reason in (
        ("photos", "photos: its classes (astronaut, chelsea, coffee, rocket, motorcycle, ...) are not those"),
        (str(tmp_path / "other"), f"{tmp_path / 'other'}: class folder(s) cat not among the 10 classes"),
    ):
        sets = [a for x in tiny_sets(kl_tok, "card", 1, f"latents.dataset={spec}") for a in ("--set", x)]
        code, out, err = run_cli(
            capsys, "train-generator", ROOT / "recipes/demo/generator.yaml", *sets, "--dry-run"
        )
        assert code == 0 and "parameters:" in out
        assert f"WARNING latents.dataset: {reason}" in " ".join(err.split()), err
    code, _, err = run_cli(
        capsys, "train-generator", ROOT / "recipes/demo/generator.yaml", *sets[:-2], "--dry-run"
    )
    assert code == 0 and "WARNING" not in err  # the tokenizer's own images


def test_a_dry_run_warns_of_a_batch_larger_than_the_images_to_tokenize(kl_tok, tmp_path, capsys):
    """`--dry-run --set train.batch_size=5000` passed without a word; the run refused it once it had
    tokenized every image. The dry run says it, as a tokenizer's does."""
    _digit_folder(tmp_path / "few", per_class=1)
    for spec, images in (("digits:train", 1618), (str(tmp_path / "few"), 10)):
        sets = tiny_sets(kl_tok, "card", 1, f"latents.dataset={spec}", "train.batch_size=5000")
        args = [a for x in sets for a in ("--set", x)]
        code, out, err = run_cli(
            capsys, "train-generator", ROOT / "recipes/demo/generator.yaml", *args, "--dry-run"
        )
        said = f"WARNING train.batch_size: 5000 is larger than the training set ({images} images)"
        assert code == 0 and "parameters:" in out and said in err.splitlines(), err


def test_a_preview_that_is_not_finite_warns_and_training_goes_on(kl_tok, tmp_path, caplog):
    """A guidance that overflows in the run's sample grid: `generate` now refuses non-finite samples,
    which must not end the training that drew them for a preview. The grid is then black, as the warning
    says (only that a PNG was written was checked: a grey grid, like a blurry sample, passed)."""
    recipe = tiny_recipe(kl_tok, "card", 2, "sample.cfg_scale=1e308")
    with caplog.at_level("WARNING"):
        final = train_generator(recipe, tmp_path / "run")
    assert final.is_dir() and "the sample grid: sampling gave values that are not finite" in caplog.text
    assert "it is left black" in caplog.text
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000000002.png"))
    assert set(np.unique(grid).tolist()) == {0, 255}  # black images between the grid's white lines


def test_card_sees_the_normalised_latents(kl_tok, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    forward = CARD.forward

    def recorded(self, tokens, labels, *args, **kwargs):
        seen.append(tokens.detach().clone())
        return forward(self, tokens, labels, *args, **kwargs)

    monkeypatch.setattr(CARD, "forward", recorded)
    final = train_generator(tiny_recipe(kl_tok, "card", 2), tmp_path / "run")
    stats = LatentStats.from_meta(load_meta(final)["latent_stats"])
    cache = latents.load_or_build_latents(load_tokenizer(kl_tok), "digits", True, 64, "cpu")
    rows = stats.normalize(cache.tokens).flatten(1)  # (N, K C): what each training item must be
    batch = torch.cat(seen[:2]).flatten(1)  # the two training steps' batches (previews come later)
    nearest = torch.cdist(batch, rows, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert (nearest < 1e-3).all()  # every item is a normalised cache row, not a raw one


def test_decoded_samples_are_denormalised():
    stats = LatentStats(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5]))
    seen = []

    class Model:
        def decode(self, z, labels):
            seen.append(z)
            return torch.zeros(len(z), 3, 2, 2)

    class Tok:
        model = Model()

    tokens = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # (1, K=2, C=2) normalised
    gen_train.decode_samples(Tok(), tokens, torch.tensor([0]), stats)
    torch.testing.assert_close(seen[0], torch.tensor([[[1.0, -2.0], [3.0, -1.0]]]))


def test_the_saved_ema_averages_the_steps_weights_and_sampling_loads_it(kl_tok, tmp_path):
    """One step at ema_decay 0.5: the EMA the run saves is 0.5 x initial + 0.5 x trained weights, and
    `load_generator` (sampling, evaluation) reads it. A run that never updated its EMA, saved the raw
    weights as the EMA, or sampled the raw weights repeated itself on resume and passed. A seed other than
    the default 0: initial weights drawn from seed 0 whatever train.seed says (every run of a seed sweep
    starting from the same weights) passed too."""
    recipe = tiny_recipe(kl_tok, "card", 1, "train.ema_decay=0.5", "train.seed=3")
    final = train_generator(recipe, tmp_path / "run")
    tok = load_tokenizer(kl_tok)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(recipe.train.seed)  # as train_generator builds it
        initial = build_generator(recipe, tok.model.class_embed).state_dict()
    model, ema = load_weights(final, "model"), load_weights(final, "ema")
    moved = 0
    for k, w in model.items():
        if w.is_floating_point():
            torch.testing.assert_close(ema[k], 0.5 * initial[k].float() + 0.5 * w.float(), msg=k)
            moved += not torch.equal(w, initial[k])
    assert moved > 0
    loaded = load_generator(final).model.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_accumulated_steps_log_the_loss_of_the_global_batch(vq_tok, tmp_path):
    """LlamaGen without dropout draws nothing at random in training: 2 x 8 accumulated gives the loss of
    one batch of 16 (each micro-batch's mean, averaged; their sum was logged: twice the loss)."""
    sets = ["model.class_dropout=0.0", "model.dropout=0.0", "model.token_dropout=0.0"]
    train_generator(tiny_recipe(vq_tok, "llamagen", 3, *sets, "train.grad_accum_steps=2"), tmp_path / "accum")
    train_generator(tiny_recipe(vq_tok, "llamagen", 3, *sets), tmp_path / "plain")
    accum, plain = losses(tmp_path / "accum"), losses(tmp_path / "plain")
    assert len(accum) == len(plain) == 3
    torch.testing.assert_close(torch.tensor(accum), torch.tensor(plain), atol=1e-5, rtol=1e-4)


def test_more_data_workers_than_cpus_are_cut_to_the_cpus_in_one_line(tmp_path, monkeypatch, caplog):
    """The paper recipes' `data.num_workers: 8` on a 2-core machine: the tokenizer's training and then
    the generator's token cache each drew torch's multi-line "excessive worker creation might get
    DataLoader running slow or even freeze" warning (here 2 workers on 1 CPU)."""
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("SMAPCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("smapctl.data.datasets._SAID_WORKERS", set(), raising=False)
    sets = [*DEMO_TOKENIZER_TINY, "train.max_steps=1", "data.num_workers=2"]
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", sets)
    caplog.set_level("INFO", logger="smapctl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_tokenizer(recipe, tmp_path / "tok")
        train_generator(tiny_recipe(tmp_path / "tok", "card", 1), tmp_path / "gen")
    assert not [w for w in caught if "worker processes" in str(w.message)]
    assert caplog.text.count("data.num_workers 2: more than the 1 CPU this process may use; 1 workers") == 1


@pytest.mark.slow
def test_nodes_whose_copies_of_the_tokenizer_differ_stop_before_caching(tiny_kl_tokenizer, tmp_path):
    """Two nodes, each with its own copy of the relative `latents.tokenizer: tok`, node 1's of another
    checkpoint: each encoded its share of the token cache with its own copy, and the cache mixed two
    tokenizers' tokens without a word. Now every process stops before caching, in one line."""
    import shutil

    from tiny_tokenizer import another_copy

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        image_folder(folder / "images", ("3", "7"), 4)
    shutil.copytree(tiny_kl_tokenizer, folders[0] / "tok")
    another_copy(tiny_kl_tokenizer, folders[1]).rename(folders[1] / "tok")
    sets = cli_args(*tiny_sets("tok", "card", 2, "latents.dataset=images", "latents.batch_size=4"))
    args = ("train-generator", ROOT / "recipes/demo/generator.yaml", "--out", "run", *sets)
    outputs = two_nodes(*args, cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: process 1 of the launch loaded another tokenizer than the main process's "
    said += f"({folders[0] / 'tok'}/"
    assert ours[0].count(said) == 1, outputs
    assert "error" not in ours[1], outputs


@pytest.mark.slow
def test_nodes_whose_copies_of_the_image_folder_differ_stop_before_caching(tiny_kl_tokenizer, tmp_path):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each), each with its
    own copy of the relative `latents.dataset: images`, node 1's with fewer images: each node made its
    rounds of batches from its own listing, and the main process waited at a round the other never came
    to, until killed (SIGTERM could not reach it there). Now every process stops before caching, in one
    line."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder, n in zip(folders, (10, 8), strict=True):
        image_folder(folder / "images", ("3", "7"), n)
    sets = cli_args(
        *tiny_sets(tiny_kl_tokenizer, "card", 2, "latents.dataset=images", "latents.batch_size=4")
    )
    args = ("train-generator", ROOT / "recipes/demo/generator.yaml", "--out", "run", *sets)
    outputs = two_nodes(*args, cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: process 1 of the launch lists 16 images to cache the tokens of in "
    assert (
        ours[0].count(said) == 1 and "the main process 20: every process must read the same images" in ours[0]
    )
    assert "error" not in ours[1], outputs


@pytest.mark.parametrize(
    "kind, own",
    [
        ("card", {"steps": 3, "method": "heun"}),
        ("llamagen", {"top_k": 5, "top_p": 0.9}),
        ("maskgit", {"steps": 4, "choice_temperature": 2.5}),
    ],
)
def test_generate_hands_the_model_each_sampling_setting_of_its_kind(kind, own):
    """The recipe's sampling settings (or the overrides) reach the generator's `sample` under their own
    names: the guidance scale and its schedule, the temperature, and the family's own settings."""
    sets = [f"latents.tokenizer={ROOT}", *tiny_generator_model(kind)]
    recipe = load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets)
    seen: dict = {}

    class Recorder:
        def sample(self, **kwargs):
            seen.clear()
            seen.update(kwargs)
            return torch.zeros(2, 5, dtype=torch.long)

    labels, g = torch.tensor([0, 1]), torch.Generator()
    common = ("cfg_scale", "cfg_schedule", "temperature")
    schedule = "linear" if recipe.sample.cfg_schedule == "constant" else "constant"
    other = {"cfg_scale": 1.7, "cfg_schedule": schedule, "temperature": 0.8, **own}
    assert all(getattr(recipe.sample, k) != v for k, v in other.items())  # each one tells
    for overrides in ({}, other):
        generate(Recorder(), recipe, labels, generator=g, num_tokens=5, **overrides)
        assert seen.pop("labels") is labels and seen.pop("generator") is g and seen.pop("on_step") is None
        want = {k: overrides.get(k, getattr(recipe.sample, k)) for k in (*common, *own)}
        assert seen == {**want, "num_tokens": 5}


def test_the_generators_class_table_and_embeddings_are_not_weight_decayed(kl_tok, tmp_path, monkeypatch):
    """The generator's optimiser splits its parameters by name (`param_groups`): the class table, the
    position embeddings and the norms go undecayed, the layers' weight matrices decayed."""
    from smapctl.train.runner import TrainingRun

    groups = []
    start = TrainingRun.start

    def recorded(self, weights, optimizers, **kw):
        names = {id(p): n for n, p in weights["model"].named_parameters()}
        groups.extend([names[id(p)] for p in g["params"]] for g in optimizers["optimizer"].param_groups)
        return start(self, weights, optimizers, **kw)

    monkeypatch.setattr(TrainingRun, "start", recorded)
    train_generator(tiny_recipe(kl_tok, "card", 1, "train.weight_decay=0.05"), tmp_path / "run")
    decayed, plain = groups
    assert {"class_cond.embed.table.weight", "pos_embed", "start_token", "norm.weight", "norm.bias"} <= set(
        plain
    )
    assert "blocks.0.attn.qkv.weight" in decayed and "class_cond.proj.weight" in decayed
    assert not [n for n in decayed if "embed.table" in n or "norm" in n or not n.endswith("weight")]
