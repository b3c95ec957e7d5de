"""`smapctl train-tokenizer` end to end on tiny recipes: it learns, its errors are one line, its checks
(non-finite losses, codebook collapse, unreadable images, accumulation) do what they say."""

import errno
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from faults import add_broken_images, fill_disk, free_disk, snapshot
from PIL import Image
from tiny_tokenizer import (
    adam_steps,
    assert_same_checkpoint,
    cli_args,
    error_lines,
    image_folder,
    load,
    losses,
    metrics_by_step,
    regularizer_sets,
    run_cli,
    start_cli,
    subprocess_env,
    write_recipe,
)

from smapctl.data.datasets import build_datasets, make_loader
from smapctl.data.embedded import TensorImageDataset, load_embedded
from smapctl.data.images import BadImageError, eval_frame, eval_transform, to_signed_float
from smapctl.errors import UserError
from smapctl.models.regularizers import codebook_stats
from smapctl.train import checkpoint as ckpt
from smapctl.train import runner
from smapctl.train import tokenizer as tok_train
from smapctl.train.logging import read_metrics
from smapctl.train.run_folder import LOCK_FILE
from smapctl.train.schedule import lr_at
from smapctl.train.tokenizer import train_tokenizer


@pytest.fixture
def recipe_file(tmp_path):
    return write_recipe(tmp_path)


def train_command(recipe_file, run_dir) -> list[str]:
    """`smapctl train-tokenizer RECIPE --out RUN` as a subprocess's command line."""
    return [sys.executable, "-m", "smapctl", "train-tokenizer", str(recipe_file), "--out", str(run_dir)]


def _final_state(run_dir):
    return ckpt.load_state(ckpt.latest_checkpoint(run_dir))


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("kind", ["kl", "vq", "softvq"])
def test_pixel_loss_goes_down(tmp_path, recipe_file, kind, caplog):
    # 8 tokens: a batch has 64, so the collapse warning (perplexity under 2% of 64) could fire here.
    sets = [
        *regularizer_sets(kind),
        "model.num_latent_tokens=8",
        "train.max_steps=48",
        "train.sample_every=48",
    ]
    recipe = load(recipe_file, *sets)
    final = train_tokenizer(recipe, tmp_path / "run")
    pixel = losses(tmp_path / "run", "pixel")
    assert len(pixel) == 48
    first, last = sum(pixel[:8]) / 8, sum(pixel[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    assert final == ckpt.checkpoint_dir(tmp_path / "run", 48)
    state = _final_state(tmp_path / "run")
    assert state["step"] == 48 and adam_steps(state) == 48
    row = metrics_by_step(tmp_path / "run")[48]
    assert {"loss", "pixel", "reg", "keep", "lr"} <= row.keys()
    assert all(f"val/psnr_k{k}" in row for k in (0, 2, 4, 8))
    # The preview: one row of the 8 originals, then one row a prefix (0, 1, 2, 4, 8), 2 px padding.
    size = recipe.model.image_size + 2
    with Image.open(tmp_path / "run" / "samples" / "step_000000048.png") as grid:
        assert grid.size == (8 * size + 2, (1 + len(tok_train.preview_prefixes(8))) * size + 2)
    if kind != "kl":
        assert {"usage", "perplexity", "position_perplexity"} <= row.keys()
        assert min(losses(tmp_path / "run", "perplexity")) >= 2
    if kind == "softvq":  # (this tiny VQ gives every image the same tokens, and is warned of: below)
        assert "codebook collapse" not in caplog.text


def test_training_sees_the_loaders_uint8_batches_as_floats(tmp_path, recipe_file, monkeypatch):
    """The loader moves uint8 frames; each step converts its batch once, to the floats that converting
    image by image gives, and the loss compares the reconstruction with those."""
    seen = []
    real = tok_train.pixel_loss

    def pixel_loss(kind, x, y):
        seen.append(y.detach().clone())
        return real(kind, x, y)

    monkeypatch.setattr(tok_train, "pixel_loss", pixel_loss)
    recipe = load(recipe_file, "train.max_steps=2", "train.sample_every=100")
    train_tokenizer(recipe, tmp_path / "run")
    data = build_datasets(recipe.data, recipe.model.image_size)
    batch, seed = recipe.train.batch_size, recipe.train.seed
    loader = make_loader(data.train, batch, shuffle=True, seed=seed, drop_last=True, endless=True)
    for got, (frames, _) in zip(seen, loader, strict=False):
        assert frames.dtype == torch.uint8 and got.dtype == torch.float32
        assert torch.equal(got, torch.stack([to_signed_float(frame) for frame in frames]))
    assert len(seen) == 2


def test_preview_from_the_training_split_converts_its_frames():
    """With nothing held out the sample grids show training images, which come as uint8 frames."""
    data = load_embedded("digits", 16)
    frames = TensorImageDataset(data.train_images, data.train_labels, data.class_names, eval_frame(16))
    floats = TensorImageDataset(data.train_images, data.train_labels, data.class_names, eval_transform(16))
    (a, la), (b, lb) = tok_train._preview_batch(frames), tok_train._preview_batch(floats)
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(la, lb)
    assert len(set(la.tolist())) == 8  # one per class first


@pytest.mark.parametrize(
    ("labels", "picked"),
    [
        # sorted by class, 100 images each (a folder in the ImageNet layout): it showed one image
        ([c for c in range(10) for _ in range(100)], [100 * c for c in range(8)]),
        # classes 1 and 3 have no images (empty class folders), 3 classes for 8 images: it showed 3
        ([0, 0, 2, 2, 2, 4, 4, 0, 2, 4, 0], [0, 1, 2, 3, 4, 5, 6, 7]),
        # fewer images than the grid holds: all of them
        ([5, 5, 1], [0, 1, 2]),
    ],
    ids=["sorted-by-class", "empty-classes", "few-images"],
)
def test_the_preview_takes_a_class_each_then_fills_the_grid(labels, picked):
    """The sample grids' images: the first of each class (up to 8 classes), then the earliest others,
    in dataset order, chosen by the labels alone."""
    labels = torch.tensor(labels)
    images = torch.randint(
        0, 256, (len(labels), 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    dataset = TensorImageDataset(images, labels, [str(c) for c in range(10)], eval_frame(4))
    shown, shown_labels = tok_train._preview_batch(dataset)
    assert torch.equal(shown, to_signed_float(images[picked])) and torch.equal(shown_labels, labels[picked])


@pytest.mark.parametrize(
    ("K", "ks"),
    [
        (1, [0, 1]),
        (6, [0, 1, 2, 4, 6]),
        (8, [0, 1, 2, 4, 8]),
        (12, [0, 1, 2, 4, 8, 12]),
        (32, [0, 1, 2, 4, 8, 16, 32]),
    ],
)
def test_the_preview_prefixes_are_zero_the_powers_of_two_below_k_and_k(K, ks):
    assert tok_train.preview_prefixes(K) == ks


class _PrefixDecoder:
    """A stand-in tokenizer of 8 tokens that decodes any prefix of k tokens as the flat image 1.5 - k / 4
    (out of the image range at k 0), so each prefix's reconstruction error is known."""

    K = 8

    def encode(self, images, labels):
        return SimpleNamespace(z=torch.zeros(len(images), self.K, 1))

    def decode(self, z, labels):
        return torch.full((len(z), 3, 4, 4), 1.5 - z.shape[1] / 4)


def _stand_in_run():
    """(parts, recipe, run) for `_validate` and `_preview_panel` around `_PrefixDecoder`."""
    model = _PrefixDecoder()
    run = SimpleNamespace(
        eval_model=lambda ema: model, accelerator=SimpleNamespace(device=torch.device("cpu"))
    )
    recipe = SimpleNamespace(model=SimpleNamespace(num_latent_tokens=model.K))
    return SimpleNamespace(ema=None), recipe, run


def test_validation_psnr_is_per_prefix_of_the_clipped_reconstructions_of_the_first_256_images():
    """val/psnr_k{k} for k = 0, K/4, K/2, K: the mean PSNR of the first 256 held-out images (of 300, in
    batches of 64) against their reconstructions from k tokens, clipped to [-1, 1]."""
    values = torch.linspace(-0.9, 0.9, 300)
    images = values[:, None, None, None].expand(300, 3, 4, 4).contiguous()
    val = torch.utils.data.TensorDataset(images, torch.zeros(300, dtype=torch.long))
    parts, recipe, run = _stand_in_run()
    row = tok_train._validate(parts, recipe, val, run)
    expected = {}
    for k in (0, 2, 4, 8):
        recon = min(1.0, 1.5 - k / 4)  # clipped
        mse = (values[:256].double() - recon) ** 2
        expected[f"val/psnr_k{k}"] = float((10 * torch.log10(4.0 / mse)).mean())
    assert row == pytest.approx(expected, rel=1e-9)
    empty = torch.utils.data.TensorDataset(images[:0], torch.zeros(0, dtype=torch.long))
    assert tok_train._validate(parts, recipe, empty, run) == {}


def test_the_preview_shows_the_originals_then_a_row_per_prefix():
    parts, recipe, run = _stand_in_run()
    images = torch.linspace(-0.5, 0.5, 4)[:, None, None, None].expand(4, 3, 4, 4)
    panel = tok_train._preview_panel(parts, recipe, (images, torch.zeros(4, dtype=torch.long)), run)
    rows = panel.reshape(6, 4, 3, 4, 4)
    assert torch.equal(rows[0], images)
    for row, k in zip(rows[1:], [0, 1, 2, 4, 8], strict=True):
        assert torch.equal(row, torch.full_like(row, min(1.0, 1.5 - k / 4))), k  # clipped


def test_the_preview_and_the_validation_show_their_progress(monkeypatch, caplog):
    """SMAP-B's preview and validation (about 40 decodes) took 2.5 minutes on a CPU without a word: they
    go through the progress helper (its lines without a terminal), their results as before."""
    parts, recipe, run = _stand_in_run()
    images = torch.linspace(-0.5, 0.5, 300)[:, None, None, None].expand(300, 3, 4, 4).contiguous()
    val = torch.utils.data.TensorDataset(images, torch.zeros(300, dtype=torch.long))
    preview = (images[:4], torch.zeros(4, dtype=torch.long))
    quiet = (
        tok_train._preview_panel(parts, recipe, preview, run),
        tok_train._validate(parts, recipe, val, run),
    )
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="smapctl"):
        panel = tok_train._preview_panel(parts, recipe, preview, run)
        row = tok_train._validate(parts, recipe, val, run)
    said = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert said == [f"the sample grid: {i} of 6 passes" for i in range(1, 7)] + [
        f"validation: {n} of 256 images" for n in (64, 128, 192, 256)
    ]  # an encode, then k = 0 1 2 4 8; the first 256 images in batches of 64
    assert torch.equal(panel, quiet[0]) and row == quiet[1]


# ------------------------------------------------------------------------------------------ one-line errors


def test_resume_with_nothing_to_resume(tmp_path, recipe_file, capsys):
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", "--resume")
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [
        f"error: --resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}"
    ]
    assert not (tmp_path / "run").exists()
    # A run killed before its first checkpoint (it wrote its recipe.yaml): the message was a dead end.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(recipe_file.read_text())
    for dry in ((), ("--dry-run",)):
        args = ("train-tokenizer", recipe_file, "--out", tmp_path / "run", "--resume", *dry)
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and error_lines(err) == [
            f"error: --resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}: the run stopped"
            " before its first one; start it again without --resume"
        ], dry


def test_resume_of_a_runs_own_recipe_without_out_names_the_out_it_needs(tmp_path, recipe_file, capsys):
    """`train-tokenizer RUN/recipe.yaml --resume` without --out looked in runs/<RUN>-recipe and said only
    that it held no checkpoint."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", 1)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train-tokenizer", run / "recipe.yaml", "--resume", "--max-steps", 2)
    assert code == 1 and error_lines(err) == [
        f"error: --resume: {run / 'recipe.yaml'} is the recipe of the run {run}; pass --out {run} (without"
        " --out the run folder is runs/run-recipe)"
    ], err
    assert not Path("runs/run-recipe").exists()


def test_resume_refuses_another_model_and_fresh_start_refuses_to_overwrite(
    tmp_path, recipe_file, capsys, caplog
):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", "3")
    assert code == 0, err
    # (rich wraps long lines of stdout at 80 columns when it is not a terminal)
    assert f"checkpoint: {ckpt.checkpoint_dir(run, 3)}" in "".join(out.split("\n"))

    args = ["train-tokenizer", recipe_file, "--out", run, "--resume", "--set", "model.enc_width=64"]
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    [line] = error_lines(err)
    assert "another model (model.enc_width was 32, the recipe says 64)" in line
    # ... and names the command that does go on: the run's own recipe (it used to say only "use another
    # --out", which abandons the run).
    suggested = line.split("go on with the run's own recipe: ")[1]
    assert suggested == f"smapctl train-tokenizer {run / 'recipe.yaml'} --out {run} --resume"
    code, _, err = run_cli(capsys, *suggested.split()[1:-1], "--resume", "--max-steps", "4")
    assert code == 0, err
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 4)
    # A run already past --max-steps says there is nothing to train (it used to exit 0 without a word).
    code, _, err = run_cli(capsys, *suggested.split()[1:-1], "--resume", "--max-steps", "2")
    assert code == 0, err
    assert "nothing to train: the run is at step 4 and train.max_steps is 2" in caplog.text
    before = _run_files(run)

    args = ["train-tokenizer", recipe_file, "--out", run, "--resume", *cli_args(*regularizer_sets("vq"))]
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    [line] = error_lines(err)
    assert "model.regularizer.kind was 'kl', the recipe says 'vq'" in line

    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run)
    assert code == 1
    [line] = error_lines(err)
    assert line == (
        f"error: {run} already holds checkpoints; pass --resume to continue it, "
        "or --out to start a new run elsewhere"
    )
    after = _run_files(run)
    assert after == before  # nothing written, not even metrics or recipe.yaml


def _run_files(run: Path) -> dict[Path, bytes]:
    """A run folder's files and their bytes, its lock file left out: every training that takes the
    folder, a refused one too, writes its holder there ("process PID on HOST since TIME", which changed
    when a refused run crossed a second)."""
    return {p: data for p, data in snapshot(run).items() if p.name != LOCK_FILE}


def test_a_fresh_run_in_a_folder_without_checkpoints_starts_fresh_metrics(tmp_path, recipe_file):
    # A run killed before its first checkpoint leaves metrics behind; starting again replaces them.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    train_tokenizer(load(recipe_file, "train.max_steps=2", "train.sample_every=100"), tmp_path / "run")
    table = metrics_by_step(tmp_path / "run")
    assert sorted(table) == [1, 2] and table[1]["loss"] != 9.0


def test_batch_that_does_not_split_is_refused_before_anything_runs(tmp_path, recipe_file, capsys):
    sets = cli_args("train.batch_size=6", "train.grad_accum_steps=4")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1
    assert error_lines(err) == [
        "error: train.batch_size: 6 does not split over 1 process(es) x 4 accumulation step(s); "
        "choose a multiple of 4"
    ]
    assert not (tmp_path / "run").exists()


def _no_data(monkeypatch):
    """Fail the test if the run gets as far as loading its data."""

    def build_datasets(*args, **kwargs):
        raise AssertionError("the data was loaded before the error")

    monkeypatch.setattr("smapctl.data.datasets.build_datasets", build_datasets)


def test_fp16_on_a_cpu_is_refused_before_the_data(tmp_path, recipe_file, capsys, monkeypatch):
    _no_data(monkeypatch)
    sets = cli_args("train.precision=fp16")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [
        "error: train.precision: fp16 needs a GPU (on a CPU it would silently train in fp32); "
        "use bf16, auto or 'no' (fp32)"
    ]
    assert not (tmp_path / "run").exists()


def test_a_run_folder_whose_name_is_not_utf8_trains_to_its_end(tmp_path, recipe_file, capsys):
    """A run folder named in Latin-1 (`run\xe9`, bytes that are not UTF-8) crashed the training at its first
    progress line (a UTF-8 stdout refuses the surrogate Python holds the byte as); it trains, its lines
    showing the byte escaped."""
    run = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run\xe9"))
    code, out, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", "3")
    assert code == 0 and "Traceback" not in err, err
    assert "run\\xe9: step 3 of 3" in out and ckpt.latest_checkpoint(run) is not None
    # Its checkpoints load (safetensors reads UTF-8 paths only: every command refused its weights).
    args = ["train-tokenizer", recipe_file, "--out", run, "--max-steps", "4", "--resume"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "Traceback" not in err, err
    assert "run\\xe9: step 4 of 4" in out and ckpt.latest_checkpoint(run).name.endswith("4")


@pytest.mark.parametrize("case", ["a file", "under a file", "not allowed"])
def test_an_unwritable_run_folder_is_one_line_before_the_data(
    tmp_path, recipe_file, capsys, monkeypatch, case
):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    run = {"a file": afile, "under a file": afile / "run", "not allowed": tmp_path / "locked" / "run"}[case]
    if case == "not allowed":  # as under /sys, or a folder of another user's (the suite may run as root)
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    _no_data(monkeypatch)
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", "1")
    assert code == 1 and "Traceback" not in err
    if case == "not allowed":
        expected = (
            f"error: {run}: could not write the run folder (Permission denied): write somewhere you may"
        )
    else:
        expected = f"error: {run}: could not write the run folder: {afile} is a file, not a folder"
    assert error_lines(err) == [expected]
    assert afile.read_text() == "not a folder\n"


def test_a_long_run_name_leaves_the_bar_its_rate_on_a_narrow_terminal(
    tmp_path, recipe_file, capsys, monkeypatch
):
    """The bar's label is the run folder's name: a long one pushed the rate and the time left off an
    80-column terminal."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    run = tmp_path / ("smap-s-kl-imagenet256-lr1e-4-warmup5k-tail-drop-" + "x" * 30)
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", "2")
    assert code == 0, err
    drawn = [line for line in err.replace("\r", "\n").splitlines() if "2/2 [" in line]
    assert drawn and all(line.startswith("smap-s-kl-imagenet2...: ") for line in drawn), drawn
    # (tqdm draws its widest bar here, not knowing the width: the rate fits even so)
    assert all(0 < line.find("step/s") <= 80 - len("step/s") for line in drawn), drawn


@pytest.mark.parametrize("name", ["checkpoints", "samples"])
def test_a_file_where_the_runs_checkpoints_or_previews_go_is_one_line_before_the_data(
    tmp_path, recipe_file, capsys, monkeypatch, name
):
    """It stopped the run only at its first checkpoint or preview, train.ckpt_every steps in (a
    checkpoint's said "could not write checkpoint (File exists)")."""
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("not a folder\n")
    _no_data(monkeypatch)
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", run, "--max-steps", "1")
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [
        f"error: {run / name}: could not write the run's {name}: {run / name} is a file, not a folder"
    ]
    assert sorted(p.name for p in run.iterdir()) == [name] and (run / name).read_text() == "not a folder\n"


def test_disk_full_at_a_checkpoint_is_one_line_and_resume_continues(
    tmp_path, recipe_file, capsys, monkeypatch
):
    run = tmp_path / "run"
    no_samples = cli_args("train.sample_every=100")
    args = ["train-tokenizer", recipe_file, "--out", run, "--max-steps", "6", *no_samples]
    hits = fill_disk(monkeypatch, only="state.pt", after=1)  # the first checkpoint fits, the second not
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "Traceback" not in err and len(hits) == 1
    assert error_lines(err) == [
        f"error: {ckpt.checkpoint_dir(run, 6)}: could not write checkpoint (No space left on device): the "
        "disk is full; free some space or write elsewhere; earlier checkpoints are unchanged"
    ]
    assert ckpt.list_checkpoints(run) == [ckpt.checkpoint_dir(run, 3)]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000003"]

    free_disk(monkeypatch)
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 6)
    assert sorted(metrics_by_step(run)) == list(range(1, 7))


# ------------------------------------------------------------------------------------------ accumulation


def test_gradient_accumulation_is_one_optimizer_step_per_step(tmp_path, recipe_file):
    # VQ without tail dropping has no random draws in training, so 2 x 4 accumulated must match one
    # batch of 8 up to float summation order.
    sets = [*regularizer_sets("vq"), "model.tail_drop=none", "train.max_steps=6", "train.sample_every=100"]
    train_tokenizer(load(recipe_file, *sets, "train.grad_accum_steps=2"), tmp_path / "accum")
    train_tokenizer(load(recipe_file, *sets), tmp_path / "plain")
    accum, plain = _final_state(tmp_path / "accum"), _final_state(tmp_path / "plain")
    assert accum["step"] == plain["step"] == 6
    assert adam_steps(accum) == 6  # not once per micro-batch
    assert accum["scheduler"]["last_epoch"] == 6
    a = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "accum"))
    b = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "plain"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    la, lb = losses(tmp_path / "accum"), losses(tmp_path / "plain")
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ non-finite


def _patch_pixel_loss(monkeypatch, bad_calls):
    """pixel_loss returns NaN on the given (0-based) calls; it is called once per micro-batch."""
    real, calls = tok_train.pixel_loss, []

    def pixel_loss(kind, x, y):
        calls.append(kind)
        loss = real(kind, x, y)
        return loss * float("nan") if len(calls) - 1 in bad_calls else loss

    monkeypatch.setattr(tok_train, "pixel_loss", pixel_loss)


def test_a_non_finite_step_is_skipped(tmp_path, recipe_file, monkeypatch, caplog):
    _patch_pixel_loss(monkeypatch, bad_calls={4})
    train_tokenizer(load(recipe_file, "train.max_steps=8", "train.sample_every=100"), tmp_path / "run")
    assert "non-finite loss: skipping this step (1 in a row)" in caplog.text
    table = metrics_by_step(tmp_path / "run")
    assert sorted(s for s in table if "loss" in table[s]) == [1, 2, 3, 4, 6, 7, 8]
    state = _final_state(tmp_path / "run")
    assert state["step"] == 8 and adam_steps(state) == 7 and state["scheduler"]["last_epoch"] == 7
    weights = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def _patch_nan_gradient(monkeypatch, name, bad_calls):
    """The loss `name` of tok_train keeps its value but gets a NaN gradient on the given (0-based) calls:
    sqrt(|u|) at u = 0 adds 0 with slope inf * 0."""
    real, calls = getattr(tok_train, name), []

    def loss_fn(*args):
        calls.append(1)
        loss = real(*args)
        if len(calls) - 1 in bad_calls:
            x = args[-2]  # pixel_loss(kind, recon, images), hinge_d_loss(real_logits, fake_logits)
            loss = loss + (x - x.detach()).abs().sqrt().sum()
        return loss

    monkeypatch.setattr(tok_train, name, loss_fn)


@pytest.mark.parametrize("gan", [False, True])
def test_a_non_finite_gradient_of_a_finite_loss_skips_the_step(
    tmp_path, recipe_file, monkeypatch, caplog, gan
):
    """Only the loss was checked: one NaN gradient element, spread by the clip to every gradient, made
    every weight and the EMA NaN. With the GAN, the discriminator's NaN gradient skips the tokenizer's
    step too (before, the discriminator's weights went NaN after the tokenizer had stepped)."""
    _patch_nan_gradient(monkeypatch, "hinge_d_loss" if gan else "pixel_loss", bad_calls={4})
    sets = ["train.max_steps=8", "train.sample_every=100", "train.ema_decay=0.5"]
    if gan:
        sets += ["loss.gan_weight=0.1", "loss.gan_start_step=0", "loss.disc_width=8", "loss.disc_layers=2"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    assert "non-finite gradients: skipping this step (1 in a row)" in caplog.text
    table = metrics_by_step(tmp_path / "run")
    assert sorted(s for s in table if "loss" in table[s]) == [1, 2, 3, 4, 6, 7, 8]
    state = _final_state(tmp_path / "run")
    assert adam_steps(state) == 7 and state["scheduler"]["last_epoch"] == 7
    if gan:
        assert adam_steps(state, "disc_optimizer") == 7
    last = ckpt.latest_checkpoint(tmp_path / "run")
    for name in ckpt.weight_names(last):
        assert all(torch.isfinite(w).all() for w in ckpt.load_weights(last, name).values()), name


def test_under_an_fp16_loss_scale_the_adaptive_gan_weight_takes_the_scale(tmp_path, recipe_file, monkeypatch):
    """fp16 on a GPU: the GAN's adaptive weight must take its gradients at the loss scale the backward
    uses (unscaled fp16 pixel gradients fall below fp16's range). The scaler accelerate sets up there,
    on the CPU: the weight is handed the scaler's scale at every step."""

    make = runner.make_accelerator

    def with_a_loss_scale(cfg, run_dir=None):
        accelerator = make(cfg, run_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        return accelerator

    scales, weight = [], tok_train.adaptive_gan_weight

    def recorded(*args, loss_scale=1.0, **kwargs):
        scales.append(float(loss_scale))
        return weight(*args, loss_scale=loss_scale, **kwargs)

    monkeypatch.setattr(runner, "make_accelerator", with_a_loss_scale)
    monkeypatch.setattr(tok_train, "adaptive_gan_weight", recorded)
    sets = ["train.max_steps=3", "train.sample_every=100", "loss.gan_weight=0.1", "loss.gan_start_step=0"]
    sets += ["loss.disc_width=8", "loss.disc_layers=2"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    assert scales == [256.0, 256.0, 256.0]  # no overflow: the scale stays (its growth interval is 2000)


def test_non_finite_losses_in_a_row_stop_the_run(tmp_path, recipe_file, monkeypatch, capsys):
    # Steps 1-7 are fine, every step from the 8th is NaN: 8 and 9 are skipped (a skipped step still
    # counts, so the checkpoint of step 9 is written, holding the weights of step 7), 10 stops the run.
    _patch_pixel_loss(monkeypatch, bad_calls=range(7, 100))
    sets = cli_args("train.max_steps=20", "train.max_nonfinite_steps=3", "train.sample_every=100")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1
    last = ckpt.checkpoint_dir(tmp_path / "run", 9)
    assert error_lines(err) == [
        f"error: the loss was not finite 3 steps in a row; stopping (the last good checkpoint is {last}). "
        "Try a lower train.lr (in a new run: --out) or train.precision=no"
    ]
    assert ckpt.latest_checkpoint(tmp_path / "run") == last
    assert adam_steps(ckpt.load_state(last)) == 7
    weights = ckpt.load_weights(last)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_micro_batch_skips_the_whole_accumulated_step(tmp_path, recipe_file, monkeypatch):
    # 2 micro-batches a step: call 5 is the second micro-batch of step 3. Its first micro-batch's
    # gradients must be dropped and accelerate's accumulation must stay in phase afterwards.
    _patch_pixel_loss(monkeypatch, bad_calls={5})
    sets = ["train.max_steps=6", "train.grad_accum_steps=2", "train.sample_every=100"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    table = metrics_by_step(tmp_path / "run")
    assert sorted(s for s in table if "loss" in table[s]) == [1, 2, 4, 5, 6]
    state = _final_state(tmp_path / "run")
    assert adam_steps(state) == 5 and state["scheduler"]["last_epoch"] == 5


def test_non_finite_limit_counts_accumulated_steps(tmp_path, recipe_file, monkeypatch, capsys):
    # The second micro-batch of every step is NaN (each step's first one is finite): every step is
    # skipped, so the third stops the run before its checkpoint (the limit counts optimiser steps).
    _patch_pixel_loss(monkeypatch, bad_calls=range(1, 100, 2))
    sets = cli_args("train.grad_accum_steps=2", "train.max_nonfinite_steps=3", "train.sample_every=100")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1
    assert error_lines(err) == [
        "error: the loss was not finite 3 steps in a row; stopping (no checkpoint was written). "
        "Try a lower train.lr (in a new run: --out) or train.precision=no"
    ]
    assert ckpt.latest_checkpoint(tmp_path / "run") is None


def test_a_completed_step_resets_the_non_finite_count(tmp_path, recipe_file, monkeypatch):
    # Accumulation 2, max_nonfinite_steps 2; a skipped step makes one call when its first micro-batch is
    # NaN, two when its second is. Calls 0-1 step 1 (skipped), 2-3 step 2, 4 step 3 (skipped), 5-6 step 4.
    sets = ["train.max_steps=6", "train.grad_accum_steps=2", "train.max_nonfinite_steps=2"]
    _patch_pixel_loss(monkeypatch, bad_calls={1, 4})  # steps 1 and 3 skipped, not in a row
    train_tokenizer(load(recipe_file, *sets, "train.sample_every=100"), tmp_path / "ok")
    assert adam_steps(_final_state(tmp_path / "ok")) == 4
    _patch_pixel_loss(monkeypatch, bad_calls={1, 4, 6})  # steps 3 and 4 in a row
    with pytest.raises(UserError, match="not finite 2 steps in a row") as stopped:
        train_tokenizer(load(recipe_file, *sets, "train.sample_every=100"), tmp_path / "stopped")
    assert stopped.value.agreed  # every process of a launcher counts alike: the CLI may close the group
    assert [r["step"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")] == [2]


# ------------------------------------------------------------------------------------------ logging


def test_metrics_log_the_learning_rate_each_step_used(tmp_path, recipe_file):
    """Warm-up 2 over 4 steps: the rates the optimiser used, not the next steps' (lr_at is 0-based)."""
    sets = ["train.max_steps=4", "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr_ratio=0.05"]
    recipe = load(recipe_file, *sets, "train.sample_every=100")
    train_tokenizer(recipe, tmp_path / "run")
    logged = [metrics_by_step(tmp_path / "run")[s]["lr"] for s in range(1, 5)]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 5.25e-4])
    assert logged == pytest.approx([lr_at(step, recipe.train) for step in range(4)])


def test_rows_samples_and_validation_come_every_n_steps_and_at_the_last(tmp_path, recipe_file):
    """log_every 2, sample_every 3 over 5 steps: metrics rows after steps 2, 4 and 5, each the mean of
    its steps' values (those a run logging every step gives) with its last step's lr; sample grids and
    validation after steps 3 and 5."""
    sets = ["train.max_steps=5", "train.sample_every=3", "train.ckpt_every=100"]
    train_tokenizer(load(recipe_file, *sets, "train.log_every=2"), tmp_path / "every2")
    train_tokenizer(load(recipe_file, *sets, "train.log_every=1"), tmp_path / "every1")
    rows, each = metrics_by_step(tmp_path / "every2"), metrics_by_step(tmp_path / "every1")
    assert [s for s in sorted(rows) if "loss" in rows[s]] == [2, 4, 5]
    for step, steps in ((2, (1, 2)), (4, (3, 4)), (5, (5,))):
        for key in ("loss", "pixel", "reg", "keep"):
            mean = sum(each[s][key] for s in steps) / len(steps)
            assert rows[step][key] == pytest.approx(mean, rel=1e-6), (step, key)
        assert rows[step]["lr"] == each[step]["lr"]
    assert [s for s in sorted(rows) if "val/psnr_k0" in rows[s]] == [3, 5]
    assert sorted(p.name for p in (tmp_path / "every2" / "samples").iterdir()) == [
        "step_000000003.png",
        "step_000000005.png",
    ]


def test_every_training_step_drops_the_tail_and_logs_the_mean_prefix_kept(tmp_path, recipe_file, monkeypatch):
    """Eq. 5 in training: each step's batch decodes from prefixes k drawn in 0..K, and `keep` is their
    mean; also after a preview or validation, which switch the model (the EMA at decay 0) to eval mode."""
    from smapctl.models.smap import SMAP

    drawn, sample_keep = [], SMAP.sample_keep

    def recorded(self, *args, **kwargs):
        keep = sample_keep(self, *args, **kwargs)
        drawn.append(keep.clone())
        return keep

    monkeypatch.setattr(SMAP, "sample_keep", recorded)
    sets = ["train.max_steps=4", "train.sample_every=2", "train.ema_decay=0", "train.log_every=1"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    rows = metrics_by_step(tmp_path / "run")
    assert len(drawn) == 4  # one draw per step, the steps after the previews' included
    keeps = torch.cat(drawn)
    assert keeps.min() >= 0 and keeps.max() <= 4 and len(keeps.unique()) > 1
    for step, keep in enumerate(drawn, start=1):
        assert rows[step]["keep"] == pytest.approx(keep.float().mean().item()), step


# ------------------------------------------------------------------------------------------ GAN + perceptual


GAN_SETS = [
    "loss.perceptual_weight=0.1",
    "loss.gan_weight=0.1",
    "loss.gan_start_step=2",
    "loss.disc_width=8",
    "loss.disc_layers=2",
    "loss.disc_lr=1e-3",
    "train.max_steps=8",
    "train.ckpt_every=4",
    "train.sample_every=100",
]


def test_gan_and_perceptual_train_log_and_resume(tmp_path, recipe_file, vgg_file):
    recipe = load(recipe_file, *GAN_SETS, f"loss.perceptual_weights={vgg_file}")
    train_tokenizer(recipe, tmp_path / "full")
    table = metrics_by_step(tmp_path / "full")
    for step in (1, 2):
        assert "perceptual" in table[step] and "g_loss" not in table[step]
    for step in range(3, 9):
        assert {"g_loss", "d_loss", "gan_adaptive_weight", "perceptual"} <= table[step].keys()
        assert table[step]["gan_adaptive_weight"] > 0
    final = ckpt.latest_checkpoint(tmp_path / "full")
    assert "discriminator" in ckpt.weight_names(final)
    state = ckpt.load_state(final)
    assert adam_steps(state, "disc_optimizer") == 6  # the discriminator trains from step 3 on
    assert state["disc_scheduler"]["last_epoch"] == 8

    # Resume from step 4: discriminator, its optimiser and everything else come back exactly.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(ckpt.checkpoint_dir(tmp_path / "resumed", 8))
    train_tokenizer(recipe, tmp_path / "resumed", resume=True)
    assert_same_checkpoint(final, ckpt.latest_checkpoint(tmp_path / "resumed"))
    assert metrics_by_step(tmp_path / "resumed") == table


def test_perceptual_loss_without_weights_is_one_line(tmp_path, recipe_file, capsys):
    sets = cli_args("loss.perceptual_weight=1.0")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1
    [line] = error_lines(err)
    assert line.startswith("error: loss.perceptual_weights: not set;") and "vgg16-397923af.pth" in line
    assert not (tmp_path / "run").exists()  # the run folder it made early is gone again


def test_a_failed_start_leaves_no_empty_run_folder_but_keeps_an_existing_one(tmp_path, recipe_file, capsys):
    sets = cli_args("data.dataset=nothere")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "new", *sets)
    assert code == 1 and "nothere" in err and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # the user's own (empty) folder stays
    code, _, _ = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "mine", *sets)
    assert code == 1 and (tmp_path / "mine").is_dir()
    # A failure after the run wrote its recipe.yaml and an empty metrics.jsonl leaves nothing either.
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "big", *cli_args("train.batch_size=4096")
    )
    assert code == 1 and "is larger than the training set" in err and not (tmp_path / "big").exists()
    # ... nor the parents made for it: a first run without --out left an empty runs/ behind.
    args = ["train-tokenizer", recipe_file, *cli_args("train.batch_size=4096")]
    code, _, _ = run_cli(capsys, *args, "--out", tmp_path / "new" / "a" / "run")
    assert code == 1 and not (tmp_path / "new").exists()
    (tmp_path / "kept" / "mine").mkdir(parents=True)  # a parent that holds something else stays
    code, _, _ = run_cli(capsys, *args, "--out", tmp_path / "kept" / "a" / "run")
    assert code == 1 and sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["mine"]


# ------------------------------------------------------------------------------------------ image folders


def _image_folder(root, classes=("cat", "dog", "fox"), per_class=6):
    """An ImageNet-layout folder of small PNG/JPEG images plus three broken files -> their paths."""
    torch.manual_seed(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(20 + i, 24, 3) * 80 + 60 * c).clamp(0, 255).to(torch.uint8).numpy()
            suffix = "png" if i % 2 else "JPEG"
            Image.fromarray(pixels).save(root / name / f"img{i}.{suffix}")
    broken = [root / "cat" / "empty.png", root / "dog" / "truncated.png", root / "fox" / "notes.jpg"]
    broken[0].write_bytes(b"")
    good = (root / "dog" / "img1.png").read_bytes()
    broken[1].write_bytes(good[: len(good) // 2])
    broken[2].write_text("this is not a picture\n")
    return broken


@pytest.mark.parametrize("inside", ["data", "data/cat", "data/cat/run"])
def test_a_run_folder_inside_the_dataset_is_refused(inside, tmp_path, recipe_file, capsys):
    """`--out` in the image folder put samples/*.png there: a `samples` class for the next training."""
    _image_folder(tmp_path / "data")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    sets = cli_args(f"data.dataset={tmp_path / 'data'}", "model.num_classes=3")
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / inside, *sets)
    assert code == 1
    [line] = error_lines(err)
    assert line == (
        f"error: --out {tmp_path / inside}: inside data.dataset {tmp_path / 'data'}, whose images the run"
        " reads; choose a run folder elsewhere"
    )
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before


def test_a_run_folder_inside_another_runs_checkpoints_is_refused(
    tiny_kl_tokenizer, tmp_path, recipe_file, capsys
):
    """`--out OTHER/checkpoints/step_N/inner` trained, and OTHER's next resume pruned step_N with it."""
    other = tmp_path / "other"
    shutil.copytree(tiny_kl_tokenizer, other)
    step = ckpt.latest_checkpoint(other)
    for out in (step / "inner", other / "checkpoints" / "new"):
        code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", out, "--max-steps", 1)
        assert code == 1
        [line] = error_lines(err)
        assert line.startswith(f"error: {out}: inside ") and "a training run's checkpoints" in line
        assert not out.exists()


def test_a_held_out_fraction_that_does_nothing_is_said_so(tmp_path, recipe_file, caplog):
    recipe = load(recipe_file, "data.val_fraction=0.3", "train.max_steps=1", "train.sample_every=100")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(recipe, tmp_path / "run")
    assert "data.val_fraction 0.3: no effect on digits, whose held-out split is fixed" in caplog.text
    folder = [f"data.dataset={tmp_path / 'images'}", f"data.val_dataset={tmp_path / 'images'}"]
    _image_folder(tmp_path / "images")
    recipe = load(recipe_file, *folder, *FOLDER_SETS, "train.max_steps=1")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(recipe, tmp_path / "run2")
    assert (
        "data.val_fraction 0.2: no effect with data.val_dataset, which holds the held-out images"
        in caplog.text
    )


def test_a_dry_run_of_a_resume_says_each_warning_of_its_images_once(tmp_path, recipe_file, capsys, caplog):
    """`--dry-run --resume` lists the images for the training set's checks and again for the resume's:
    an empty class folder was warned of twice."""
    _image_folder(tmp_path / "images", classes=("cat", "dog", "fox"))
    shutil.rmtree(tmp_path / "images" / "fox")
    (tmp_path / "images" / "fox").mkdir()  # an empty class folder
    sets = [
        f"data.dataset={tmp_path / 'images'}",
        "data.on_error=skip",
        *FOLDER_SETS[:2],
        "train.max_steps=1",
    ]
    run = tmp_path / "run"
    train_tokenizer(load(recipe_file, *sets, "train.sample_every=100"), run)
    caplog.clear()
    code, _, err = run_cli(
        capsys, "train-tokenizer", run / "recipe.yaml", "--out", run, "--resume", "--dry-run"
    )
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [f"{tmp_path / 'images'}: class folder(s) without images: fox"]


FOLDER_SETS = ["model.num_classes=3", "data.val_fraction=0.2", "train.max_steps=6", "train.sample_every=6"]


def test_classes_too_small_to_hold_out_an_image_are_said_so(tmp_path, recipe_file, caplog, capsys):
    """The split rounds val_fraction x each class's size: 0.06 of classes of 6-7 images held out nothing,
    silently, and `evaluate` then blamed "data.val_fraction is 0"."""
    _image_folder(tmp_path / "images")  # 6 images per class (plus broken files, skipped)
    sets = [f"data.dataset={tmp_path / 'images'}", "data.on_error=skip", *FOLDER_SETS[:1]]
    recipe = load(recipe_file, *sets, "data.val_fraction=0.06", "train.max_steps=1", "train.sample_every=100")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(recipe, tmp_path / "run")
    reason = "data.val_fraction 0.06 of each class rounds to no image: every class has fewer than 8.33 images"
    assert f"{tmp_path / 'images'}: no image held out ({reason}): no validation" in caplog.text
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", tmp_path / "run", "--no-semantic")
    assert code == 1 and f"its recipe holds out no images ({reason}); pass --data" in err


def _counted_folder(root, sizes: dict[str, int]) -> None:
    """An ImageNet-layout folder of `sizes[class]` small PNGs per class."""
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / name / f"img{i}.png")


def test_a_held_out_split_of_every_image_is_said_so(tmp_path, recipe_file, capsys):
    """val_fraction 0.5 of classes of one image holds out all of them: the run stopped at "train.batch_size:
    2 is larger than the training set (0 images)", blaming the batch size."""
    _counted_folder(tmp_path / "images", {"cat": 1, "dog": 1, "fox": 1})
    sets = cli_args(f"data.dataset={tmp_path / 'images'}", "data.val_fraction=0.5", *FOLDER_SETS[:1])
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1
    assert error_lines(err) == [
        f"error: data.val_fraction: 0.5 of each class, rounded, is every image of {tmp_path / 'images'} (no"
        " class has more than 1): none is left to train on; lower it, or give the held-out images a folder"
        " of their own (data.val_dataset)"
    ]


def test_a_class_held_out_whole_is_named(tmp_path, recipe_file, caplog):
    """The other classes train; the one whose every image is held out would never be seen, silently."""
    _counted_folder(tmp_path / "images", {"cat": 1, "dog": 4, "fox": 4})
    sets = [f"data.dataset={tmp_path / 'images'}", "data.val_fraction=0.5", *FOLDER_SETS[:1]]
    recipe = load(recipe_file, *sets, "train.batch_size=2", "train.max_steps=1", "train.sample_every=100")
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(recipe, tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "holds out every image" in r.getMessage()]
    assert said == [
        f"data.val_fraction 0.5 holds out every image of 1 class(es) of {tmp_path / 'images'} (cat): training"
        " never sees them; lower it, or give the held-out images a folder of their own (data.val_dataset)"
    ]


def test_image_folder_training_skips_broken_files(tmp_path, recipe_file, caplog):
    broken = _image_folder(tmp_path / "images")
    recipe = load(recipe_file, f"data.dataset={tmp_path / 'images'}", "data.on_error=skip", *FOLDER_SETS)
    with caplog.at_level(logging.WARNING):
        final = train_tokenizer(recipe, tmp_path / "run")
    for path in broken:  # every broken file is read (train or held-out) within 6 steps, and reported
        assert f"skipping unreadable image {path}:" in caplog.text
    # ... and counted once each at the end, with the list of them in the run folder
    listing = tmp_path / "run" / "skipped_images.txt"
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert summary.startswith(f"skipped 3 unreadable images (list: {listing}): ")
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(
        map(str, broken)
    )
    assert ckpt.load_meta(final)["class_names"] == ["cat", "dog", "fox"]
    assert json.loads((final / "meta.json").read_text())["recipe"]["data"]["on_error"] == "skip"
    assert all(v is not None for v in metrics_by_step(tmp_path / "run")[6].values())
    # A resumed run meets the same broken files again: still listed and counted once each (the list used
    # to hold each of them twice).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_tokenizer(
            replace(recipe, train=replace(recipe.train, max_steps=12)), tmp_path / "run", resume=True
        )
    assert f"skipped 3 unreadable images (list: {listing}): " in caplog.text
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(
        map(str, broken)
    )
    # ... and so after the folder has moved: the earlier sessions' lines name the images where they are
    # now (they were counted again under their new paths).
    (tmp_path / "images").rename(tmp_path / "moved")
    moved = replace(recipe.data, dataset=str(tmp_path / "moved"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_tokenizer(
            replace(recipe, data=moved, train=replace(recipe.train, max_steps=18)),
            tmp_path / "run",
            resume=True,
        )
    assert f"skipped 3 unreadable images (list: {listing}): " in caplog.text
    now = [str(tmp_path / "moved" / p.relative_to(tmp_path / "images")) for p in broken]
    assert sorted(line.split("\t")[0] for line in listing.read_text().splitlines()) == sorted(now)


def test_image_folder_with_fail_stops_naming_the_file(tmp_path, recipe_file, capsys):
    broken = _image_folder(tmp_path / "images")
    sets = cli_args(f"data.dataset={tmp_path / 'images'}", "data.on_error=fail", *FOLDER_SETS)
    code, _, err = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1 and "Traceback" not in err
    [line] = error_lines(err)
    assert any(line.startswith(f"error: {path}: ") for path in broken), line
    # ... and says what to do (it named the file alone).
    assert line.endswith("; fix or remove it, or --set data.on_error=skip to leave such images out"), line


def test_bad_image_in_a_data_worker_exits_with_the_error(tmp_path, recipe_file):
    """A worker process that raises (`on_error: fail`) must not leave the command hanging at exit: its
    DataLoader, freed inside a reference cycle, used to lose its stop message, and the workers ignore
    SIGTERM (so a scheduler's signal reaches the main process only), so the process never exited."""
    broken = _image_folder(tmp_path / "images")
    for path in _image_folder(tmp_path / "val"):  # a clean held-out set: only the workers meet a bad file
        path.unlink()
    sets = cli_args(
        f"data.dataset={tmp_path / 'images'}", f"data.val_dataset={tmp_path / 'val'}", "data.on_error=fail",
        "data.num_workers=2", *FOLDER_SETS,
    )  # fmt: skip
    cmd = train_command(recipe_file, tmp_path / "run")
    r = subprocess.run([*cmd, *sets], capture_output=True, text=True, timeout=240)  # hung for good before
    assert r.returncode == 1, r.stderr
    [line] = error_lines(r.stderr)
    assert any(line.startswith(f"error: {path}: ") for path in broken), line


def test_a_bad_image_in_a_data_worker_keeps_nothing_of_the_run(tmp_path, recipe_file, monkeypatch):
    """Once its error is let go, a run stopped by a bad image a data worker met (`on_error: fail`) keeps
    nothing: torch re-raised the worker's error from a frame that kept it in a local, a cycle that held
    the run's frames, its model and optimizer among them, until Python's next full collection."""
    # The broken files sort after the images the sample grid reads (in this process, not in a worker).
    add_broken_images(image_folder(tmp_path / "images", ("a", "b"), 8) / "a")
    sets = [f"data.dataset={tmp_path / 'images'}", "data.on_error=fail", "data.num_workers=2"]
    sets += ["data.val_fraction=0", "model.num_classes=2", "train.max_steps=6"]
    models, real = [], tok_train.build_parts
    monkeypatch.setattr(tok_train, "build_parts", lambda r: models.append(real(r)) or models[-1])
    for run, collect in (("warm", True), ("run", False)):  # (what the first run imports: its own cycles)
        gc.disable() if not collect else gc.collect()
        try:
            with pytest.raises(BadImageError):
                train_tokenizer(load(recipe_file, *sets), tmp_path / run)
            gone = weakref.ref(models.pop().model)
            assert collect or gone() is None
        finally:
            gc.enable()


def test_resume_refuses_to_hold_out_images_it_trained_on(tmp_path, recipe_file, capsys):
    """A folder run that held nothing out may not start holding out images on --resume: they would be
    evaluated as unseen. Images added to it are no split to move, so a resume goes on."""
    _image_folder(tmp_path / "images")
    sets = [f"data.dataset={tmp_path / 'images'}", "model.num_classes=3", "train.sample_every=100"]
    train_tokenizer(load(recipe_file, *sets, "data.val_fraction=0", "train.max_steps=2"), tmp_path / "run")
    fraction = r"held-out fraction was 0 when the run started, it is 0.2 now, so the images held out"
    with pytest.raises(UserError, match=rf"{fraction} .*; resume with --set data.val_fraction=0\.0 \(and"):
        recipe = load(recipe_file, *sets, "data.val_fraction=0.2", "train.max_steps=3")
        train_tokenizer(recipe, tmp_path / "run", resume=True)
    # `--dry-run --resume` says so too (it listed no image and passed).
    from tiny_tokenizer import error_lines, run_cli

    args = ["train-tokenizer", tmp_path / "run" / "recipe.yaml", "--out", tmp_path / "run", "--resume"]
    code, _, err = run_cli(capsys, *args, "--dry-run", "--set", "data.val_fraction=0.2")
    assert code == 1 and re.search(fraction, error_lines(err)[0])
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "cat" / "new.png")
    train_tokenizer(
        load(recipe_file, *sets, "data.val_fraction=0", "train.max_steps=3"), tmp_path / "run", resume=True
    )


def test_resume_refuses_other_classes(tmp_path, recipe_file, capsys):
    _image_folder(tmp_path / "images")
    recipe = load(recipe_file, f"data.dataset={tmp_path / 'images'}", *FOLDER_SETS, "train.max_steps=3")
    train_tokenizer(recipe, tmp_path / "run")
    (tmp_path / "images" / "fox").rename(tmp_path / "images" / "wolf")
    with pytest.raises(UserError, match=r"other classes \(class 2 was 'fox', the data now gives 'wolf'\)"):
        train_tokenizer(recipe, tmp_path / "run", resume=True)
    # `--dry-run --resume` says so too (it passed).
    from tiny_tokenizer import error_lines, run_cli

    args = ["train-tokenizer", tmp_path / "run" / "recipe.yaml", "--out", tmp_path / "run", "--resume"]
    code, _, err = run_cli(capsys, *args, "--dry-run")
    assert code == 1 and "class 2 was 'fox', the data now gives 'wolf'" in error_lines(err)[0]


# ------------------------------------------------------------------------------------------ collapse


def _collapse_the_codebook(monkeypatch):
    """Training builds its VQ with every code equal: every token picks code 0 (ties go to the first)."""
    build = tok_train.build_parts

    def collapsed(recipe):
        parts = build(recipe)
        codebook = parts.model.regularizer.codebook.weight
        with torch.no_grad():
            codebook.copy_(codebook[:1].expand_as(codebook))
        return parts

    monkeypatch.setattr(tok_train, "build_parts", collapsed)


def test_codebook_collapse_is_reported(tmp_path, recipe_file, monkeypatch, caplog):
    # Every code equal: every token picks code 0 (ties go to the first), the textbook collapse.
    _collapse_the_codebook(monkeypatch)
    sets = [
        *regularizer_sets("vq"),
        "model.num_latent_tokens=8",
        "train.max_steps=2",
        "train.sample_every=100",
    ]
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    assert (
        "step 1: codebook collapse? its batch's perplexity 1.0 of a possible 64 (usage 1.6%); if it stays, "
        "try" in caplog.text
    )


def test_a_collapse_onto_the_same_tokens_for_every_image_is_warned_of(recipe_file, caplog):
    """One code per token position, the same for every image: the pooled perplexity is K (8 of a
    possible 64, above the 2% threshold), so it went unsaid, while every image had the same tokens and
    reconstruction (a 1 x 32 SMAP-VQ on digits did this from step 20 to 300; its PSNR flat over k). A run
    starts near it (every image nearly the same latents), so it is said once it has lasted 50 steps."""
    recipe = load(recipe_file, *regularizer_sets("vq"), "model.num_latent_tokens=8")
    B, K = 8, 8
    same = codebook_stats(torch.arange(K).repeat(B, 1), 64)  # position k has code k in every image
    assert float(same["perplexity"]) == pytest.approx(K) and float(same["position_perplexity"]) == 1.0
    varied = torch.randint(0, 64, (B, K), generator=torch.Generator().manual_seed(0))
    varied = codebook_stats(varied, 64)
    assert float(varied["position_perplexity"]) > 4
    one_apart = torch.arange(K).repeat(B, 1)
    one_apart[0] += K  # one image of 8 with codes of its own: about where a healthy run starts
    one_apart = codebook_stats(one_apart, 64)
    assert 1.05 < float(one_apart["position_perplexity"]) < 1.5

    def warnings_of(rows) -> list[str]:
        """The warnings of a run whose logged rows are `rows` [(step, terms, batch)]."""
        watch = tok_train.CollapseWatch(recipe)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="smapctl.train"):
            for step, terms, batch in rows:
                watch.check(terms, batch, step)
        return [r.getMessage() for r in caplog.records]

    stretch = [(step, same, B) for step in range(9, 200, 10)]
    [said] = warnings_of(stretch)  # once, 50 steps in
    assert said == (
        "step 60: codebook collapse? every image of a batch has had the same tokens since step 10 "
        "(perplexity 1.00 per token position, of a possible 8), so the same reconstruction; try a larger "
        "encoder (model.enc_width, model.enc_depth) or model.regularizer.kind softvq"
    )
    assert not warnings_of(stretch[:5])  # 40 steps: a run's start
    # A stretch broken by a row of varied tokens starts again; a second stretch is said again.
    assert not warnings_of([*stretch[:4], (49, varied, B), *stretch[5:9]])
    assert len(warnings_of([*stretch[:6], (69, varied, B), *[(s, same, B) for s in range(79, 140, 10)]])) == 2
    assert not warnings_of([(step, one_apart, B) for step in range(9, 200, 10)])
    assert not warnings_of([(step, same, 2) for step in range(9, 200, 10)])  # 2 images: too few to tell


def test_a_lasting_codebook_collapse_is_said_once_not_at_every_logged_row(recipe_file, caplog):
    """One code for every token, for 1,000 logged rows: one warning (it was one a row, 1,000 lines), and
    once the codebook has recovered, a new collapse is said again."""
    recipe = load(recipe_file, *regularizer_sets("vq"), "model.num_latent_tokens=8")
    B, K = 8, 8
    one_code = codebook_stats(torch.zeros(B, K, dtype=torch.long), 64)  # perplexity 1 of a possible 64
    varied = codebook_stats(torch.randint(0, 64, (B, K), generator=torch.Generator().manual_seed(0)), 64)
    watch = tok_train.CollapseWatch(recipe)
    rows = [*([one_code] * 1000), varied, *([one_code] * 10)]
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        for i, terms in enumerate(rows):
            watch.check(terms, B, 10 * i + 9)
    said = [r.getMessage() for r in caplog.records if "its batch's perplexity" in r.getMessage()]
    assert [m.split(":")[0] for m in said] == ["step 10", "step 10020"]


def test_resume_accepts_a_checkpoint_written_before_a_new_model_field():
    """A model config saved by an older smapctl (without a field added since) resumes: the field takes
    its default before the comparison."""
    from smapctl.recipe import load_tokenizer_recipe
    from smapctl.train.resume import with_defaults

    cfg = load_tokenizer_recipe("recipes/demo/tokenizer.yaml")
    from smapctl.config import to_dict

    saved = to_dict(cfg.model)
    del saved["tail_drop_full_prob"]
    assert with_defaults(type(cfg.model), saved) == to_dict(cfg.model)


# ------------------------------------------------------------------------------------------ torch.compile


def test_compiled_training_follows_eager_and_saves_plain_weights(tmp_path, recipe_file, monkeypatch):
    """`train.compile: true` (inductor through accelerate): the same losses as eager up to kernel rounding,
    through steps with different prefix lengths (recompiles) and past the GAN's start, and checkpoints
    without `_orig_mod.` keys that load into an eager model and resume eagerly. The adaptive GAN weight
    takes two gradients with retain_graph=True, which a compiled backward with donated buffers refuses: a
    compiled run crashed at loss.gan_start_step (200k steps into the paper's recipes). One compiled run
    for both: building its kernels is most of this test's time."""
    gan = [s for s in GAN_SETS if not s.startswith(("loss.perceptual", "train."))]  # the GAN from step 3
    sets = [*gan, "train.max_steps=4", "train.ckpt_every=4", "train.sample_every=4"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "eager")
    compiled_modules = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_modules.append(m) or real_compile(m, **kw))
    # Inductor draws random numbers its own way (the prefix lengths, the KL noise): with eager's random
    # ops in the compiled graphs both runs draw alike, and their losses differ by kernel rounding alone.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    train_tokenizer(load(recipe_file, *sets, "train.compile=true"), tmp_path / "compiled")
    assert [type(m).__name__ for m in compiled_modules] == ["SMAP", "PatchDiscriminator"]
    monkeypatch.setattr(torch, "compile", real_compile)
    eager, compiled = metrics_by_step(tmp_path / "eager"), metrics_by_step(tmp_path / "compiled")
    assert sorted(s for s in compiled if "loss" in compiled[s]) == [1, 2, 3, 4]
    assert compiled[3]["gan_adaptive_weight"] > 0
    for key in ("keep", "loss", "g_loss", "d_loss"):
        steps = [s for s in sorted(eager) if key in eager[s]]
        assert steps and [s for s in sorted(compiled) if key in compiled[s]] == steps, key
        torch.testing.assert_close(
            torch.tensor([compiled[s][key] for s in steps]),
            torch.tensor([eager[s][key] for s in steps]),
            rtol=1e-3,
            atol=1e-4,
        )
    names = ckpt.weight_names(ckpt.latest_checkpoint(tmp_path / "compiled"))
    assert "discriminator" in names
    for name in names:
        keys = set(ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "compiled"), name))
        assert keys == set(ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "eager"), name)), name
    resumed = load(recipe_file, *gan, "train.max_steps=5", "train.ckpt_every=4", "train.sample_every=4")
    train_tokenizer(resumed, tmp_path / "compiled", resume=True)
    assert len(losses(tmp_path / "compiled")) == 5


def test_compiled_training_prints_no_graph_break_warning(tmp_path):
    """`train.compile: true` from the command line: the prefix length that sizes SMAP's decoder, read with
    `.item()` inside the compiled forward, made torch print a 13-line "Graph break from `Tensor.item()`,
    consider setting torch._dynamo.config.capture_scalar_outputs = True" warning into every compiled
    tokenizer run's log (a fresh process: torch says it once a process). The length is read outside the
    graph: the same graph break, unannounced."""
    sets = ["train.max_steps=2", "train.ckpt_every=2", "train.sample_every=100", "train.compile=true"]
    proc = start_cli("train-tokenizer", write_recipe(tmp_path), "--out", tmp_path / "run", *cli_args(*sets))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "Graph break" not in err and "capture_scalar_outputs" not in err, err


@pytest.mark.parametrize("output", ["reader ends", "disk full"])
def test_a_training_whose_output_stops_taking_lines_trains_on_to_its_checkpoint(
    tmp_path, monkeypatch, output
):
    """`smapctl train-tokenizer ... | head -1` or a `tee` killed with its terminal, and a log file on a full
    disk (or over the user's quota) while the run folder is elsewhere: Click turned the BrokenPipeError of
    the next progress line into a silent exit 1, the full disk's OSError was a traceback, and the training
    died there without a checkpoint. It trains on to its end, what it prints dropped, said once on stderr."""
    if output == "disk full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    sets = ["train.max_steps=20", "train.ckpt_every=20", "train.sample_every=100", "train.log_every=1"]
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "0")  # a line a step
    args = ["train-tokenizer", write_recipe(tmp_path), "--out", tmp_path / "run", *cli_args(*sets)]
    if output == "reader ends":
        proc = start_cli(*args)
        assert "run: step 1 of 20" in proc.stdout.readline()
        proc.stdout.close()  # the reader ends, as `head -1` does
        err, said = proc.stderr.read(), "(stdout) was closed by its reader"
    else:
        with open("/dev/full", "w") as full:  # every write: ENOSPC
            proc = start_cli(*args, stdout=full)
        err, said = (
            proc.communicate(timeout=300)[1],
            "(stdout) could not be written (No space left on device)",
        )
    assert proc.wait(timeout=300) == 0, err
    assert err.count(said) == 1 and "Traceback" not in err, err
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000000020"


def test_the_printed_resume_command_of_a_run_cut_short_before_its_gan_works(tmp_path, capsys, caplog):
    """A paper recipe run with --max-steps below its gan_start_step printed a resume command that was
    refused ("loss.gan_start_step: at or after train.max_steps, the GAN would never start"); and its EMA
    (0.9999) outlasting the run went unsaid, so every command's default weights looked untrained."""
    gan = ["loss.gan_weight=0.1", "loss.gan_start_step=1000", "loss.disc_width=8", "loss.disc_layers=2"]
    sets = [a for s in [*gan, "train.ema_decay=0.9999"] for a in ("--set", s)]
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(
            capsys, "train-tokenizer", write_recipe(tmp_path), "--out", run, "--max-steps", "2", *sets
        )
    assert code == 0, err
    assert "train.ema_decay 0.9999 averages over about 10000 steps, more than this run's 2" in caplog.text
    code, _, err = run_cli(capsys, "train-tokenizer", run / "recipe.yaml", "--out", run, "--resume")
    assert code == 0, err  # nothing left to train, but not refused
    # A resume with --max-steps gives no advice for a new run (it was given as the run started): below
    # the run's step it said "--set train.ema_decay=0" before "nothing to train".
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(
            capsys, "train-tokenizer", run / "recipe.yaml", "--out", run, "--resume", "--max-steps", "1"
        )
    assert code == 0 and "nothing to train: the run is at step 2 and train.max_steps is 1" in caplog.text
    assert "averages over about" not in caplog.text and "warmup_steps" not in caplog.text


def test_a_training_in_a_log_file_says_its_progress_in_lines(tmp_path, recipe_file):
    """Not on a terminal (a batch job's log), the progress bar's carriage-return updates piled up in the log
    (tens of MB over a long run). Now: a line per logged row, at most every $SMAPCTL_PROGRESS_EVERY seconds
    (0 here: every row), and the last step's."""
    sets = cli_args("train.max_steps=4", "train.log_every=2", "train.sample_every=100")
    cmd = train_command(recipe_file, tmp_path / "run")
    env = subprocess_env(SMAPCTL_PROGRESS_EVERY="0")
    r = subprocess.run([*cmd, *sets], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr
    said = re.findall(r"^run: step (\d) of 4 \((\S+)%\), loss \S+, \S+ images/s$", r.stdout, re.M)
    assert said == [("2", "50.0"), ("4", "100.0")], r.stdout
    assert "step/s" not in r.stderr and "\r" not in r.stderr  # no bar


def test_a_training_in_a_log_file_says_its_last_step_however_seldom_it_speaks(
    tmp_path, recipe_file, monkeypatch, capsys
):
    """The lines come at most once an interval, and the last step's whatever the interval: a batch job's
    log ends with where the run ended. Only an interval of 0 (every row a line) was run above, so a last
    line said only when its interval was up passed."""
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "3600")
    sets = ("train.max_steps=4", "train.log_every=2", "train.sample_every=100")
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    said = re.findall(r"^run: step (\d) of 4 \((\S+)%\)", capsys.readouterr().out, re.M)
    assert said == [("4", "100.0")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")
def test_a_run_that_fails_in_its_loop_closes_its_metrics_file(tmp_path, recipe_file, monkeypatch, capsys):
    # A notebook or the API trains in a process that lives on, and its traceback keeps the run alive:
    # the file stayed open after the error (kept alive here by this list).
    _patch_pixel_loss(monkeypatch, bad_calls=range(2, 100))
    runs, init = [], runner.TrainingRun.__init__
    monkeypatch.setattr(
        runner.TrainingRun, "__init__", lambda self, *a, **k: (runs.append(self), init(self, *a, **k))[1]
    )
    sets = cli_args("train.max_steps=20", "train.max_nonfinite_steps=2", "train.sample_every=100")
    code, _, _ = run_cli(capsys, "train-tokenizer", recipe_file, "--out", tmp_path / "run", *sets)
    assert code == 1 and (tmp_path / "run" / "metrics.jsonl").is_file() and len(runs) == 1
    open_files = {os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()}
    assert str(tmp_path / "run" / "metrics.jsonl") not in open_files


def test_every_metrics_row_counts_the_images_its_steps_trained_on(tmp_path, recipe_file):
    """images_per_s is the window's images over its seconds: a row after steps that trained on images
    holds a positive rate (0 when the images are not counted)."""
    sets = ["train.max_steps=2", "train.log_every=2", "train.sample_every=100"]
    train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert row["step"] == 2 and row["images_per_s"] > 0


def test_the_collapse_thresholds_are_2_percent_of_what_a_batch_can_use_and_their_bounds(recipe_file, caplog):
    """Few codes: perplexity under COLLAPSE_FRACTION (2%) of min(codebook, batch x K) (a batch of 16 x 8
    tokens can use 128 of 4096 codes: warned under 2.56); same tokens: only from batches of 4 images, and
    only under a per-position perplexity of 1.05 (at it: not)."""
    sets = (*regularizer_sets("vq"), "model.num_latent_tokens=8", "model.regularizer.codebook_size=4096")
    recipe = load(recipe_file, *sets)

    def said(perplexity, batch, per_position=2.0, rows=1) -> list[str]:
        watch = tok_train.CollapseWatch(recipe)
        terms = {
            "perplexity": torch.tensor(perplexity, dtype=torch.float64),
            "usage": torch.tensor(0.01),
            "position_perplexity": torch.tensor(per_position, dtype=torch.float64),
        }
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="smapctl.train"):
            for i in range(rows):
                watch.check(terms, batch, 10 * i + 9)
        return [r.getMessage() for r in caplog.records]

    [few] = said(2.5, 16)
    assert "perplexity 2.5 of a possible 128 (usage 1.0%)" in few
    assert not said(2.6, 16)  # above 2% of 128 (of the codebook's 4096 it would be under)
    assert not said(0.02 * 128, 16)  # at the threshold: not under it
    assert "of a possible 32" in said(0.6, 4)[0]  # 4 x 8 tokens: 32 possible
    stretch = dict(perplexity=100.0, rows=7)
    assert len(said(batch=4, per_position=1.0, **stretch)) == 1  # 4 images: enough to tell
    assert not said(batch=3, per_position=1.0, **stretch)
    assert not said(batch=8, per_position=1.05, **stretch)  # at 1.05: not under it
    assert len(said(batch=8, per_position=1.049, **stretch)) == 1


def test_the_collapse_warning_measures_the_micro_batch_its_perplexity_is_of(
    tmp_path, recipe_file, monkeypatch, caplog
):
    """With accumulation the perplexity is measured per micro-batch (4 images of the batch of 8 here), so
    what it could reach is min(4096 codes, 4 x 16 tokens) = 64, not the global batch's 128."""
    _collapse_the_codebook(monkeypatch)
    sets = [*regularizer_sets("vq"), "model.regularizer.codebook_size=4096", "model.num_latent_tokens=16"]
    sets += ["train.max_steps=1", "train.sample_every=100", "train.grad_accum_steps=2"]
    with caplog.at_level(logging.WARNING, logger="smapctl.train"):
        train_tokenizer(load(recipe_file, *sets), tmp_path / "run")
    assert "step 1: codebook collapse? its batch's perplexity 1.0 of a possible 64 (usage" in caplog.text


def test_the_discriminator_gets_its_own_lr_and_its_own_scheduled_optimizer(recipe_file):
    """loss.disc_lr is the discriminator's rate (not train.lr), and its scheduler steps its optimizer
    with the same warm-up and cosine shape."""
    from smapctl.train.schedule import lr_at

    gan = ["loss.gan_weight=0.1", "loss.disc_width=8", "loss.disc_layers=2", "loss.disc_lr=5e-4"]
    recipe = load(recipe_file, *gan, "train.lr=2e-4", "train.warmup_steps=4", "train.max_steps=10")
    parts = tok_train.build_parts(recipe)
    assert parts.disc_scheduler.optimizer is parts.disc_optimizer
    assert parts.scheduler.optimizer is parts.optimizer
    for step in range(6):
        assert [g["lr"] for g in parts.disc_optimizer.param_groups] == pytest.approx(
            [5e-4 * lr_at(step, recipe.train) / 2e-4] * len(parts.disc_optimizer.param_groups)
        )
        assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, recipe.train))
        parts.optimizer.step()  # (no gradients: nothing moves) before the schedulers, as in training
        parts.disc_optimizer.step()
        tok_train._step_schedulers(parts)
