"""`smapctl sample`: the files it promises, the same images for the same seed (in and across processes),
one-line errors for unknown classes and for a generator whose tokenizer was moved or replaced."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import (
    fill_disk,
    free_disk,
    record_fsyncs,
    signal_after,
    sigterm_caught,
    snapshot,
    temp_files,
    without_blocking_on,
)
from PIL import Image
from tiny_tokenizer import (
    DEMO_GENERATOR_TINY,
    DEMO_TOKENIZER_TINY,
    before_torchrun,
    error_lines,
    run_cli,
    subprocess_env,
    torchrun,
    two_nodes,
)
from tiny_tokenizer import smapctl as run_smapctl

from smapctl.errors import UserError
from smapctl.ops.sample import parse_classes, sample_images
from smapctl.recipe import load_generator_recipe, load_tokenizer_recipe
from smapctl.train import checkpoint as ckpt
from smapctl.train import generator as gen_train
from smapctl.train.generator import generate, load_generator, train_generator
from smapctl.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [str(d) for d in range(10)]
MASKGIT = (
    "model={kind: maskgit, vocab_size: 64, num_tokens: 8, num_classes: 10, class_dim: 32, width: 32, "
    "depth: 1, num_heads: 2}"
)


def smapctl(*args):
    # This process's thread count: the CLI must compute bit for bit what an in-process call does.
    return run_smapctl(*args, env=subprocess_env())


def tiny_tokenizer(run_dir: Path, *overrides: str) -> Path:
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, *overrides])
    return train_tokenizer(recipe, run_dir)


def tiny_generator(tokenizer: Path, run_dir: Path, *overrides: str) -> Path:
    sets = [f"latents.tokenizer={tokenizer}", *DEMO_GENERATOR_TINY, "train.max_steps=10", *overrides]
    return train_generator(load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets), run_dir)


@pytest.fixture(scope="module")
def card_gen(tmp_path_factory):
    """A tiny CARD trained through the command line; returns its run folder."""
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    sets = [arg for s in [f"latents.tokenizer={tok}", *DEMO_GENERATOR_TINY] for arg in ("--set", s)]
    r = smapctl("train-generator", "recipes/demo/generator.yaml", *sets, "--max-steps", 10, "--out", run_dir)
    assert r.returncode == 0, r.stderr
    assert "checkpoint:" in r.stdout
    return run_dir


@pytest.fixture(scope="module")
def vq_tok(tmp_path_factory):
    return tiny_tokenizer(
        tmp_path_factory.mktemp("vq"), "model.regularizer={kind: vq, codebook_size: 64, token_dim: 8}"
    )


@pytest.fixture(scope="module")
def maskgit_gen(vq_tok, tmp_path_factory):
    return tiny_generator(vq_tok, tmp_path_factory.mktemp("maskgit"), MASKGIT)


@pytest.fixture(scope="module")
def llamagen_gen(vq_tok, tmp_path_factory):
    # sample.steps back at its default: a llamagen recipe refuses a setting it does not use.
    llamagen = MASKGIT.replace("maskgit", "llamagen")
    return tiny_generator(vq_tok, tmp_path_factory.mktemp("llamagen"), llamagen, "sample.steps=25")


def test_cli_writes_the_files_it_promises(card_gen, tmp_path):
    out = tmp_path / "out"
    r = smapctl(
        *("sample", "--checkpoint", card_gen, "-o", out, "--classes", "0,3,7", "--per-class", 2),
        *("--cfg", 2.0, "--steps", 3, "--temperature", 0.9, "--seed", 5, "--batch-size", 4, "--npz"),
    )
    assert r.returncode == 0, r.stderr
    # One line with the whole grid path (not a terminal: rich wrapped it at 80 columns).
    assert f"6 images in {out}; grid: {out / 'grid.png'}\n" in r.stdout
    names = [f"{c:04d}_{c}_{i:05d}.png" for c in (0, 3, 7) for i in range(2)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "grid.png", "samples.npz", "sampling.json"]
    )
    # What drew them, for `evaluate --samples` to record beside its scores.
    drew = json.loads((out / "sampling.json").read_text())
    assert drew["generator"] == str(ckpt.latest_checkpoint(card_gen).resolve())
    assert (drew["seed"], drew["batch_size"], drew["device"]) == (5, 4, "cpu") and drew["finished"] is True
    assert drew["threads"] == torch.get_num_threads()  # (the CLI's: `smapctl` passes it on)
    assert drew["classes"] == [0, 3, 7] and drew["per_class"] == 2
    assert drew["class_names"] == [str(c) for c in range(10)]  # by label: `evaluate` names an .npz's labels
    assert drew["settings"]["cfg_scale"] == 2.0 and drew["settings"]["steps"] == 3
    assert drew["settings"]["temperature"] == 0.9 and "top_k" not in drew["settings"]  # CARD's settings only
    with np.load(out / "samples.npz") as f:
        assert f.files == ["arr_0", "arr_1"]
        arr = f["arr_0"]
        assert f["arr_1"].tolist() == [0, 0, 3, 3, 7, 7]  # the classes, as guided-diffusion stores them
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16, 3)
    for image, name in zip(arr, names, strict=True):  # the PNGs are the npz's images, in order
        assert np.array_equal(np.asarray(Image.open(out / name).convert("RGB")), image)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 18 + 2, 3 * 18 + 2)  # a row per class, 2 px padding
    # The same images in this process: the seed alone decides them.
    again = sample_images(
        card_gen,
        tmp_path / "again",
        **dict(classes="0,3,7", per_class=2, cfg_scale=2.0, steps=3, temperature=0.9, seed=5, batch_size=4),
    )
    assert np.array_equal(again.images.permute(0, 2, 3, 1).numpy(), arr)
    assert again.npz is None and again.labels.tolist() == [0, 0, 3, 3, 7, 7]


def npz_of(result) -> np.ndarray:
    with np.load(result.npz) as f:
        return f["arr_0"]


@pytest.mark.parametrize("name", ["q[/red]", "q[bold]x", "a\nb"])
def test_the_result_line_prints_the_path_as_it_is(name, card_gen, tmp_path, capsys):
    """A folder named `q[/red]` stopped a finished sampling with rich's MarkupError traceback; `q[bold]x`
    was printed as `qx`; a line break split the result line in two (errors write it as \\n)."""
    out = tmp_path / name
    code, stdout, stderr = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        card_gen,
        "-o",
        out,
        "--classes",
        "0",
        "--per-class",
        1,
        "--steps",
        2,
    )
    assert code == 0, stderr
    shown = str(out).replace("\n", "\\n")
    assert stdout == f"1 image in {shown}; grid: {shown}/grid.png\n"
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("family", ["card", "maskgit"])
def test_same_seed_same_images_other_seed_other_images(family, request, tmp_path):
    gen = request.getfixturevalue(f"{family}_gen")
    args = dict(classes="1,2", per_class=3, batch_size=4, npz=True)
    a = npz_of(sample_images(gen, tmp_path / "a", seed=0, **args))
    b = npz_of(sample_images(gen, tmp_path / "b", seed=0, **args))
    c = npz_of(sample_images(gen, tmp_path / "c", seed=1, **args))
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_of_a_generator_trained_without_class_dropout_is_refused(card_gen, tmp_path, capsys):
    """Without class dropout the null class keeps its initial vector: guidance steered away from it
    without a word (the demo recipe's own cfg_scale 3 too)."""
    shutil.copytree(card_gen, tmp_path / "gen")
    meta_file = ckpt.latest_checkpoint(tmp_path / "gen") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["recipe"]["model"]["class_dropout"] = 0.0
    meta_file.write_text(json.dumps(meta))
    args = ("sample", "--checkpoint", tmp_path / "gen", "--classes", "1", "--per-class", 1)
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "a", "--cfg", 2)
    assert code == 1 and error_lines(err) == [
        "error: --cfg: guidance 2 steers away from the null class, which model.class_dropout 0 never trains"
        " (appendix A drops the class 10% of the time: 0.1) in this generator; sample with --cfg 1"
    ]
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "b")  # the recipe's guidance
    assert code == 1 and "error: the recipe's sample.cfg_scale: guidance 3 steers" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "c", "--cfg", 1)
    assert code == 0, err


def test_grid_shows_at_most_16_classes_by_8(card_gen, tmp_path):
    result = sample_images(card_gen, tmp_path, classes="all", per_class=9, steps=1, batch_size=90)
    assert len(result.files) == 90 and result.files[-1].name == "0009_9_00008.png"
    assert all(f.is_file() for f in result.files)
    with Image.open(result.grid) as grid:
        assert grid.size == (8 * 18 + 2, 10 * 18 + 2)


def test_the_grid_has_a_row_per_class_and_a_column_per_image():
    """Image j of class i (in file order, class by class) sits in row i, column j of grid.png."""
    from smapctl.ops.sample import _grid

    classes, per_class, size = 3, 2, 4
    images = torch.zeros(classes * per_class, 3, size, size, dtype=torch.uint8)
    for i in range(classes):
        for j in range(per_class):
            images[i * per_class + j] = 20 * i + j + 1  # what the cell must show
    grid = _grid(images, classes, per_class)
    cell = size + 2  # make_grid's padding of 2
    assert grid.shape[1:] == (classes * cell + 2, per_class * cell + 2)
    for i in range(classes):
        for j in range(per_class):
            assert int(grid[0, 2 + i * cell, 2 + j * cell]) == 20 * i + j + 1, (i, j)


def test_the_grid_keeps_the_first_images_of_the_first_classes():
    """Past GRID_CLASSES classes or GRID_PER_CLASS images of a class, the grid shows the first ones of each,
    still a row per class (a 50,000-image run would make a multi-gigabyte grid.png)."""
    from smapctl.ops.sample import GRID_CLASSES, GRID_PER_CLASS, _grid

    classes, per_class, size = GRID_CLASSES + 2, GRID_PER_CLASS + 3, 1
    ids = torch.arange(classes * per_class, dtype=torch.int32)  # image n = class n // per_class
    images = torch.stack([(ids // per_class) * 10 + ids % per_class] * 3, 1)[..., None, None]  # (N, 3, 1, 1)
    grid = _grid(images.to(torch.uint8), classes, per_class)
    cell = size + 2
    assert grid.shape[1:] == (GRID_CLASSES * cell + 2, GRID_PER_CLASS * cell + 2)
    for i in range(GRID_CLASSES):
        for j in range(GRID_PER_CLASS):
            assert int(grid[0, 2 + i * cell, 2 + j * cell]) == (i * 10 + j) % 256, (i, j)


def test_fewer_than_one_image_per_class_is_refused(card_gen, tmp_path):
    with pytest.raises(UserError, match=r"^--per-class: must be at least 1$"):
        sample_images(card_gen, tmp_path / "out", classes="0", per_class=0)
    assert not (tmp_path / "out").exists()


def test_classes_by_name_id_or_all():
    assert parse_classes("all", DIGITS) == list(range(10))
    assert parse_classes("7, 3,0,3", DIGITS) == [7, 3, 0]
    assert parse_classes("cat,2", ["cat", "dog", "fox"]) == [0, 2]
    # A folder's class may be named `a,b`: the whole spec is that class; in a list, by its id.
    odd = ["-x", "7", "a,b", "all", "cat dog"]
    assert parse_classes("a,b", odd) == [2] and parse_classes(" cat dog ", odd) == [4]
    assert parse_classes("2,4", odd) == [2, 4] and parse_classes("all", odd) == [0, 1, 2, 3, 4]
    with pytest.raises(
        UserError, match=r"unknown class 'a'; .* \(a name with a comma is given alone, or by its id: 2\)$"
    ):
        parse_classes("a,b,-x", odd)
    with pytest.raises(UserError, match="^--classes: unknown class 'x'"):
        parse_classes("x", DIGITS)
    for bad in ("1,,2", "3,", ",", " , 2"):
        with pytest.raises(UserError, match=f"^--classes '{bad}': an empty name between commas"):
            parse_classes(bad, DIGITS)
    with pytest.raises(
        UserError, match="^--classes: class id 10 is out of range: .* 10 classes, ids 0 to 9$"
    ):
        parse_classes("10", DIGITS)
    with pytest.raises(UserError, match="^--classes: class id -1 is out of range: .* ids 0 to 9$"):
        parse_classes("2,-1", DIGITS)  # it said "unknown class '-1'", the Python API "out of range"


def test_unknown_class_is_a_one_line_error(card_gen, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", card_gen, "-o", tmp_path / "out", "--classes", "3,11"
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --classes: class id 11 is out of range")
    assert not (tmp_path / "out").exists()


def test_an_unknown_class_lists_the_generators_classes_short_and_printable():
    """`sample --classes` of a class the generator does not have lists its classes; those of a checkpoint
    from elsewhere (a line break, an escape sequence, 100,000 characters) listed as they are, sent to the
    terminal whole, no test failed."""
    with pytest.raises(UserError) as e:
        parse_classes("ten", ["zero", "one\n\x1b[2J", "two" * 33_000])
    assert "classes are: zero, one??[2J, twotwo" in str(e.value) and len(str(e.value)) < 300


def test_disk_full_is_one_line_and_keeps_the_earlier_files(card_gen, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", card_gen, "-o", out, "--classes", "1,2", "--per-class", 2, "--npz"]
    assert run_cli(capsys, *args)[0] == 0
    first = snapshot(out)

    args.append("--overwrite")
    fill_disk(monkeypatch, only="samples.npz")  # the disk fills up at the .npz
    code, _, err = run_cli(capsys, *args, "--seed", 1)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert errors == [
        f"error: {out / 'samples.npz'}: could not write the .npz file (No space left on device): the disk "
        "is full; free some space or write elsewhere; this run's images and grid.png are written"
    ]
    second = snapshot(out)
    # The earlier samples.npz went with the first new image: it would have held other images than the PNGs.
    assert out / "samples.npz" in first and out / "samples.npz" not in second
    assert second[out / "0001_1_00000.png"] != first[out / "0001_1_00000.png"]  # finished before: kept

    fill_disk(monkeypatch)  # now full from the first byte
    code, _, err = run_cli(capsys, *args, "--seed", 2)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"error: {out / '0001_1_00000.png'}: could not write the image (No space")
    assert snapshot(out) == second and temp_files(out) == []

    # Full as the first sampling.json is written: the earlier run's went before (it said "any earlier
    # sampling.json is unchanged").
    free_disk(monkeypatch)
    fill_disk(monkeypatch, only="sampling.json")
    code, _, err = run_cli(capsys, *args, "--seed", 3)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        code == 1 and len(errors) == 1 and errors[0].endswith("; the earlier run's sampling.json is removed")
    )


def test_a_moved_tokenizer_is_found_or_named_and_a_replaced_one_refused(tmp_path, capsys, monkeypatch):
    """Runs copied together (to another machine, say) sample as before; a tokenizer moved alone is named
    with --tokenizer (a run folder means the checkpoint the generator was trained on); a tokenizer with
    other weights is refused, in its old place or given."""
    from smapctl.api import Generator, Tokenizer

    tok = tiny_tokenizer(tmp_path / "proj" / "tok")
    gen = tiny_generator(tok, tmp_path / "proj" / "gen", "train.max_steps=2")
    longer = load_tokenizer_recipe(
        ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, "train.max_steps=5"]
    )
    assert train_tokenizer(longer, tmp_path / "proj" / "tok", resume=True) != tok  # a newer checkpoint
    other = tiny_tokenizer(tmp_path / "other", "train.seed=1")
    before = sample_images(gen, tmp_path / "before", per_class=1, classes="0,1")

    shutil.move(tmp_path / "proj", tmp_path / "copied")  # both runs together
    copied_gen = tmp_path / "copied" / "gen"
    after = sample_images(copied_gen, tmp_path / "after", per_class=1, classes="0,1")
    for a, b in zip(before.files, after.files, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    drew = json.loads((tmp_path / "after" / "sampling.json").read_text())
    assert drew["tokenizer"] == str((tmp_path / "copied" / "tok" / ckpt.CHECKPOINTS / tok.name).resolve())

    shutil.move(tmp_path / "copied" / "tok", tmp_path / "tok-alone")  # the tokenizer alone
    with pytest.raises(
        UserError, match=re.escape(f"its tokenizer {Path(tok).resolve()} no longer exists")
    ) as e:
        sample_images(copied_gen, tmp_path / "out", per_class=1)
    assert "\n" not in str(e.value) and "name its new place with --tokenizer" in str(e.value)
    args = ("sample", "--checkpoint", copied_gen, "--classes", "0,1", "--per-class", 1)
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "given", "--tokenizer", tmp_path / "tok-alone")
    assert code == 0, err  # the run folder: its checkpoint of the generator's, not its newest
    for a, b in zip(before.files, sorted((tmp_path / "given").glob("0*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes()
    moved_tok = Tokenizer.load(tmp_path / "tok-alone" / ckpt.CHECKPOINTS / tok.name)
    assert Generator.load(copied_gen, tokenizer=moved_tok).tokenizer.path == moved_tok.path
    # A loaded Tokenizer is used as it is: it was loaded again from its path, which a relative one
    # (the working folder changed since) no longer named; one with its other weights is refused.
    monkeypatch.chdir(tmp_path)
    relative = Tokenizer.load(Path("tok-alone") / ckpt.CHECKPOINTS / tok.name)
    monkeypatch.chdir(tmp_path / "given")
    gen = Generator.load(copied_gen, tokenizer=relative)
    assert gen.tokenizer.model is relative.model
    # The same device however it is named (`cuda` against the weights' `cuda:0` reloaded it from disk).
    assert Generator.load(copied_gen, tokenizer=relative, device="cpu:0").tokenizer.model is relative.model
    assert torch.equal(
        gen.sample([0, 1], per_class=1).images,
        Generator.load(copied_gen, tokenizer=moved_tok).sample([0, 1], per_class=1).images,
    )
    with pytest.raises(
        UserError, match=r"\(its ema weights\): not the tokenizer .* or loaded with its other weights"
    ):
        Generator.load(copied_gen, tokenizer=Tokenizer.load(moved_tok.path, weights="model"))
    with pytest.raises(UserError, match="name its new place with tokenizer="):
        Generator.load(copied_gen)
    raw = moved_tok.path / "model.safetensors"  # the generator was trained on the EMA weights beside it
    with pytest.raises(UserError) as e:
        Generator.load(copied_gen, tokenizer=raw)
    assert str(e.value).startswith(f"tokenizer= {raw} cannot be loaded: {raw}: names the model weights")
    assert str(e.value).endswith("the generator was trained on its ema weights: name the checkpoint folder")

    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "o2", "--tokenizer", other)
    [line] = error_lines(err)
    assert code == 1 and line.startswith(f"error: --tokenizer {other} has fingerprint")
    assert line.endswith(
        f"not the tokenizer {ckpt.latest_checkpoint(copied_gen)} was trained on (or one retrained since)"
    )

    shutil.copytree(other, tok)  # another tokenizer's checkpoint where the generator's was at first
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "o3")
    [line] = error_lines(err)
    assert code == 1 and "has fingerprint" in line and "replaced or retrained" in line
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_an_out_folder_that_cannot_be_written_is_said_before_drawing(card_gen, tmp_path, monkeypatch, capsys):
    """`sample -o OUT` into a folder without write permission (or on a read-only mount): said at once, in
    one line, before any image is drawn (os.access simulated: tests run as root too)."""
    import smapctl.train.generator as generator

    out = tmp_path / "out"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == out else real(p, m, *a, **k))
    monkeypatch.setattr(generator, "generate", lambda *a, **k: pytest.fail("drawn first"))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", card_gen, "-o", out, "--classes", "1")
    assert code == 1 and error_lines(err) == [
        f"error: {out}: could not write the output folder (Permission denied): write somewhere you may"
    ], err
    assert not any(out.iterdir())


def test_an_earlier_run_in_the_folder_is_refused_or_replaced(card_gen, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    sample_images(card_gen, out, classes="0,1", per_class=2, steps=1, npz=True)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    earlier = r"holds an earlier sampling run \(4 images, grid.png, samples.npz, sampling.json\), whose"
    with pytest.raises(UserError, match=earlier + ".*--overwrite"):
        sample_images(card_gen, out, classes="2", per_class=1, steps=1)
    assert snapshot(out) == before  # nothing touched
    sample_images(card_gen, out, classes="0,2", per_class=1, steps=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "0000_0_00000.png",
        "0002_2_00000.png",
        "grid.png",
        "notes.txt",
        "sampling.json",
    ]  # 0000_0_00000.png rewritten; the other old images and samples.npz are gone
    assert json.loads((out / "sampling.json").read_text())["classes"] == [0, 2]  # this run's
    sample_images(card_gen, out, classes="2", per_class=1, steps=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "0002_2_00000.png",
        "grid.png",
        "notes.txt",
        "sampling.json",
    ]
    # An --overwrite run that stops before it has finished has removed none of the earlier run's images it
    # did not rewrite: those go only once it has finished.
    from faults import interrupt_sampling

    with monkeypatch.context() as m:
        interrupt_sampling(m, at=2)
        with pytest.raises(KeyboardInterrupt):
            sample_images(card_gen, out, classes="0,1", per_class=2, batch_size=2, steps=1, overwrite=True)
    assert (out / "0000_0_00000.png").exists() and (out / "0002_2_00000.png").exists()
    sample_images(card_gen, out, classes="2", per_class=1, steps=1, overwrite=True)
    capsys.readouterr()
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", card_gen, "-o", out, "--classes", "3", "--steps", 1
    )
    assert code == 1 and "--overwrite" in err and "Traceback" not in err
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", card_gen, "-o", out, "--classes", "3", "--steps", 1, "--overwrite"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir())[0] == "0003_3_00000.png"


def test_a_second_sampling_into_a_folder_being_written_is_refused(card_gen, tmp_path, capsys):
    """Two `sample`s into one folder started together each found it free of earlier images, and left a
    mix of both runs' images (738 of one seed, 763 of the other), both exiting 0: the second is refused
    in one line, before it looks into the folder, and writes nothing."""
    from smapctl.io import writing_into

    out = tmp_path / "out"
    with writing_into(out):  # as the first run holds it, before its first image
        code, _, err = run_cli(capsys, "sample", "--checkpoint", card_gen, "-o", out, "--classes", "1")
        assert code == 1 and error_lines(err) == [
            f"error: {out}: another smapctl command (a sample, decode or evaluate) is writing into it; wait"
            " for it to end, or choose another -o"
        ], err
        assert list(out.iterdir()) == []
    result = sample_images(card_gen, out, classes="1", per_class=1, steps=1)  # once it has ended
    assert [p.name for p in result.files] == ["0001_1_00000.png"]


def test_a_dataset_folder_is_refused_and_a_bad_checkpoint_is_named_first(card_gen, tmp_path, capsys):
    """Images `sample` did not write (a class folder of a dataset, a photo next to the samples) refuse
    the folder, even with --overwrite, before anything is drawn; a wrong --checkpoint is reported
    before the folder's earlier samples."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "cat" / "x.png")
    before = snapshot(data)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"did not write .*x\.png.*dataset folder.*another --out"):
            sample_images(card_gen, data, classes="1", per_class=1, steps=1, overwrite=overwrite)
    assert snapshot(data) == before
    out = tmp_path / "out"
    sample_images(card_gen, out, classes="1", per_class=1, steps=1)
    sample_images(card_gen, out, classes="1", per_class=1, steps=1, overwrite=True)  # its own files: fine
    Image.new("RGB", (8, 8)).save(out / "photo.jpg")
    with pytest.raises(UserError, match=r"photo\.jpg"):
        sample_images(card_gen, out, classes="1", per_class=1, steps=1, overwrite=True)
    # A dataset made of links to class folders elsewhere is one too.
    (tmp_path / "subset").mkdir()
    (tmp_path / "subset" / "cat").symlink_to(data / "cat")
    with pytest.raises(UserError, match=r"subset/cat/x\.png"):
        sample_images(card_gen, tmp_path / "subset", classes="1", per_class=1, steps=1)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "sample", "--checkpoint", tmp_path / "nope", "-o", out, "--classes", "1")
    assert code == 1 and "nope" in err and "earlier" not in err and "did not" not in err


def _recipes_changed(monkeypatch, change) -> None:
    """`sample_images` here samples with its generator's and tokenizer's recipes as `change(recipe,
    tokenizer_recipe)` leaves them (copies of the checkpoints' own)."""
    import copy
    import dataclasses

    from smapctl.ops import sample

    real = sample._load_plan

    def changed(*args, **kwargs):
        plan = real(*args, **kwargs)
        tok = copy.copy(plan.tok)
        recipe, tok.recipe = copy.deepcopy(plan.recipe), copy.deepcopy(plan.tok.recipe)
        change(recipe, tok.recipe)
        return dataclasses.replace(plan, recipe=recipe, tok=tok)

    monkeypatch.setattr(sample, "_load_plan", changed)


def test_an_output_inside_the_images_the_generator_learned_from_is_refused(card_gen, tmp_path, monkeypatch):
    """`-o data/train/samples`, a new folder inside the generator's training images, passed the check of
    a folder holding other images and made the samples a class of the dataset; now refused before any is
    drawn (the generator's recipe here named as if trained on that folder)."""
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "cat" / "x.png")
    _recipes_changed(monkeypatch, lambda recipe, tok: setattr(recipe.latents, "dataset", str(data)))
    with pytest.raises(UserError) as e:
        sample_images(card_gen, data / "samples", classes="1", per_class=1, steps=1)
    assert str(e.value) == (
        f"--out {data / 'samples'}: inside latents.dataset {data}, whose images the generator learned from,"
        " and the samples would join them: choose another --out"
    )
    assert sorted(p.name for p in data.iterdir()) == ["cat"]
    assert [p.name for p in sample_images(card_gen, tmp_path / "out", classes="1", per_class=1).files] == [
        "0001_1_00000.png"
    ]


def test_top_k_and_top_p_reach_the_llamagen_sampler(llamagen_gen, tmp_path, capsys):
    """--top-k 1 (or a tiny --top-p) keeps only the likeliest token: greedy decoding, the same images
    whatever the seed; the recipe's defaults (off) sample."""
    args = dict(classes="1,2", per_class=2, batch_size=4, npz=True)
    free = [
        npz_of(sample_images(llamagen_gen, tmp_path / f"free{seed}", seed=seed, **args)) for seed in (0, 1)
    ]
    assert not np.array_equal(*free)
    for option in ({"top_k": 1}, {"top_p": 1e-6}):
        name = next(iter(option))
        greedy = [
            npz_of(sample_images(llamagen_gen, tmp_path / f"{name}{seed}", seed=seed, **args, **option))
            for seed in (0, 1)
        ]
        assert np.array_equal(*greedy), option
    cli = ("--classes", "1,2", "--per-class", 2, "--batch-size", 4, "--npz", "--seed", 3)
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", llamagen_gen, "-o", tmp_path / "cli", "--top-k", 1, *cli
    )
    assert code == 0, err
    with np.load(tmp_path / "cli" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], greedy[0])


@pytest.mark.parametrize(
    ("family", "option", "value"), [("card", "method", "heun"), ("maskgit", "choice_temperature", 0.0)]
)
def test_method_and_choice_temperature_reach_their_samplers(family, option, value, request, tmp_path, capsys):
    gen = request.getfixturevalue(f"{family}_gen")
    loaded = load_generator(gen, "cpu")
    model, recipe = loaded.model, loaded.recipe
    labels = torch.tensor([1, 1, 2, 2])
    tokens = [
        generate(model, recipe, labels, torch.Generator().manual_seed(0), steps=3, **chosen)
        for chosen in ({}, {option: value})
    ]
    assert not torch.equal(*tokens)  # (a 10-step CARD's velocity hardly bends: the images may not differ)
    args = dict(classes="1,2", per_class=2, batch_size=4, npz=True, steps=3)
    chosen = npz_of(sample_images(gen, tmp_path / "chosen", **args, **{option: value}))
    cli = ("--classes", "1,2", "--per-class", 2, "--batch-size", 4, "--npz", "--steps", 3)
    code, _, err = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        gen,
        "-o",
        tmp_path / "cli",
        f"--{option.replace('_', '-')}",
        value,
        *cli,
    )
    assert code == 0, err
    with np.load(tmp_path / "cli" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], chosen)


@pytest.mark.parametrize(
    ("family", "option", "own"),
    [
        ("llamagen", ("--steps", 3), "--top-k, --top-p"),
        ("card", ("--top-k", 5), "--steps, --method"),
        ("maskgit", ("--top-p", 0.5), "--steps, --choice-temperature"),
    ],
)
def test_an_option_the_generator_does_not_use_is_refused(family, option, own, request, tmp_path, capsys):
    """A LlamaGen generator used to ignore --steps without a word."""
    gen = request.getfixturevalue(f"{family}_gen")
    capsys.readouterr()  # what making the fixture printed
    code, _, err = run_cli(capsys, "sample", "--checkpoint", gen, "-o", tmp_path / "out", *option)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (
        f"error: {option[0]}: a {family} generator does not use it; its own sampling options are {own} "
        "(and --cfg, --cfg-schedule, --temperature)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--cfg", -5),
        ("--temperature", 0),
        ("--temperature", -1),
        ("--top-p", 0),
        ("--top-p", 1.5),
        ("--top-k", -1),
        ("--method", "rk4"),
        ("--choice-temperature", -1),
        ("--cfg", "nan"),
        ("--cfg", "inf"),
        ("--temperature", "nan"),
        ("--choice-temperature", "inf"),
        ("--top-p", "nan"),
        ("--seed", 10**13),  # overflowed torch's seed with a traceback
    ],
)
def test_impossible_sampling_values_are_refused(option, value, tmp_path, capsys):
    # In this process: a usage error comes before any model is read.
    code, _, err = run_cli(capsys, "sample", "-o", tmp_path / "out", option, value)
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value"), [("--cfg", "nan"), ("--cfg", -5), ("--seed", 10**13)])
def test_evaluate_refuses_impossible_sampling_values(option, value, tmp_path, capsys):
    """`evaluate --generator --cfg nan` scored all-black samples without a word."""
    args = ("evaluate", "--generator", tmp_path / "none", "-o", tmp_path / "out", option, value)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_generator_weights_file_named_is_refused(card_gen, tmp_path, capsys):
    """`sample --checkpoint .../model.safetensors` drew with the EMA weights beside it without a word."""
    model_file = next(Path(card_gen).rglob("model.safetensors"))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", model_file, "-o", tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert error_lines(err) == [
        f"error: {model_file}: names the model weights, but this loads the ema weights; the commands sample "
        "with the EMA weights: name the checkpoint folder"
    ]
    ema_file = model_file.with_name("ema.safetensors")  # the weights sampled: taken as their folder
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", ema_file, "-o", tmp_path / "out", "--per-class", 1
    )
    assert code == 0, err


def test_the_seed_range_is_checked_in_words(tmp_path, capsys):
    """`--seed`'s range was the option's `max`: `--help` showed `[0<=x<=4294967295]` beside it, which
    squeezed every help text of `sample` and `evaluate` into a narrow column. The range is checked
    after parsing: 2^32 - 1 is a seed (the missing generator is the error), 2^32 is not."""
    for command in (("sample", "--checkpoint"), ("evaluate", "--generator")):
        code, out, _ = run_cli(capsys, command[0], "--help")
        assert code == 0 and "4294967295" not in out and "2^32 - 1" in " ".join(out.split())
        args = (*command, tmp_path / "none", "-o", tmp_path / "out", "--seed")
        code, _, err = run_cli(capsys, *args, 2**32)
        assert code == 2 and "must be from 0 to 4294967295" in " ".join(err.split())
        code, _, err = run_cli(capsys, *args, 2**32 - 1)
        assert code == 1 and "--seed" not in err and "none" in err, err
    assert not (tmp_path / "out").exists()


def test_a_launcher_accelerate_did_not_join_is_refused(tmp_path, monkeypatch):
    """Under mpirun on a GPU host accelerate (without LOCAL_RANK) set up one process per launched one:
    each drew every image into the same folder, and wrote grid.png and samples.npz."""
    import types

    import smapctl.launch

    state = types.SimpleNamespace(device="cpu", process_index=0, num_processes=1)
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="the launcher started 2 processes but accelerate set up 1"):
        sample_images(tmp_path / "no-checkpoint-needed", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mixed_precision_of_accelerate_launch_is_said_to_be_unused(tmp_path, monkeypatch, caplog):
    """`accelerate launch --mixed_precision bf16 -m smapctl sample` drew in fp32 without a word."""
    import types

    import smapctl.launch
    from smapctl.ops.sample import _processes

    state = types.SimpleNamespace(device="cpu", process_index=0, num_processes=1, is_main_process=True)
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="smapctl"):
        assert _processes(None) == ("cpu", 0, 1, state)
    assert "accelerate's mixed precision bf16 is not used: sample draws and decodes in fp32" in caplog.text
    caplog.clear()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: not said
    with caplog.at_level("WARNING", logger="smapctl"):
        _processes(None)
    assert "mixed precision" not in caplog.text


@pytest.mark.slow
def test_two_processes_share_the_batches_and_draw_the_images_of_one(card_gen, tmp_path):
    """Under a launcher each process used to draw every image into the same folder, and the second to
    look found the first's files and refused them as an earlier run (2 launches in 3 failed)."""
    args = ("--checkpoint", card_gen, "--classes", "0,3,7", "--per-class", 3, "--batch-size", 2, "--npz")
    r = torchrun("sample", "-o", tmp_path / "two", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("9 images in") == 1  # reported once, by the main process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the same numbers
    try:
        alone = sample_images(
            card_gen, tmp_path / "one", classes="0,3,7", per_class=3, batch_size=2, npz=True
        )
    finally:
        torch.set_num_threads(threads)
    two = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert two == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in (n for n in two if n.endswith(".png")):
        pixels = [np.asarray(Image.open(tmp_path / run / name)) for run in ("one", "two")]
        assert np.array_equal(*pixels), name
    with np.load(tmp_path / "two" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], alone.images.permute(0, 2, 3, 1).numpy())
        assert f["arr_1"].tolist() == alone.labels.tolist()


@pytest.mark.slow
def test_a_write_only_another_process_fails_is_reported_by_it(card_gen, tmp_path):
    """The second process draws batch 1 (images 2 and 3 of class 0); a folder in the place of image 2
    stopped it with its error unprinted (the main process only said that another process stopped)."""
    blocked = tmp_path / "out" / "0000_0_00002.png"
    blocked.mkdir(parents=True)
    args = ("--checkpoint", card_gen, "--classes", "0,3", "--per-class", 3, "--batch-size", 2)
    r = torchrun("sample", "-o", tmp_path / "out", *args)
    assert r.returncode != 0
    assert f"error: {blocked}: could not write the image (Is a directory)" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_commands_that_do_not_split_their_work_refuse_a_launcher(card_gen, tmp_path):
    r = torchrun("evaluate", "--samples", tmp_path / "none", "--data", "digits:val", "-o", tmp_path / "ev")
    assert r.returncode != 0 and not (tmp_path / "ev").exists()
    assert (
        "error: smapctl evaluate --samples runs as one process, but the launcher started 2: run it without "
        "accelerate launch / torchrun"
    ) in r.stderr
    assert "Traceback (most recent call last)" not in r.stderr.split("error: smapctl evaluate")[0]


# `smapctl` as a launched process that first writes its process id to DIR/pid{RANK}.
PID_LAUNCHER = """\
import os
import sys
from pathlib import Path

(Path(sys.argv.pop(1)) / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


@pytest.mark.slow
def test_a_signal_to_one_launched_process_stops_every_one_with_its_status(card_gen, tmp_path):
    """The process that received SIGINT ended at once (130) and torchrun's SIGTERM then ended the other
    (143); a training stops every process after the same step, each with 130. So does sampling now,
    after the same batches, the main process saying how far they got."""
    import signal
    import time

    launcher = tmp_path / "launcher.py"
    launcher.write_text(PID_LAUNCHER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), str(tmp_path), "sample", "--checkpoint", str(card_gen), "-o", str(out)]
    cmd += ["--per-class", "40", "--batch-size", "2"]  # 200 batches: minutes, unless stopped
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while len(list(out.glob("*.png"))) < 4 and time.time() < deadline and launch.poll() is None:
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGINT)
        _, err = launch.communicate(timeout=120)
    finally:
        launch.kill()
    # torchrun's summary of the processes' exit statuses
    assert sorted(re.findall(r"^\s*exitcode\s*: (-?\d+)", err, re.MULTILINE)) == ["130", "130"], err[-3000:]
    written = len(list(out.glob("0*.png")))
    assert err.count("interrupted: ") == 1 and f"interrupted: {written} of 400 images written" in err, err[
        -3000:
    ]
    assert written % 4 == 0  # each process stopped after the same round of batches (2 images each)


# `smapctl` as a launched process in which the process of rank argv[1] receives SIGINT as it draws its
# argv[2]-th batch (after `draw` returns, inside the round: the signal lands at a known round, no race).
ROUND_SIGNAL_LAUNCHER = """\
import os
import signal
import sys

from smapctl.ops import sample

rank, at = (int(a) for a in sys.argv[1:3])
del sys.argv[1:3]
real, calls = sample.draw, []


def draw(*args, **kwargs):
    batch = real(*args, **kwargs)
    calls.append(1)
    if int(os.environ["RANK"]) == rank and len(calls) == at:
        os.kill(os.getpid(), signal.SIGINT)
    return batch


sample.draw = draw
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(("at", "code"), [(1, 130), (2, 0)], ids=["earlier-round", "last-round"])
def test_a_signal_in_the_last_round_under_a_launcher_lets_the_run_finish(card_gen, tmp_path, at, code):
    """8 images in batches of 2: rounds (0, 1) and (2, 3), the second process drawing batches 1 and 3.
    SIGINT as it draws its first batch stops both processes after that round (130 each); as it draws its
    last one every image is being written already, and a stop there threw the complete run away, grid
    and all, saying to run it again: the run finishes (0 each)."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(ROUND_SIGNAL_LAUNCHER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(launcher), "1", str(at), "sample", "--checkpoint", str(card_gen), "-o", str(out)]
    cmd += ["--classes", "0,3", "--per-class", "4", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # torchrun's summary of the processes' exit statuses (printed when one of them failed)
    statuses = re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)
    images = list(out.glob("0*.png"))
    if code:
        assert sorted(statuses) == [str(code)] * 2, r.stderr[-3000:]
        assert r.stderr.count("interrupted: 4 of 8 images written") == 1, r.stderr[-3000:]
        assert len(images) == 4 and not (out / "grid.png").exists()
    else:
        assert r.returncode == 0 and not statuses, r.stderr[-3000:]
        assert r.stdout.count(f"8 images in {out}; grid: {out / 'grid.png'}") == 1, r.stdout
        assert "interrupted" not in r.stderr and len(images) == 8 and (out / "grid.png").is_file()
        assert json.loads((out / "sampling.json").read_text())["finished"] is True
        said = f"SIGINT during the last round: the 8 images and grid.png are written to {out}; the sampling"
        assert r.stderr.count(said) == 1, r.stderr[-3000:]  # (the main process's, not the other's)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_every_image_is_drawn_lets_the_run_finish(
    card_gen, tmp_path, monkeypatch, capsys, caplog, signum
):
    """In one process a signal as samples.npz was written exited 130 without a word, every image and
    grid.png written, samples.npz not. Once every image is drawn a signal lets the run finish: exit 0,
    one line saying so. A second one stops at once, saying what is there: grid.png, not samples.npz."""
    from smapctl.eval import npz as npz_module

    name, real, caught = signal.Signals(signum).name, npz_module.write_npz, []

    def signalled(*args, signums=(), **kwargs):
        for s in signums:
            os.kill(os.getpid(), s)
        return real(*args, **kwargs)

    args = [
        "sample",
        "--checkpoint",
        card_gen,
        "--classes",
        "0,3",
        "--per-class",
        2,
        "--batch-size",
        2,
        "--npz",
    ]
    previous = signal.signal(signal.SIGTERM, lambda *_: caught.append(1))  # (else pytest is ended)
    try:
        with caplog.at_level(logging.WARNING):
            monkeypatch.setattr(npz_module, "write_npz", partial(signalled, signums=[signum]))
            code, stdout, err = run_cli(capsys, *args, "-o", tmp_path / "a")
            assert (code, caught) == (0, []), err
            said = f"{name} once every image was drawn: the 4 images, grid.png and samples.npz are written to"
            assert f"{said} {tmp_path / 'a'}; the sampling is complete" in caplog.text
            assert "interrupted" not in caplog.text and "4 images in" in stdout
            assert sorted(p.name for p in (tmp_path / "a").iterdir())[-3:] == [
                "grid.png", "samples.npz", "sampling.json"
            ]  # fmt: skip
            caplog.clear()
            monkeypatch.setattr(npz_module, "write_npz", partial(signalled, signums=[signum, signal.SIGINT]))
            code, stdout, err = run_cli(capsys, *args, "-o", tmp_path / "b")
        assert (code, caught) == (130, []), err
        said = f"interrupted: 4 of 4 images written to {tmp_path / 'b'}, with grid.png, without samples.npz"
        assert said in caplog.text and "complete" not in caplog.text
        assert (tmp_path / "b" / "grid.png").is_file() and not (tmp_path / "b" / "samples.npz").exists()
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_command_ends_leaves_the_sampling_complete(
    card_gen, tmp_path, monkeypatch, capsys, caplog, signum
):
    """A signal as `sample` printed its last line (every file written, the folder let go) exited 130
    (143) without a word, the sampling complete. Up to the command's end it ends as complete: exit 0,
    one line saying so, the signals' handlers put back after. A signal before every image is drawn still
    stops it (held from the first batch on as well, it would run to its end)."""
    from smapctl import cli
    from smapctl.ops import sample

    name, out = signal.Signals(signum).name, tmp_path / "a"
    args = ["sample", "--checkpoint", card_gen, "--classes", "0,3", "--per-class", 2, "--batch-size", 2]
    with sigterm_caught() as caught, caplog.at_level(logging.WARNING):
        signal_after(monkeypatch, cli.console, "print", signums := [signum])
        code, stdout, err = run_cli(capsys, *args, "-o", out)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (code, signums, caught) == (0, [], []), err
    said = f"{name} as the command ended: the 4 images and grid.png are written to {out}; the sampling is"
    assert said + " complete" in caplog.text and caplog.text.count(name) == 1 and "4 images in" in stdout
    assert json.loads((out / "sampling.json").read_text())["finished"] and (out / "grid.png").is_file()
    with sigterm_caught() as caught, monkeypatch.context() as m:
        signal_after(m, sample, "draw", signums := [signum])  # (its first batch, before its PNGs)
        code, _, err = run_cli(capsys, *args, "-o", tmp_path / "b")
    assert (code, signums, caught) == (128 + signum, [], []), err
    assert f"interrupted before its first image: nothing written to {tmp_path / 'b'}" in caplog.text


def test_a_signal_in_a_launchs_last_round_leaves_no_exit_status_behind(
    card_gen, tmp_path, monkeypatch, caplog
):
    """The last round of a launch, which a signal lets finish, left `GracefulStop.last_signal` set: a
    training run later in the same process (`smapctl.cli.main` called again) exited 130. It is put back,
    and the main process says the sampling is complete."""
    import types

    import smapctl.launch
    from smapctl.ops import sample
    from smapctl.train.signals import GracefulStop

    state = types.SimpleNamespace(
        device="cpu", process_index=0, num_processes=2, wait_for_everyone=lambda: None
    )
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    monkeypatch.setattr(sample, "_read_other_processes_images", lambda *a, **k: None)  # (none drawn here)
    real, calls = sample.draw, []

    def draw(*args, **kwargs):  # batches 0 and 2 here, in rounds (0, 1) and (2, 3): SIGINT in the last
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "draw", draw)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = sample_images(card_gen, out, classes="0,1,2,3", per_class=2, batch_size=2)
    assert result.main and len(calls) == 2 and GracefulStop.last_signal is None
    said = f"SIGINT during the last round: the 8 images and grid.png are written to {out}; the sampling is"
    assert said in caplog.text and "interrupted" not in caplog.text


def test_an_output_inside_the_tokenizers_validation_images_says_what_they_are(
    card_gen, tmp_path, monkeypatch
):
    """The refusal of an output folder inside the tokenizer's data.val_dataset said that the generator
    learned from those images: it learned from neither the tokenizer's validation images nor, when its
    recipe names latents.dataset, the tokenizer's training images."""
    val = tmp_path / "val"
    _recipes_changed(monkeypatch, lambda recipe, tok: setattr(tok.data, "val_dataset", str(val)))
    with pytest.raises(UserError) as e:
        sample_images(card_gen, val / "samples", classes="1", per_class=1, steps=1)
    assert str(e.value) == (
        f"--out {val / 'samples'}: inside the tokenizer's data.val_dataset {val}, whose images the tokenizer"
        " was validated on, and the samples would join them: choose another --out"
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_sampling_stops_it_after_its_first_batch(
    card_gen, tmp_path, monkeypatch, capsys, caplog
):
    """A SIGTERM Python lost as the command started ("Exception ignored in ...") let `sample` draw to its
    end, to be killed by the scheduler's SIGKILL that follows; now it stops after its first batch, as one
    that came then would: exit 143, saying what is written."""
    from faults import sigterm_lost_as_the_command_starts

    out = tmp_path / "out"
    sigterm_lost_as_the_command_starts(monkeypatch)
    args = ["sample", "--checkpoint", card_gen, "--classes", "0,3", "--per-class", 2, "--batch-size", 2]
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, *args, "-o", out)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert f"interrupted: 2 of 4 images written to {out}, without grid.png" in caplog.text
    assert len(list(out.glob("*.png"))) == 2


def test_a_sigterm_python_lost_before_a_launchs_sampling_stops_every_process_after_a_round(
    card_gen, tmp_path, monkeypatch
):
    """Under a launcher the lost SIGTERM is this process's flag in the first round's sum: every process
    stops after that round with its status."""
    import types

    import smapctl.launch
    from smapctl.launch import StoppedTogether
    from smapctl.ops import sample
    from smapctl.train.signals import GracefulStop

    state = types.SimpleNamespace(
        device="cpu", process_index=0, num_processes=2, wait_for_everyone=lambda: None
    )
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    monkeypatch.setattr(sample, "_read_other_processes_images", lambda *a, **k: None)  # (none drawn here)
    monkeypatch.setattr(GracefulStop, "unheard", signal.SIGTERM)
    drawn = []
    monkeypatch.setattr(sample, "draw", lambda *a, real=sample.draw, **k: drawn.append(1) or real(*a, **k))
    with pytest.raises(StoppedTogether) as stopped:
        sample_images(card_gen, tmp_path / "out", classes="0,1,2,3", per_class=2, batch_size=2)
    assert stopped.value.signum == signal.SIGTERM and drawn == [1] and GracefulStop.unheard is None


def test_each_launched_process_draws_only_its_share_of_the_batches(card_gen, tmp_path, monkeypatch):
    """A launched process that drew every batch itself (all of them written by each, the same files)
    ended as one that had drawn its share, the images and files the same: the launch was as slow as one
    process. Each draws the batches of its turn in every round (here the main process of 2: the 1st and
    3rd of 4), and writes only their images."""
    import types

    import smapctl.launch
    from smapctl.ops import sample

    state = types.SimpleNamespace(
        device="cpu", process_index=0, num_processes=2, wait_for_everyone=lambda: None
    )
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    monkeypatch.setattr(sample, "_read_other_processes_images", lambda *a, **k: None)  # (none drawn here)
    drawn = []

    def draw(plan, y, *args, real=sample.draw, **kwargs):
        drawn.append(y.tolist())
        return real(plan, y, *args, **kwargs)

    monkeypatch.setattr(sample, "draw", draw)
    out = tmp_path / "out"
    result = sample_images(card_gen, out, classes="0,1,2,3", per_class=2, batch_size=2)
    assert drawn == [[0, 0], [2, 2]]
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png") == sorted(
        result.files[i].name for i in (0, 1, 4, 5)
    )


def test_an_interrupted_run_says_how_far_it_got(card_gen, tmp_path, monkeypatch, caplog):
    """Ctrl-C used to leave a folder of PNGs without grid.png and without a word."""
    from faults import interrupt_sampling

    calls = interrupt_sampling(monkeypatch, at=3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sample_images(card_gen, out, classes="0,1,2", per_class=2, batch_size=2, npz=True)
    assert f"interrupted: 4 of 6 images written to {out}, without grid.png or samples.npz" in caplog.text
    assert len(list(out.glob("*.png"))) == 4 and not (out / "grid.png").exists()
    # What drew them is written with the first image, so `evaluate --samples` still knows the generator.
    drew = json.loads((out / "sampling.json").read_text())
    assert drew["finished"] is False and drew["classes"] == [0, 1, 2] and drew["per_class"] == 2
    # Counted on disk (the main process reports for all processes of a launcher), so an --overwrite run
    # does not count the earlier run's files of the same names.
    sample_images(card_gen, out, classes="0,1,2", per_class=2, batch_size=2, overwrite=True)
    calls.clear()
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        sample_images(card_gen, out, classes="0,1,2", per_class=2, batch_size=2, overwrite=True, seed=3)
    # The earlier run's grid.png went with the first new image, and its two other images are counted;
    # its sampling.json was replaced by this run's.
    assert (
        f"interrupted: 4 of 6 images written to {out}, without grid.png (and 2 images of the earlier run); "
        "run again with --overwrite" in caplog.text
    )
    assert not (out / "grid.png").exists()
    drew = json.loads((out / "sampling.json").read_text())
    assert (drew["seed"], drew["finished"]) == (3, False)
    # Stopped before its first image, a run has changed nothing, and says so.
    sample_images(card_gen, out, classes="0,1,2", per_class=2, batch_size=2, overwrite=True)
    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    calls[:] = [1, 1]  # the next call is the third
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        sample_images(card_gen, out, classes="0,1,2", per_class=2, batch_size=2, overwrite=True, seed=5)
    assert f"interrupted before its first image: {out} holds the earlier run as it was" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished
    assert json.loads(finished["sampling.json"])["finished"] is True
    # The same in a new folder: nothing written, and nothing to --overwrite the next time.
    calls[:] = [1, 1]
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        sample_images(card_gen, tmp_path / "new", classes="0,1,2", per_class=2, batch_size=2)
    assert f"interrupted before its first image: nothing written to {tmp_path / 'new'}" in caplog.text
    assert "--overwrite" not in caplog.text


def test_under_a_launcher_the_earlier_runs_grid_goes_before_any_image_is_drawn(
    card_gen, tmp_path, monkeypatch, caplog
):
    """Another process may write the first new image: the earlier grid.png stayed beside new images when
    the main process was stopped before writing one of its own."""
    import types

    import smapctl.launch
    import smapctl.train.generator as generator

    out = tmp_path / "out"
    sample_images(card_gen, out, classes="0,1", per_class=2, batch_size=2)
    described = []  # whether a sampling.json is there as the processes meet
    state = types.SimpleNamespace(
        device="cpu",
        process_index=0,
        num_processes=2,
        wait_for_everyone=lambda: described.append((out / "sampling.json").exists()),
    )
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_images(card_gen, out, classes="0,1", per_class=2, batch_size=2, overwrite=True)
    assert not (out / "grid.png").exists()
    assert f"interrupted: 0 of 4 images written to {out}, without grid.png (and 4 images of" in caplog.text
    # The earlier run's description went before any process drew; this run's comes with the main
    # process's first image: before the processes met, another took it for an earlier run's ("holds 1
    # files of an earlier sampling run"); right after, an interrupt before any image left it describing
    # the earlier run's images.
    assert described == [False] and not (out / "sampling.json").exists()


def test_a_failed_npz_leaves_only_this_runs_images(card_gen, tmp_path, monkeypatch, capsys):
    """The .npz is written after the earlier run's other images are gone: its failure message says this
    run's images and grid.png are written, and the folder held the earlier run's class 2 beside them."""
    out = tmp_path / "out"
    sample_images(card_gen, out, classes="1,2", per_class=1, npz=True)
    fill_disk(monkeypatch, only="samples.npz")
    args = ["sample", "--checkpoint", card_gen, "-o", out, "--classes", "1", "--per-class", 1, "--npz"]
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 1 and "this run's images and grid.png are written" in err
    assert sorted(p.name for p in out.iterdir()) == ["0001_1_00000.png", "grid.png", "sampling.json"]


@pytest.mark.parametrize("rank", [0, 1])
def test_an_interrupted_launch_reports_once_for_all_processes(rank, card_gen, tmp_path, monkeypatch, caplog):
    """Under a launcher each process used to report its own count ("108 of 600", "120 of 600")."""
    import shutil
    import types

    import smapctl.launch
    import smapctl.train.generator as generator

    state = types.SimpleNamespace(
        device="cpu", process_index=rank, num_processes=2, wait_for_everyone=lambda: None
    )
    monkeypatch.setattr(smapctl.launch, "process_state", lambda: state)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    real, calls, out = generator.generate, [], tmp_path / "out"

    def ctrl_c_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # meanwhile the other process has drawn its first batch: two PNGs more
            for png in sorted(out.glob("*.png")):
                shutil.copy(png, out / png.name.replace(f"{rank:04d}_{rank}_", f"{1 - rank:04d}_{1 - rank}_"))
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generator, "generate", ctrl_c_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):  # digits: class c is named "c"; one class per batch of 2
        sample_images(card_gen, out, classes="0,1,2,3", per_class=2, batch_size=2)
    assert len(list(out.glob("*.png"))) == 4
    if rank:
        assert "interrupted" not in caplog.text
    else:
        assert f"interrupted: 4 of 8 images written to {out}" in caplog.text


def test_more_maskgit_steps_than_tokens_are_refused(maskgit_gen, tmp_path, capsys):
    """It fixes at least one token per step: `--steps 1000` on 8 tokens ran 8 steps, annealed its
    temperature over 1000 (near full noise throughout) and recorded 1000."""
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", maskgit_gen, "-o", tmp_path / "a", "--classes", "1", "--steps", 9
    )
    assert code == 1 and error_lines(err) == [
        "error: --steps 9: a MaskGIT decodes at least one of its 8 tokens per step: use at most 8"
    ]
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", maskgit_gen, "-o", tmp_path / "b", "--classes", "1", "--steps", 8
    )
    assert code == 0, err
    # The recipe's own sample.steps too many: `evaluate --generator` (no --steps) is told where one is.
    gen = ckpt.resolve_checkpoint(maskgit_gen)
    copy = tmp_path / "run" / "checkpoints" / gen.name
    shutil.copytree(gen, copy)
    meta = json.loads((copy / ckpt.META).read_text())
    meta["recipe"]["sample"]["steps"] = 25
    (copy / ckpt.META).write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "evaluate", "--generator", copy, "--num", 2, "-o", tmp_path / "ev")
    assert code == 1 and error_lines(err) == [
        "error: the recipe's sample.steps 25: a MaskGIT decodes at least one of its 8 tokens per step: use at"
        " most 8 (`smapctl sample --steps`; `smapctl evaluate --samples` scores its folder)"
    ], err
    assert "reference classifier" not in err  # refused first: it was said after minutes of its training
    # The Python API names its keyword, not the command's option.
    import smapctl

    with pytest.raises(UserError) as e:
        smapctl.Generator.load(copy).sample(classes=1, per_class=1)
    assert str(e.value).endswith("use at most 8 (pass steps=)")


@pytest.mark.parametrize("edit", ["missing", "extra", "reshaped", "half"])
def test_hand_edited_weights_are_one_line_naming_the_file(card_gen, tmp_path, edit):
    """Weights with a tensor missing, extra, of another shape or dtype raised load_state_dict's
    RuntimeError (or failed at the first layer, for fp16) as a traceback, in every command that loads."""
    from safetensors.torch import load_file, save_file

    from smapctl.ops.load import load_tokenizer

    gen = ckpt.resolve_checkpoint(card_gen)
    tok = Path(ckpt.load_meta(gen)["tokenizer"]["path"])
    for source, load in ((tok, load_tokenizer), (gen, lambda p: load_generator(p))):
        copy = tmp_path / source.parent.parent.name / "checkpoints" / source.name
        shutil.copytree(source, copy)
        weights = copy / "ema.safetensors"
        state = load_file(weights)
        first = next(k for k, t in state.items() if t.is_floating_point() and t.ndim == 2)
        if edit == "missing":
            del state[first]
        elif edit == "extra":
            state["foo.bar"] = torch.zeros(2)
        elif edit == "reshaped":
            state[first] = torch.zeros(state[first].shape[0] + 1, state[first].shape[1])
        else:
            state = {k: t.half() if t.is_floating_point() else t for k, t in state.items()}
        save_file(state, weights)
        with pytest.raises(UserError) as e:
            load(copy)
        assert str(weights) in str(e.value) and "\n" not in str(e.value), e.value
        assert ("float16" in str(e.value)) == (edit == "half")


def test_a_meta_json_without_its_recipe_is_one_line(card_gen, tmp_path):
    gen = ckpt.resolve_checkpoint(card_gen)
    copy = tmp_path / "run" / "checkpoints" / gen.name
    shutil.copytree(gen, copy)
    meta = json.loads((copy / ckpt.META).read_text())
    for recipe in (None, [1]):
        meta["recipe"] = recipe
        (copy / ckpt.META).write_text(json.dumps(meta))
        with pytest.raises(UserError, match=r"meta\.json: holds no recipe \(a broken or hand-edited"):
            load_generator(copy)


def test_a_generator_checkpoint_recipe_no_recipe_takes_is_one_line_naming_its_meta_json(card_gen, tmp_path):
    """A generator's meta.json holding a recipe value of the wrong kind is one line naming that file, as a
    tokenizer's is; built as if the command's own recipe were wrong (`model: expected a section ...`), no
    test failed."""
    gen = ckpt.resolve_checkpoint(card_gen)
    copy = tmp_path / "run" / "checkpoints" / gen.name
    shutil.copytree(gen, copy)
    meta = json.loads((copy / ckpt.META).read_text())
    meta["recipe"]["model"] = 5
    (copy / ckpt.META).write_text(json.dumps(meta))
    said = (
        rf"^{re.escape(str(copy / ckpt.META))}: its recipe's model: .* \(a broken or hand-edited meta\.json\)"
    )
    with pytest.raises(UserError, match=said):
        load_generator(copy)


@pytest.mark.parametrize("family", ["card", "maskgit", "llamagen"])
def test_guidance_that_overflows_is_one_line_not_black_images(family, request, tmp_path, capsys):
    """`--cfg 1e308` is finite, but the guided values overflow: CARD wrote black images without a word,
    the discrete samplers stopped with torch's multinomial traceback."""
    gen = request.getfixturevalue(f"{family}_gen")
    capsys.readouterr()
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "sample", "--checkpoint", gen, "--per-class", 1, "--cfg", "1e308", "-o", out
    )
    assert code == 1, err
    [line] = error_lines(err)
    assert f"error: {gen}" in line and "sampling gave values that are not finite" in line
    assert "--cfg 1e+308 may be too large (the guided values overflow), or the generator's weights" in line
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize(("family", "temperature"), [("card", "1e308"), ("maskgit", "1e-320")])
def test_a_temperature_that_overflows_is_named_not_the_guidance(
    family, temperature, request, tmp_path, capsys
):
    """`--cfg 1 --temperature 1e308` (CARD's noise) or `1e-320` (the logits a MaskGIT divides by it) gave
    values that are not finite, and the line said "--cfg 1 may be too large", of a sampling without
    guidance."""
    gen = request.getfixturevalue(f"{family}_gen")
    capsys.readouterr()
    args = ("--per-class", 1, "--cfg", 1, "--temperature", temperature, "-o", tmp_path / "out")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", gen, *args)
    assert code == 1, err
    [line] = error_lines(err)
    said = f"--temperature {float(temperature):g} may be too far from 1 (the values it scales overflow)"
    assert line.endswith(f"{said}, or the generator's weights are not finite"), line
    assert "cfg" not in line and not (tmp_path / "out").exists()


def test_a_decoder_that_gives_nan_is_one_line_not_black_images(card_gen, tmp_path, capsys, monkeypatch):
    """A tokenizer whose weights are not finite decoded to nan, written as black images without a word."""
    from smapctl.train import generator

    real = generator.decode_samples
    monkeypatch.setattr(generator, "decode_samples", lambda *a: real(*a) * float("nan"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", card_gen, "--per-class", 1, "-o", out)
    assert code == 1, err
    [line] = error_lines(err)
    assert "its decoder gave values that are not finite (are its weights?)" in line
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize("family", ["maskgit", "llamagen"])
def test_discrete_generator_weights_that_are_not_finite_are_one_line(family, request, tmp_path, capsys):
    """A LlamaGen or MaskGIT whose weights hold nan (edited, or a training that diverged) drew from nan
    token probabilities: torch.multinomial's RuntimeError. One line naming the generator and its
    weights (no guidance or temperature to blame at 1), and no image written."""
    from safetensors.torch import load_file, save_file

    source = ckpt.resolve_checkpoint(request.getfixturevalue(f"{family}_gen"))
    gen = tmp_path / "run" / "checkpoints" / source.name
    shutil.copytree(source, gen)
    state = load_file(gen / "ema.safetensors")
    save_file(
        {k: t * float("nan") if t.is_floating_point() else t for k, t in state.items()},
        gen / "ema.safetensors",
    )
    out = tmp_path / "out"
    args = ("--per-class", 1, "--cfg", 1, "--temperature", 1, "-o", out)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", gen, *args)
    assert code == 1, err
    assert error_lines(err) == [
        f"error: {gen}: sampling gave values that are not finite (its token probabilities): the generator's"
        " weights are not finite"
    ], err
    assert not any(out.rglob("*.png"))


def test_another_runtime_error_while_sampling_is_not_taken_for_values_not_finite(maskgit_gen, monkeypatch):
    """Only torch.multinomial's complaint of nan or inf probabilities is said as values that are not
    finite; another RuntimeError (out of memory, say) is raised as it is, not blamed on the weights."""
    loaded = load_generator(maskgit_gen)
    model, recipe = loaded.model, loaded.recipe

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(model, "sample", out_of_memory)
    with pytest.raises(RuntimeError, match="^DefaultCPUAllocator: not enough memory$") as e:
        generate(model, recipe, torch.zeros(1, dtype=torch.long))
    assert not isinstance(e.value, UserError)


def test_a_missing_or_damaged_weights_file_of_the_tokenizer_is_one_line(card_gen, tmp_path, capsys):
    """The generator's tokenizer without the weights file it was trained on was said to be "replaced or
    retrained" (the fingerprint, of the file's size, differed): one line naming the missing file, as one
    overwritten by bytes of the same size (the fingerprint the same) is named unreadable."""
    tok = Path(ckpt.load_meta(ckpt.latest_checkpoint(card_gen))["tokenizer"]["path"])
    copy = tmp_path / "tok" / "checkpoints" / tok.name
    shutil.copytree(tok, copy)
    weights = copy / "ema.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    out = tmp_path / "out"
    args = ("sample", "--checkpoint", card_gen, "--tokenizer", copy, "--per-class", 1, "-o", out)
    code, _, err = run_cli(capsys, *args)
    assert code == 1, err
    [line] = error_lines(err)
    assert line.startswith(
        f"error: --tokenizer {copy} cannot be loaded: {weights}: unreadable safetensors"
    ), line
    weights.unlink()
    code, _, err = run_cli(capsys, *args)
    said = f"cannot be loaded: {weights}: not found (this checkpoint has weights: model)"
    assert code == 1 and error_lines(err) == [f"error: --tokenizer {copy} {said}"], err
    assert not out.exists()


def test_an_output_inside_a_runs_checkpoints_is_refused(card_gen, tmp_path, capsys):
    """`sample -o RUN/checkpoints/step_N/samples` (or a token file, panel, decode or evaluation there) was
    written into a folder the run deletes with its older checkpoints (train.keep_checkpoints)."""
    step = ckpt.latest_checkpoint(card_gen)
    tok = Path(json.loads((step / "meta.json").read_text())["tokenizer"]["path"])
    image = tmp_path / "3" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (16, 16), "white").save(image)
    code, _, err = run_cli(capsys, "tokenize", image, "--checkpoint", tok, "-o", tmp_path / "c.pt")
    assert code == 0, err
    before = {p: p.stat().st_mtime_ns for p in (card_gen / "checkpoints").rglob("*")}
    for args, out in (
        (("sample", "--checkpoint", card_gen, "--per-class", 1), step / "samples"),
        (("sample", "--checkpoint", card_gen, "--per-class", 1), card_gen / "checkpoints"),
        (("evaluate", "--checkpoint", tok, "--limit", 4), tok / "eval"),
        (("tokenize", image, "--checkpoint", tok), tok / "codes.pt"),
        (("decode", tmp_path / "c.pt"), tok / ".." / tok.name / "png"),
        (("cross-recon", image, image, "--checkpoint", tok), tok / "panel.png"),
    ):
        code, _, err = run_cli(capsys, *args, "--out", out)
        assert code == 1, (args, err)
        [line] = error_lines(err)
        assert "a training run's checkpoints, which the run deletes as it goes" in line, line
    assert {p: p.stat().st_mtime_ns for p in (card_gen / "checkpoints").rglob("*")} == before
    # Beside them in the run folder (an evaluation's default place: RUN/eval) is fine.
    code, _, err = run_cli(capsys, "sample", "--checkpoint", card_gen, "--classes", "1", "--per-class", 1,
                           "--out", card_gen / "my-samples")  # fmt: skip
    assert code == 0, err
    shutil.rmtree(card_gen / "my-samples")


def test_more_images_than_memory_holds_are_refused_before_any_is_drawn(card_gen, tmp_path, capsys):
    """`--per-class 100000000` built its label list and image buffer first: 15 GB and climbing, silent."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", card_gen, "--per-class", 10**9, "-o", out)
    assert code == 1
    [line] = error_lines(err)
    assert "10,000,000,000 images of 16x16 pixels take 7152.6 GiB in memory, more than half of this" in line
    assert not out.exists()


def test_overwriting_takes_away_an_evaluation_of_the_earlier_images_in_the_folder(card_gen, tmp_path, capsys):
    """`evaluate --samples OUT --out OUT`, then `sample -o OUT --overwrite`: the scores of the earlier
    images stayed beside the new ones (grid.png and samples.npz went; metrics.json did not)."""
    out = tmp_path / "s"
    sample_images(card_gen, out, per_class=1, batch_size=10)
    (out / "metrics.json").write_text(json.dumps({"samples": str(out.resolve()), "metrics": {}}))
    sample_images(card_gen, out, per_class=1, batch_size=10, overwrite=True)
    assert not (out / "metrics.json").exists()
    # A metrics.json of other images (another folder's scores, kept here by hand) is not touched.
    (out / "metrics.json").write_text(json.dumps({"samples": str(tmp_path / "elsewhere")}))
    sample_images(card_gen, out, per_class=1, batch_size=10, overwrite=True)
    assert (out / "metrics.json").exists()


def test_a_named_pipe_named_metrics_json_is_not_read(tmp_path):
    """`sample --overwrite` reads the folder's metrics.json to tell whether it scores the images being
    replaced: a named pipe of that name blocked it forever, waiting for a writer."""
    from smapctl.ops import sample

    pipe = tmp_path / "metrics.json"
    os.mkfifo(pipe)
    found = without_blocking_on(pipe, lambda: sample._scores_of(tmp_path), "the named pipe was opened")
    assert found == []


def test_each_file_is_an_image_of_its_class(card_gen, tmp_path, monkeypatch):  # noqa: F811
    """A generator whose tokens carry the class asked for, and a decoder that paints the class it is given
    and the class the tokens carry: a file of class c must show (c, c)."""

    def generate(model, recipe, labels, generator=None, **overrides):
        return labels.float().view(-1, 1, 1).expand(-1, recipe.model.num_tokens, recipe.model.token_dim)

    def decode_samples(tok, tokens, labels, stats):
        size = tok.model.cfg.image_size
        image = torch.zeros(len(labels), 3, size, size)
        image[:, 0] = (labels.float() * 20 / 127.5 - 1).view(-1, 1, 1)  # the decoder's class
        image[:, 1] = (tokens[:, 0, 0] * 20 / 127.5 - 1).view(-1, 1, 1)  # the generator's class
        return image

    monkeypatch.setattr(gen_train, "generate", generate)
    monkeypatch.setattr(gen_train, "decode_samples", decode_samples)
    result = sample_images(card_gen, tmp_path, classes="3,1,7", per_class=2, batch_size=4)
    for f in result.files:
        c = int(f.name[:4])
        pixel = np.asarray(Image.open(f).convert("RGB"))[0, 0]
        assert (round(pixel[0] / 20), round(pixel[1] / 20)) == (c, c), f.name


def test_batches_of_the_same_classes_draw_different_images(card_gen, tmp_path):  # noqa: F811
    result = sample_images(card_gen, tmp_path, classes="4", per_class=4, batch_size=2, steps=2)
    a, b = result.images[:2], result.images[2:]  # batch 0 and batch 1, both [4, 4]
    assert not torch.equal(a, b)


def test_runs_of_consecutive_seeds_draw_no_batch_twice(card_gen, tmp_path):
    """Several runs of one class with `--seed 0`, `--seed 1`, ... (as the memory refusal advises) must not
    draw the same noise: batch 1 of seed 0 and batch 0 of seed 1 are different images."""
    args = dict(classes="4", per_class=4, batch_size=2, steps=1)
    first = sample_images(card_gen, tmp_path / "s0", seed=0, **args).images
    second = sample_images(card_gen, tmp_path / "s1", seed=1, **args).images
    assert not torch.equal(first[2:], second[:2])


def test_sampling_json_keeps_the_classes_in_the_order_given(card_gen, tmp_path):
    """The order of --classes decides which images share a batch (and so the images): sampling.json says
    it as given, as the files are named."""
    result = sample_images(card_gen, tmp_path, classes="7,2", per_class=1, steps=1)
    assert [f.name for f in result.files] == ["0007_7_00000.png", "0002_2_00000.png"]
    assert json.loads((tmp_path / "sampling.json").read_text())["classes"] == [7, 2]


def test_an_earlier_run_of_one_image_is_counted_as_one(card_gen, tmp_path):
    sample_images(card_gen, tmp_path, classes="1", per_class=1, steps=1)
    with pytest.raises(
        UserError, match=r"holds an earlier sampling run \(1 image, grid.png, sampling.json\)"
    ):
        sample_images(card_gen, tmp_path, classes="1", per_class=1, steps=1)


def test_sample_images_in_a_sub_folder_are_not_taken_for_this_folders(card_gen, tmp_path):
    """Only the folder's own files are a sampling run's: sample-named images in a sub-folder (an earlier
    run into OUT/old) would be scored by `evaluate --samples OUT` (it reads sub-folders) with the new ones."""
    old = tmp_path / "out" / "old"
    old.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(old / "0001_1_00000.png")
    with pytest.raises(UserError, match=r"holds images that `smapctl sample` did not write \(.*old/0001_1_"):
        sample_images(card_gen, tmp_path / "out", classes="1", per_class=1, steps=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["0001_1_00000.png", "old"]


def test_a_training_run_folder_as_out_is_refused_as_that(card_gen, tmp_path):
    """`-o RUN`: it was refused as "a dataset folder" for its preview grids (samples/step_*.png)."""
    before = sorted(card_gen.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(UserError) as e:
            sample_images(card_gen, card_gen, classes="1", per_class=1, steps=1, overwrite=overwrite)
        assert str(e.value) == (
            f"{card_gen}: a training run's folder; samples go to a folder of their own: choose another --out"
        )
    assert sorted(card_gen.rglob("*")) == before


def test_overwriting_takes_away_an_evaluation_of_the_folders_npz(card_gen, tmp_path):
    """`evaluate --samples OUT/samples.npz --out OUT` scored the earlier images as well as the folder."""
    out = tmp_path / "s"
    sample_images(card_gen, out, classes="1", per_class=1, steps=1, npz=True)
    (out / "metrics.json").write_text(json.dumps({"samples": str((out / "samples.npz").resolve())}))
    sample_images(card_gen, out, classes="1", per_class=1, steps=1, overwrite=True)
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_on_nodes_that_do_not_share_the_output_folder_every_process_stops_before_drawing(card_gen, tmp_path):
    """Two nodes (two `torchrun --nnodes 2 --node_rank N` on this machine, one process each), each with its
    own folder for the relative `-o out`: each drew and wrote its images, and the main process then
    stopped at the first of the other's it could not read, every image drawn for nothing. Now every
    process stops before drawing, in one line, and no image is written."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    args = ("--checkpoint", card_gen, "-o", "out", "--classes", "0,3", "--per-class", 4, "--batch-size", 2)
    outputs = two_nodes("sample", *args, cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: -o out: process 1 of the launch does not see the files the main process writes there"
    assert ours[0].count(said) == 1 and ours[1] == "", outputs
    assert not list(tmp_path.rglob("*.png"))
    # Nor is the folder the failed command made kept, on either node (node 1 kept an empty `out`).
    assert not (folders[0] / "out").exists() and not (folders[1] / "out").exists()


def test_nodes_whose_copies_of_the_generator_differ_stop_before_drawing(card_gen, tmp_path):
    """Two nodes, each with its own copy of the generator run (`--checkpoint gen`, relative), node 1's of
    another checkpoint: each drew its share of the images with its own copy, and the folder mixed two
    generators' samples without a word. Now both stop before drawing, in one line."""
    import shutil

    from tiny_tokenizer import another_copy

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    shutil.copytree(card_gen, folders[0] / "gen")
    another_copy(card_gen, folders[1]).rename(folders[1] / "gen")
    args = ("--checkpoint", "gen", "-o", tmp_path / "out", "--classes", "0,3", "--per-class", 4)
    outputs = two_nodes("sample", *args, "--batch-size", 2, cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = "error: process 1 of the launch loaded another generator than the main process's (gen/checkpoints/"
    assert ours[0].count(said) == 1 and ours[1] == "", outputs
    assert not (tmp_path / "out").exists()


def test_a_sampling_fsyncs_each_png_once_and_its_folder_only_for_its_own_files(
    card_gen, tmp_path, monkeypatch
):
    """Its folder was fsynced after every PNG (50,000 for the paper's evaluation), as long as the PNG's own
    fsync on a busy disk. The PNGs' renames are made durable by the folder fsync of sampling.json's last
    write, after every image: one for each of the run's own files (sampling.json twice, grid.png)."""
    synced = record_fsyncs(monkeypatch)  # (is a folder, inode) of each fsync
    out = tmp_path / "out"
    result = sample_images(card_gen, out, classes="0,1", per_class=4, batch_size=2)
    pngs = {p.stat().st_ino for p in result.files}
    assert len(pngs) == 8 and sorted(ino for d, ino in synced if not d and ino in pngs) == sorted(pngs)
    folder = out.stat().st_ino
    assert [d and ino == folder for d, ino in synced].count(True) == 3  # sampling.json x 2, grid.png
    last_png = max(i for i, (d, ino) in enumerate(synced) if not d and ino in pngs)
    assert any(d and ino == folder for d, ino in synced[last_png:])  # the PNGs made durable after the last
