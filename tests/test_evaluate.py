"""`smapctl evaluate`: reconstruction metrics per prefix with the semantic scores and the plot, generation
metrics of sample folders, ADM .npz files and a generator sampled on the spot, the offline Inception path
(plumbing, random weights) and its one-line error when the weights are missing."""

import errno
import hashlib
import json
import logging
import math
import os
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
    SignalsAsItsSecondWorkerStarts,
    add_broken_images,
    fill_disk,
    signal_after,
    sigterm_caught,
    snapshot,
    stopped_as_the_second_worker_starts,
    temp_files,
    without_blocking_on,
)
from PIL import Image
from tiny_tokenizer import error_lines, run_cli

from smapctl.data.config import DataConfig
from smapctl.data.datasets import build_eval_dataset
from smapctl.data.images import to_uint8
from smapctl.errors import UserError
from smapctl.eval import common, generation, image_sets, reconstruction, report, semantic
from smapctl.eval.evaluate import evaluate_images
from smapctl.eval.fidelity import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from smapctl.eval.image_sets import limit_indices, read_image_set
from smapctl.eval.metrics import psnr
from smapctl.eval.npz import read_npz, write_npz
from smapctl.eval.reconstruction import ImageStore, parse_prefixes
from smapctl.ops.load import load_tokenizer
from smapctl.recipe import load_generator_recipe, load_tokenizer_recipe
from smapctl.train.generator import train_generator
from smapctl.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = [
    *("model.image_size=16", "model.patch_size=4", "model.num_latent_tokens=8"),
    *("model.enc_width=32", "model.enc_depth=1", "model.enc_heads=2"),
    *("model.dec_width=32", "model.dec_depth=1", "model.dec_heads=2"),
    *("train.batch_size=8", "train.max_steps=3", "train.precision='no'", "train.warmup_steps=0"),
]
TINY_GENERATOR = [
    *("model.num_tokens=8", "model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
    *("model.head_depth=1", "model.head_width=32", "train.batch_size=16", "train.precision='no'"),
    *("train.warmup_steps=0", "train.max_steps=5", "train.sample_every=100", "train.ckpt_every=100"),
    "sample.steps=3",
]


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """The session's data cache (session fixtures run before conftest's per-test one sets it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMAPCTL_CACHE", str(tmp_path_factory.getbasetemp() / "smapctl-cache"))
        yield


@pytest.fixture(scope="session")
def tok_run(tmp_path_factory, cache_env) -> Path:
    """A 3-step SMAP-KL on 16 px digits, 8 tokens; its run folder."""
    run_dir = tmp_path_factory.mktemp("eval-tok")
    recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml", TINY_TOKENIZER)
    train_tokenizer(recipe, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def gen_run(tok_run, tmp_path_factory, cache_env) -> Path:
    """A 5-step tiny CARD on the tiny tokenizer (3 flow steps when sampling); its run folder."""
    run_dir = tmp_path_factory.mktemp("eval-gen")
    sets = [f"latents.tokenizer={tok_run}", *TINY_GENERATOR]
    train_generator(load_generator_recipe(ROOT / "recipes/demo/generator.yaml", sets), run_dir)
    return run_dir


@pytest.fixture
def quick_classifier(monkeypatch):
    """The reference classifier at 16 px and 40 steps: the real one (32 px, 500 steps) takes minutes."""
    monkeypatch.setattr(semantic, "CLASSIFIER_STEPS", 40)
    monkeypatch.setitem(semantic.CLASSIFIER_SIZES, "digits", 16)


def in_unit_interval(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


# ------------------------------------------------------------------------------------- reconstruction


def test_reconstruction_at_every_prefix(tok_run, tmp_path, capsys, quick_classifier):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--prefix", "all", "--limit", 40, "--out", out
    )
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    # the checkpoint's held-out data, named with its split; --limit's subset said
    assert report["task"] == "reconstruction" and report["data"] == "digits:val"
    assert report["num_images"] == 40 == report["limit"] and report["num_tokens"] == 8
    assert [row["k"] for row in report["rows"]] == list(range(9)) == report["prefixes"]
    # what else decides the scores to float rounding: decoding in batches, and the CPU's thread count
    assert (report["batch_size"], report["device"], report["threads"]) == (64, "cpu", torch.get_num_threads())
    for row in report["rows"]:
        assert math.isfinite(row["psnr"]) and -1.0 <= row["ssim"] <= 1.0
        assert in_unit_interval(row["class_acc"]) and row["clf_fd"] >= 0.0
        assert "rfid" not in row and "is_mean" not in row  # not asked for
    sem = report["semantic"]
    assert sem["classifier_data"] == "digits" and sem["classifier_image_size"] == 16
    assert in_unit_interval(sem["reference_acc"]) and in_unit_interval(sem["class_only_acc"])
    assert sem["reference_acc_images"] == "digits:val"  # the held-out split
    assert sem["class_only_acc"] == report["rows"][0]["class_acc"]  # k = 0 is class-only decoding
    assert set(sem["cross_class_acc"]) == {"k0", "kK"}
    assert all(in_unit_interval(v) for v in sem["cross_class_acc"].values())
    assert "NOT comparable with Inception FID" in sem["clf_fd_note"]
    assert report["inception"] is None
    with Image.open(out / "rate_quality.png") as plot:
        assert plot.format == "PNG" and plot.width > plot.height > 100
    assert "PSNR" in stdout and "clf-FD" in stdout and "metrics.json" in stdout
    assert "reconstruction: digits:val (40 images, ema weights)" in stdout
    assert not list(out.glob(".images-*"))  # the temporary image store is gone


def test_psnr_is_that_of_the_saved_reconstructions(tok_run, tmp_path, capsys):
    """Second code path: encode/decode the same --limit subset by hand, round to uint8, average PSNR."""
    code, _, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--prefix", "0,8,4", "--limit", 24,
        "--no-semantic", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["semantic"] is None and "class_acc" not in report["rows"][0]
    tok = load_tokenizer(tok_run)
    data = build_eval_dataset("digits", 16, tok.class_names)
    picked = limit_indices(len(data), 24)
    x = torch.stack([data[i][0] for i in picked])
    y = torch.tensor([data[i][1] for i in picked])
    with torch.no_grad():
        z = tok.model.encode(x, y).z
        for row, k in zip(report["rows"], (0, 4, 8), strict=True):
            rec = to_uint8(tok.model.decode(z[:, :k], y)).float() / 127.5 - 1
            assert row["k"] == k
            assert row["psnr"] == pytest.approx(psnr(rec, x).mean().item(), abs=1e-4)


def test_defaults_output_folder_and_prefixes(tok_run, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", tok_run, "--limit", 8, "--no-semantic")
    assert code == 0, err
    report = json.loads((tok_run / "eval" / "metrics.json").read_text())
    assert report["prefixes"] == [0, 1, 2, 4, 8]
    assert (tok_run / "eval" / "rate_quality.png").is_file()
    # One prefix has no plot: the earlier one went, not to sit beside numbers it does not show.
    args = ("evaluate", "--checkpoint", tok_run, "--limit", 8, "--no-semantic", "--prefix", 4)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert not (tok_run / "eval" / "rate_quality.png").exists()


def test_a_second_evaluation_into_a_folder_being_written_is_refused(tok_run, tmp_path, capsys):
    """Two evaluations into one -o at once both exited 0, the metrics.json of one beside the plot of the
    other: the second is refused in one line, and touches nothing."""
    from smapctl.io import writing_into

    out = tmp_path / "eval"
    args = ("evaluate", "--checkpoint", tok_run, "--limit", 8, "--no-semantic", "--out", out)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    before = snapshot(out)
    with writing_into(out):  # as the first one holds it
        code, _, err = run_cli(capsys, *args, "--prefix", 4)
        assert code == 1 and error_lines(err) == [
            f"error: {out}: another smapctl command (a sample, decode or evaluate) is writing into it; wait"
            " for it to end, or choose another -o"
        ], err
        assert snapshot(out) == before
    code, _, err = run_cli(capsys, *args, "--prefix", 4)  # once it has ended
    assert code == 0, err


def test_missing_inception_weights_is_one_line_error(tok_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != INCEPTION_WEIGHTS_ENV}
    env["TORCH_HOME"] = str(tmp_path / "empty-torch-home")
    out = tmp_path / "never-written"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smapctl",
            "evaluate",
            "--checkpoint",
            str(tok_run),
            "--fid",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Inception weights for FID/IS not found"), r.stderr
    assert INCEPTION_WEIGHTS_FILE in lines[0] and "--inception-weights" in lines[0]
    assert str(tmp_path / "empty-torch-home" / "hub" / "checkpoints") in lines[0]
    assert not out.exists()  # it failed before doing anything


@pytest.mark.parametrize("name", ["metrics.json", "rate_quality.png"])
def test_disk_full_keeps_the_earlier_report(tok_run, tmp_path, capsys, monkeypatch, name):
    args = ["evaluate", "--checkpoint", tok_run, "--no-semantic", "--out", tmp_path]
    assert run_cli(capsys, *args, "--limit", 8)[0] == 0
    before = snapshot(tmp_path)
    fill_disk(monkeypatch, only=name)
    code, _, err = run_cli(capsys, *args, "--limit", 12)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith(f"error: {tmp_path / name}: could not write the ")
    assert errors[0].endswith(
        "(No space left on device): the disk is full; free some space or write elsewhere; "
        f"any earlier {name} is unchanged"
    )
    assert snapshot(tmp_path)[tmp_path / name] == before[tmp_path / name] and temp_files(tmp_path) == []
    written = json.loads((tmp_path / "metrics.json").read_text())["num_images"]
    assert written == (8 if name == "metrics.json" else 12)  # metrics.json is written before the plot


def test_disk_full_for_the_rfid_image_store_is_one_line(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    (tmp_path / ".images-x").mkdir()
    store = ImageStore(tmp_path / ".images-x", 1000)
    with pytest.raises(UserError, match=r"^\S+: could not write the images kept for rFID/IS \(No space") as e:
        store.append("originals", torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    assert str(e.value).startswith(f"{tmp_path}: ")


def test_without_fallocate_the_rfid_image_store_still_takes_its_room_first(tmp_path, monkeypatch):
    """macOS has no posix_fallocate: the store's file is filled with zeros after its .npy header when it
    is made (it was left sparse there), and its images read back as they were appended."""
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    (tmp_path / ".images-x").mkdir()
    store = ImageStore(tmp_path / ".images-x", 4000)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    store.append("originals", images)
    path = tmp_path / ".images-x" / "originals.npy"
    assert path.stat().st_blocks * 512 >= path.stat().st_size > 4000 * 3 * 16 * 16  # not sparse
    assert torch.equal(store.tensor("originals"), images)
    assert np.load(path, mmap_mode="r").shape == (4000, 3, 16, 16)  # the header kept


NOT_AN_IMAGE = "not an image (unrecognised file format)"


def image_folder_with_broken_files(root: Path) -> list[Path]:
    """root/3 and root/7 (classes of the tiny tokenizer) with two digit images each, and the two broken
    files of `add_broken_images` in root/7."""
    digits = build_eval_dataset("digits", 16)
    for i, label in enumerate((3, 3, 7, 7)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        image = to_uint8(digits[i][0]).permute(1, 2, 0).numpy()
        Image.fromarray(image).save(root / str(label) / f"{i}.png")
    return add_broken_images(root / "7")


def test_unreadable_images_are_skipped_counted_and_listed(tok_run, tmp_path, capsys):
    broken = image_folder_with_broken_files(tmp_path / "images")
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", tok_run, "--data", tmp_path / "images", "--no-semantic", "--out", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "\r" not in err and "reconstructing" not in err  # not a terminal: no bar drawn into a log
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_images"] == 4  # not 6, and no image counted twice in place of a broken one
    listing = out / "skipped_images.txt"
    assert report["skipped"] == {
        "count": 2,
        "list": str(listing),
        "first": [f"{broken[0]}: empty file (0 bytes)", f"{broken[1]}: {NOT_AN_IMAGE}"],
    }
    assert f"skipped 2 unreadable images (list: {listing}): {broken[0]}: empty file" in err
    listed = [line.split("\t")[0] for line in listing.read_text().splitlines()]
    assert listed == [str(p) for p in broken]
    # The scores are those of the readable images alone (a mean over the 6 files scored the skipped as 0).
    for path in broken:
        path.rename(tmp_path / path.name)
    clean = tmp_path / "clean"
    code, _, err = run_cli(capsys, *args[:-1], clean)
    assert code == 0, err
    assert json.loads((clean / "metrics.json").read_text())["rows"] == report["rows"]
    for path in broken:
        (tmp_path / path.name).rename(path)

    code, _, err = run_cli(capsys, *args, "--on-error", "fail")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert errors in ([f"error: {broken[0]}: empty file (0 bytes)"], [f"error: {broken[1]}: {NOT_AN_IMAGE}"])


def test_unreadable_samples_are_skipped_counted_and_listed(tmp_path, capsys, quick_classifier, monkeypatch):
    digits = build_eval_dataset("digits", 16)
    images = torch.stack([to_uint8(digits[i][0]) for i in range(6)])
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"s{i}.png")
    broken = add_broken_images(folder)
    out = tmp_path / "eval"
    monkeypatch.chdir(tmp_path)  # `--out eval`: the list is named absolute, as the inputs are
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", folder, "--data", "digits", "--limit", 40, "--out", "eval"
    )
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["num_samples"] == 6 and report["skipped"]["count"] == 2
    assert report["skipped"]["list"] == str(out / "skipped_images.txt")
    assert f"skipped 2 unreadable images (list: {out / 'skipped_images.txt'}): {broken[0]}" in err


# ----------------------------------------------------------------------------------------- generation


def write_sample_folder(folder: Path, images: torch.Tensor, labels: list[int]) -> None:
    """PNGs named as `smapctl sample` names them, plus a grid.png of another size that must be ignored."""
    folder.mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{label:04d}_{label}_{i:05d}.png")
    Image.new("RGB", (40, 30)).save(folder / "grid.png")


def test_a_folder_too_large_for_memory_is_refused_at_its_first_image(tmp_path, monkeypatch):
    """`evaluate --samples S --fid` read its default reference, a dataset folder, whole into memory (and
    held it twice while stacking): ImageNet's training folder would take 500 GB. Refused once the first
    image gives the size, naming the way out."""
    digits = build_eval_dataset("digits", 16)
    images = torch.stack([to_uint8(digits[i][0]) for i in range(6)])
    write_sample_folder(tmp_path / "samples", images, [digits[i][1] for i in range(6)])
    assert read_image_set(tmp_path / "samples").images.untyped_storage().nbytes() == 6 * 3 * 16 * 16
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1}  # a machine of 4 KiB
    monkeypatch.setattr("smapctl.runtime.os.sysconf", pages.__getitem__)
    with pytest.raises(UserError) as e:
        read_image_set(tmp_path / "samples")
    assert str(e.value) == (
        f"{tmp_path / 'samples'}: 6 images of 16x16 pixels take 0.0 GiB in memory, more than half of this "
        "machine's 0.0 GiB, and `evaluate` holds the images it reads in memory: for gFID against a large "
        "dataset give --ref an .npz of its Inception statistics (mu and sigma, as guided-diffusion's "
        "reference batches hold them), or read --limit N of its images"
    )


def machine_of(monkeypatch, nbytes: int) -> None:
    """`images_fit_in_memory` sees a machine of `nbytes` bytes of memory (the rest of os.sysconf as is)."""
    real = os.sysconf
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": nbytes}
    monkeypatch.setattr(
        "smapctl.runtime.os.sysconf", lambda name: pages[name] if name in pages else real(name)
    )


def reference_folder(folder: Path, n: int = 16) -> list[Path]:
    """`n` digit images (a quarter of them 24x20 pixels, framed to 16 px when read), with the broken files
    of `add_broken_images` before and among them (empty.png, f00.png, ..., notes.jpg) -> the broken ones."""
    digits = build_eval_dataset("digits", 16)
    wide = build_eval_dataset("digits", 24)
    folder.mkdir(parents=True)
    for i in range(n):
        image = to_uint8(digits[i][0]) if i % 4 else to_uint8(wide[i][0])[:, 2:22]  # (3, 20, 24)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"f{i:02d}.png")
    return add_broken_images(folder)


def test_a_reference_folder_too_large_for_memory_gives_its_inception_statistics_as_it_is_read(
    random_inception_weights, tmp_path, monkeypatch
):
    """PLUMBING TEST (random Inception weights): a folder too large to hold, read as a gFID reference, is
    its Inception statistics, computed batch by batch as its images are read: torch-fidelity's own (np.cov,
    unbiased) for the same images, framed as they are when held, the unreadable files left out and
    recorded as when held (one before its first image, one among the rest), or an error with "fail"."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    from smapctl.data.images import BadImageError
    from smapctl.eval.fidelity import TensorImages

    broken = reference_folder(tmp_path / "ref")
    held = read_image_set(tmp_path / "ref", size=16)
    assert held.images.shape == (16, 3, 16, 16) and [e.path for e in held.skipped] == list(map(str, broken))
    extractor = create_feature_extractor(
        "inception-v3-compat", ["2048"], cuda=False,
        feature_extractor_weights_path=str(random_inception_weights), verbose=False,
    )  # fmt: skip
    # In batches of 5, as streamed below: float32 features of one image differ with their batch's size
    # on some CPUs (AVX2: sigma 1.2e-6 apart, relatively, with one batch of 16), which is not the point here.
    features = get_featuresdict_from_dataset(TensorImages(held.images), extractor, 5, False, True, False)
    expected = fid_featuresdict_to_statistics(features, "2048")

    fidelity = common.Fidelity.request(True, False, random_inception_weights)
    streamed = partial(generation._streamed_statistics, fidelity=fidelity, batch_size=5, device="cpu")
    machine_of(monkeypatch, 2 * 17 * 3 * 16 * 16)  # 18 files of 16 x 16 pixels are too many
    with pytest.raises(UserError, match="holds the images it reads in memory"):  # as before, without it
        read_image_set(tmp_path / "ref", size=16)
    ref = read_image_set(tmp_path / "ref", size=16, too_large=partial(streamed, on_error="skip"))
    assert ref.images.shape == (0, 3, 16, 16) and ref.fid_count == 16
    assert [e.path for e in ref.skipped] == list(map(str, broken))
    mu, sigma = ref.fid_stats["mu"], ref.fid_stats["sigma"]
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.linalg.norm(mu - expected["mu"]) <= 1e-6 * np.linalg.norm(expected["mu"])
    assert np.linalg.norm(sigma - expected["sigma"]) <= 1e-6 * np.linalg.norm(expected["sigma"])
    with pytest.raises(BadImageError, match="empty.png"):  # before its first image, as when held
        read_image_set(
            tmp_path / "ref", size=16, on_error="fail", too_large=partial(streamed, on_error="fail")
        )
    (tmp_path / "ref" / "empty.png").unlink()
    with pytest.raises(BadImageError, match="notes.jpg"):  # met as its statistics are computed
        read_image_set(
            tmp_path / "ref", size=16, on_error="fail", too_large=partial(streamed, on_error="fail")
        )


def test_gfid_against_a_reference_folder_too_large_for_memory(
    random_inception_weights, tmp_path, monkeypatch, capsys, caplog
):
    """PLUMBING TEST (random Inception weights): `evaluate --samples S --ref FOLDER --fid` refused a
    reference folder too large to hold (ImageNet's, with no .npz of its statistics at hand); now gFID is
    taken against its Inception statistics, computed as it is read: the gFID of its images held, and
    metrics.json counts the images they came from. A --samples folder too large is still refused."""
    digits = build_eval_dataset("digits", 16)
    write_sample_folder(
        tmp_path / "samples", torch.stack([to_uint8(digits[20 + i][0]) for i in range(10)]), list(range(10))
    )
    broken = reference_folder(tmp_path / "ref")
    args = [
        "evaluate", "--samples", tmp_path / "samples", "--ref", tmp_path / "ref", "--fid", "--no-semantic",
        "--inception-weights", random_inception_weights, "--batch-size", 5,
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "held")
    assert code == 0, err
    held = json.loads((tmp_path / "held" / "metrics.json").read_text())
    assert held["gfid_against"] == "images" and held["num_reference"] == 16

    machine_of(monkeypatch, 2 * 12 * 3 * 16 * 16)  # room for the 10 samples, not for the 18 files
    with caplog.at_level(logging.INFO, logger="smapctl"):
        code, _, err = run_cli(capsys, *args, "--out", tmp_path / "streamed")
    assert code == 0, err
    # 17: the files from the first readable one on (as the progress line counts them; one broken before)
    said = f"{tmp_path / 'ref'}: 17 images would take 0.0 GiB: its Inception statistics are computed as"
    assert f"{said} it is read" in caplog.text
    report = json.loads((tmp_path / "streamed" / "metrics.json").read_text())
    assert report["gfid_against"] == "mu and sigma of its images, computed as they were read"
    assert report["num_reference"] == 16 and report["reference"] == str(tmp_path / "ref")
    assert report["metrics"]["gfid"] == pytest.approx(held["metrics"]["gfid"], rel=1e-4)
    assert report["skipped"]["count"] == 2 and report["skipped"]["first"][0].startswith(str(broken[0]))

    machine_of(monkeypatch, 2 * 9 * 3 * 16 * 16)  # nor for the samples: they are held
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "refused")
    [line] = error_lines(err)
    assert code == 1 and f"{tmp_path / 'samples'}: 10 images of 16x16 pixels take" in line


def test_a_reference_folder_too_large_for_memory_the_semantic_scores_need_is_refused(
    tmp_path, monkeypatch, caplog
):
    """The semantic scores hold their reference images: a folder too large to hold that they need is
    refused as before; one they do not need (--ref, with --data for them) is taken as its statistics,
    --data's images read first (before the hours of Inception). --data's images that cannot be had
    leave the semantic scores without reference images, with a warning (the whole evaluation failed)."""
    reference_folder(tmp_path / "ref")
    machine_of(monkeypatch, 2 * 17 * 3 * 16 * 16)
    calls = []

    def statistics(images) -> image_sets.ImageSet:  # a stand-in for `_streamed_statistics`
        calls.append(len(images))
        stats = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
        return image_sets.ImageSet(torch.empty(0, 3, 16, 16, dtype=torch.uint8), None, "s", fid_stats=stats,
                                 fid_count=len(images))  # fmt: skip

    ref = str(tmp_path / "ref")
    with pytest.raises(UserError, match="holds the images it reads in memory") as e:
        generation._references(None, ref, True, (16, 16), None, "skip", statistics)
    assert str(e.value).endswith(
        "; or score --no-semantic (its Inception statistics are then computed as it is read)"
    )
    assert calls == []
    reference, semantic_reference = generation._references(ref, ref, True, (16, 16), None, "skip", statistics)
    assert reference.fid_count == 17 and calls == [17]  # gFID goes on
    # No images, and none named (metrics.json named the --ref file as the semantic reference's images).
    assert semantic_reference.source is None and len(semantic_reference.images) == 0
    assert "holds the images it reads in memory" in caplog.text
    assert "; the semantic scores have no reference images" in caplog.text
    assert "the semantic scores' reference images are --data" not in caplog.text
    reference, semantic_reference = generation._references(
        None, ref, False, (16, 16), None, "skip", statistics
    )
    assert reference is semantic_reference and reference.fid_count == 17  # from its first readable image
    reference, semantic_reference = generation._references(
        ref, "digits", True, (16, 16), None, "skip", statistics
    )
    assert reference.fid_count == 17 and semantic_reference.source == "digits:val"
    assert len(semantic_reference.images) > 0 and calls == [17, 17, 17]
    # A statistics-only .npz with a built-in --data that cannot frame non-square samples: gFID goes on.
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    reference, semantic_reference = generation._references(
        str(tmp_path / "stats.npz"), "digits", True, (16, 24), None, "skip", statistics
    )
    assert reference.fid_stats is not None and semantic_reference.source is None
    # Only images that cannot be held are given up: a --data folder of unreadable files is an error.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of its 1 image files could be read"):
        generation._references(str(tmp_path / "stats.npz"), str(tmp_path / "broken"), True, (16, 16), None,
                             "skip", statistics)  # fmt: skip


def test_the_size_check_turns_as_reading_does(tmp_path):
    """`first_of_another_size` reads headers only: its size, EXIF orientation counted, is the size the
    image has once read (`load_image`), for each of the 8 orientations (5 and 7 turn as 6 and 8 do)."""
    from smapctl.data.images import load_image

    Image.new("RGB", (24, 16)).save(tmp_path / "a.png")
    turned = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (16, 24)).save(tmp_path / "b.jpg", exif=exif)
        files = [tmp_path / "a.png", tmp_path / "b.jpg"]
        found = image_sets.FolderImages(tmp_path, files, None, (3, 16, 24)).first_of_another_size()
        width, height = load_image(files[1]).size
        assert found == (None if (width, height) == (24, 16) else (files[1], f"{width}x{height}")), (
            orientation
        )
        turned += [orientation] if found is None else []
    assert turned == [5, 6, 7, 8]


def test_the_size_check_opens_no_named_pipe(tmp_path):
    """A named pipe `x.png` among a streamed reference's images (of samples that are not square): the
    header check opened it and waited forever for a writer; it is left to the pass, which skips it."""
    Image.new("RGB", (24, 16)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    Image.new("RGB", (20, 16)).save(tmp_path / "c.png")
    files = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    found = without_blocking_on(
        tmp_path / "b.png",
        lambda: image_sets.FolderImages(tmp_path, files, None, (3, 16, 24)).first_of_another_size(),
        "the size check blocked opening a named pipe",
    )
    assert found == (tmp_path / "c.png", "20x16")
    assert image_sets.FolderImages(tmp_path, files, None, (3, 16, 24))[1][2] == "not a regular file"


def test_a_streamed_reference_of_another_size_is_refused_before_the_inception_pass(tmp_path, monkeypatch):
    """Samples that are not square take reference images of their own size: a file of another size was
    found when its batch came, after every batch before it had been through Inception (hours). (The same
    pass also stops after its first batch for a SIGTERM Python lost: below.)"""
    from smapctl.train.signals import GracefulStop

    folder = tmp_path / "ref"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (24, 16), (i, i, i)).save(folder / f"f{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # 16x24 on disk, 24x16 once turned as EXIF says: of the set's size
    Image.new("RGB", (16, 24)).save(folder / "g.jpg", exif=exif)
    files = sorted(folder.iterdir())
    calls = []

    class Inception:  # a stand-in for `Fidelity`
        def statistics(self, batches, device):
            calls.append(seen := [])
            for batch in batches:  # as Inception takes them, one by one
                seen.append(len(batch))
            return {"mu": np.zeros(2048), "sigma": np.eye(2048)}, sum(seen)

    run = partial(
        generation._streamed_statistics, fidelity=Inception(), batch_size=2, device="cpu", on_error="skip"
    )
    assert run(image_sets.FolderImages(folder, files, None, (3, 16, 24))).fid_count == 5 and calls == [
        [2, 2, 1]
    ]
    Image.new("RGB", (20, 16)).save(folder / "z.png")
    calls.clear()
    with pytest.raises(UserError, match=r"z.png: image size 20x16 differs from 24x16 \(.*f0.png\)"):
        run(image_sets.FolderImages(folder, sorted(folder.iterdir()), None, (3, 16, 24)))
    assert calls == []
    # A SIGTERM Python lost as the command started stops the pass after its first batch (a reference of
    # ImageNet's 50,000 images ran on for many minutes, to the scheduler's SIGKILL).
    (folder / "z.png").unlink()
    monkeypatch.setattr(GracefulStop, "unheard", signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run(image_sets.FolderImages(folder, files, None, (3, 16, 24)))
    assert calls == [[2]] and GracefulStop.unheard is None


def test_fidelity_plumbing_with_random_inception_weights(
    random_inception_weights, tmp_path, capsys, quick_classifier
):
    """PLUMBING TEST (random Inception weights: the numbers are meaningless): a sample folder and an
    ADM .npz reference reach torch-fidelity offline; gFID and IS come back with the semantic scores."""
    digits = build_eval_dataset("digits", 16)
    images = torch.stack([to_uint8(digits[i][0]) for i in range(14)])
    labels = [digits[i][1] for i in range(14)]
    write_sample_folder(tmp_path / "samples", images[:10], labels[:10])
    write_npz(tmp_path / "ref.npz", images[10:].permute(0, 2, 3, 1).numpy())
    code, stdout, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "samples", "--ref", tmp_path / "ref.npz", "--fid", "--is",
        "--inception-weights", random_inception_weights, "--data", "digits", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    m = report["metrics"]
    assert m["num_samples"] == 10 and report["num_reference"] == 4
    assert report["reference"] == str(tmp_path / "ref.npz")
    assert math.isfinite(m["gfid"]) and m["gfid"] > 0.0 and report["gfid_against"] == "images"
    assert math.isfinite(m["is_mean"]) and m["is_mean"] >= 1.0 - 1e-6 and math.isfinite(m["is_std"])
    # An ADM reference batch with its own statistics (`mu`, `sigma`): gFID is taken against them.
    np.savez(
        tmp_path / "ref_stats.npz",
        arr_0=read_npz(tmp_path / "ref.npz"),
        mu=np.zeros(2048),
        sigma=np.eye(2048),
    )
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "samples", "--ref", tmp_path / "ref_stats.npz", "--fid",
        "--is", "--inception-weights", random_inception_weights, "--no-semantic", "--out", tmp_path / "eval2",
    )  # fmt: skip
    assert code == 0, err
    stats_report = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert stats_report["gfid_against"] == "mu and sigma of the .npz"
    assert stats_report["metrics"]["gfid"] != pytest.approx(m["gfid"], rel=1e-3)
    assert stats_report["metrics"]["is_mean"] == pytest.approx(m["is_mean"], rel=1e-6)
    # The statistics alone (no `arr_0`): the same gFID; the semantic scores take --data's images as their
    # reference (they had none).
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, stdout3, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "samples", "--ref", tmp_path / "stats_only.npz", "--fid",
        "--inception-weights", random_inception_weights, "--data", "digits", "--out", tmp_path / "eval3",
    )  # fmt: skip
    assert code == 0, err
    only = json.loads((tmp_path / "eval3" / "metrics.json").read_text())
    assert only["gfid_against"] == "mu and sigma of the .npz" and only["num_reference"] is None
    assert only["semantic"]["num_reference_images"] == len(build_eval_dataset("digits", 16))
    assert only["metrics"]["gfid"] == pytest.approx(stats_report["metrics"]["gfid"], rel=1e-6)
    assert only["metrics"]["clf_fd"] >= 0.0 and in_unit_interval(only["semantic"]["reference_acc"])
    assert only["semantic"]["reference_acc_images"].startswith("digits")
    assert in_unit_interval(only["metrics"]["class_acc"]) and "gFID" in stdout3
    assert in_unit_interval(m["class_acc"]) and m["clf_fd"] >= 0.0
    assert report["inception"]["weights"] == str(random_inception_weights)
    assert (
        report["inception"]["weights_sha256"]
        == hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    )
    assert "gFID" in stdout and "IS" in stdout
    assert not (tmp_path / "eval" / "rate_quality.png").exists()  # a plot is for prefixes


def test_generator_samples_npz_and_folder_agree(gen_run, tmp_path, capsys, quick_classifier):
    """Scoring a generator's samples on the spot, its PNG folder and its .npz give the same numbers."""
    out = tmp_path / "gen-eval"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--generator", gen_run, "--num", 25, "--save-npz", "--limit", 200, "--out", out
    )
    assert code == 0, err
    samples = (out / "samples").resolve()
    assert f"samples: {samples}, {samples / 'samples.npz'}" in "".join(stdout.split("\n"))  # where they went
    direct = json.loads((out / "metrics.json").read_text())
    assert direct["metrics"]["num_samples"] == 30  # 25 rounded up to 3 per class
    # The guidance and steps used, the recipe's when not given (`cfg_scale` was null then).
    demo = load_generator_recipe(ROOT / "recipes/demo/generator.yaml").sample
    assert direct["cfg_scale"] == demo.cfg_scale == direct["sampling"]["cfg_scale"]
    assert direct["sampling"]["steps"] == 3 and "top_k" not in direct["sampling"]  # CARD's settings only
    # The noise is drawn per batch: the batch size (and device) decide the images as the seed does.
    assert direct["seed"] == 0 and direct["batch_size"] == 64 and direct["device"] == "cpu"
    assert direct["threads"] == torch.get_num_threads()  # on the CPU, float rounding follows it
    assert direct["data"] == "digits:train" and direct["num_reference"] == 200 == direct["limit"]
    assert f"generation: {gen_run.resolve()}" in " ".join(stdout.split())  # the table names the generator
    # The classifier was trained on digits:train: its accuracy there is a training accuracy, and says so.
    assert (
        direct["semantic"]["reference_acc_images"]
        == "digits:train (the classifier's training images among them)"
    )
    assert "on digits:train (the classifier's training images among them)" in " ".join(stdout.split())
    assert in_unit_interval(direct["metrics"]["class_acc"])
    # The .npz round trip: the same uint8 images as the PNGs, in the same order.
    folder = read_image_set(out / "samples")
    assert torch.equal(
        torch.from_numpy(read_npz(out / "samples" / "samples.npz")).permute(0, 3, 1, 2), folder.images
    )
    assert folder.labels.tolist() == [c for c in range(10) for _ in range(3)]
    # ... and the same classes, stored as `arr_1` (guided-diffusion's layout of class-conditional samples).
    assert torch.equal(read_image_set(out / "samples" / "samples.npz").labels, folder.labels)

    for source, name in ((out / "samples", "folder"), (out / "samples" / "samples.npz", "npz")):
        code, _, err = run_cli(
            capsys, "evaluate", "--samples", source, "--data", "digits:train", "--limit", 200,
            "--out", tmp_path / name,
        )  # fmt: skip
        assert code == 0, err
        report = json.loads((tmp_path / name / "metrics.json").read_text())
        # what drew them, from the folder's sampling.json: the generator, seed, batch size and guidance
        drew = report["sampled_with"]
        assert drew["generator"] == direct["generator"] and drew["settings"] == direct["sampling"]
        assert (drew["seed"], drew["batch_size"], drew["device"]) == (0, 64, "cpu")
        again = report["metrics"]
        assert again["clf_fd"] == pytest.approx(direct["metrics"]["clf_fd"], rel=1e-9)
        # Labels come from the file names, or from the .npz's `arr_1`.
        assert again["class_acc"] == pytest.approx(direct["metrics"]["class_acc"], rel=1e-9)


def test_an_interrupted_generator_evaluation_leaves_no_stale_scores(
    gen_run, tmp_path, monkeypatch, caplog, quick_classifier
):
    """Ctrl-C while an evaluation's samples were replaced left the earlier metrics.json (and grid.png)
    beside a mix of old and new samples, and advised `--overwrite`, which `evaluate` does not take."""
    from faults import interrupt_sampling

    from smapctl.ops.sample import sample_images

    out = tmp_path / "eval"
    sample_images(gen_run, out / "samples", per_class=2, batch_size=10)  # an earlier evaluation's
    (out / "metrics.json").write_text("{}\n")
    interrupt_sampling(monkeypatch, at=2)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        evaluate_images(generator=gen_run, num=20, batch_size=10, out=out)
    assert "interrupted: 10 of 20 images written" in caplog.text
    assert "(and 10 images of the earlier run); run the same command again" in caplog.text
    assert not (out / "metrics.json").exists() and not (out / "samples" / "grid.png").exists()
    # Such a folder, scored with --samples, is pointed out (its classes may be incomplete).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate_images(samples=out / "samples", data="digits:train", out=tmp_path / "again")
    assert f"{out / 'samples'}: holds `smapctl sample` images but no grid.png" in caplog.text


def test_a_signal_as_an_evaluations_samples_are_finished_stops_it(
    gen_run, tmp_path, monkeypatch, caplog, quick_classifier
):
    """`sample` lets a run finish on a signal once every image is drawn (all it does); `evaluate
    --generator` goes on to score them for minutes: a signal there stops it at once, saying what is
    written. (quick_classifier: the real reference classifier, trained first, took this test 3-4 minutes.)"""
    from smapctl.ops import sample

    real = sample._grid

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(sample, "_grid", signalled)
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        evaluate_images(generator=gen_run, num=20, batch_size=10, out=out)
    said = (
        f"interrupted: 20 of 20 images written to {out / 'samples'}, without grid.png; run the same command"
    )
    assert said in caplog.text and "complete" not in caplog.text
    assert not (out / "metrics.json").exists()


def test_a_generators_default_reference_is_the_images_it_was_trained_on(gen_run, tmp_path):
    """--generator without --data/--ref compares with the generator's training images: its recipe's
    latents.dataset when it named one (the tokenizer's training data used to be taken regardless)."""
    _, _, data, named = generation._generator_info(gen_run)
    assert named is None and generation._training_data_spec(data, named) == "digits:train"
    other = tmp_path / "gen"
    shutil.copytree(gen_run, other)
    [meta_file] = (other / "checkpoints").glob("step_*/meta.json")
    meta = json.loads(meta_file.read_text())
    meta["recipe"]["latents"]["dataset"] = "/data/imgs"
    meta_file.write_text(json.dumps(meta))
    _, _, data, named = generation._generator_info(other)
    assert named == "/data/imgs" and generation._training_data_spec(data, named) == "/data/imgs"
    assert generation._training_data_spec(data, "photos") == "photos:train"  # the tokens' split, not val
    assert generation._training_data_spec(data, "photos:val") == "photos:val"


# ------------------------------------------------------------------------------------------- helpers


def test_prefix_parsing():
    assert parse_prefixes(None, 16) == [0, 1, 2, 4, 8, 16]
    assert parse_prefixes("all", 3) == [0, 1, 2, 3]
    assert parse_prefixes("8, 2,8,0", 8) == [0, 2, 8]
    with pytest.raises(
        UserError, match=r"^--prefix 9: out of range; the tokenizer has 8 tokens \(use 0\.\.8\)$"
    ):
        parse_prefixes("2,9", 8)
    with pytest.raises(UserError, match="comma-separated integers or 'all'"):
        parse_prefixes("two", 8)
    assert parse_prefixes(" ALL ", 2) == [0, 1, 2]
    # an empty value was "out of range"; "1_0" and "+1" were read by int() as 10 and 1
    for bad in ("", ",", "1_0", "+1", "-1", "2,,x"):
        with pytest.raises(UserError, match=r"^--prefix: expected comma-separated integers or 'all', got "):
            parse_prefixes(bad, 16)


def test_limit_is_a_fixed_sorted_subset():
    a = limit_indices(100, 10)
    assert a == limit_indices(100, 10) == sorted(set(a)) and len(a) == 10 and a != list(range(10))
    assert limit_indices(10, 10) is None and limit_indices(10, None) is None


def test_options_of_the_other_mode_are_refused():
    with pytest.raises(UserError, match="--ref: only with --samples or --generator"):
        evaluate_images(ref="x.npz")
    with pytest.raises(UserError, match="--prefix: not with --samples"):
        evaluate_images(samples="s", prefix="all")
    with pytest.raises(UserError, match="--checkpoint: not with --generator"):
        evaluate_images(generator="g", checkpoint="t")
    # A tokenizer's weights: a generator's samples are drawn with its EMA weights (it was ignored).
    for mode in ("generator", "samples"):
        with pytest.raises(UserError, match=f"^--weights: not with --{mode}$"):
            evaluate_images(**{mode: "g"}, weights="model")
    # They are about drawing samples: "only with --samples or --generator" sent users to --samples,
    # which refuses them too; --seed was ignored without a word.
    for option, value in [("num", 5), ("cfg_scale", 2.0), ("seed", 3), ("save_npz", True)]:
        with pytest.raises(UserError, match=r"^--[a-z-]+: only with --generator \(samples drawn now\)$"):
            evaluate_images(**{option: value})
    with pytest.raises(UserError, match="--seed: not with --samples"):
        evaluate_images(samples="s", seed=3)


def test_tokenizer_alone_names_checkpoint_for_reconstructions():
    """`evaluate --tokenizer RUN` (a tokenizer to score, as a user reads it) said only "only with
    --generator": the error names --checkpoint, the option that scores a tokenizer's reconstructions."""
    with pytest.raises(UserError) as caught:
        evaluate_images(tokenizer="runs/tok")
    assert str(caught.value) == (
        "--tokenizer: only with --generator (samples drawn now); to score a tokenizer's reconstructions:"
        " --checkpoint runs/tok"
    )
    with pytest.raises(UserError, match=r"^--tokenizer: only with --generator \(samples drawn now\)$"):
        evaluate_images(checkpoint="runs/tok", tokenizer="runs/tok")  # --checkpoint given: nothing to add


def test_a_run_folder_given_as_samples_is_refused_naming_generator(gen_run, tmp_path):
    """`--samples RUN` (the generator option mixed up) read the run's files as samples and said "nothing
    to score": a run or checkpoint folder is refused, naming --generator."""
    from smapctl.train import checkpoint as ckpt

    for folder in (gen_run, ckpt.latest_checkpoint(gen_run)):
        with pytest.raises(UserError, match=f"^--samples {folder}: a training run or checkpoint folder, not"):
            evaluate_images(samples=folder, data="digits")


def test_samples_of_a_generator_gone_say_so(tmp_path, caplog):
    """Samples whose sampling.json names a generator deleted since: the images it imitated cannot be
    known, which it left unsaid (only "nothing to score ... name the dataset with --data")."""
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    (tmp_path / "s" / "sampling.json").write_text(json.dumps({"generator": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="nothing to score: ask for --fid and/or --is; or name"):
        evaluate_images(samples=tmp_path / "s")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and said[0].startswith(
        "the samples' generator cannot be opened, so nor can the images it imitates: "
    ), said
    assert str(tmp_path / "gone") in said[0]


def test_samples_need_something_to_score(tmp_path):
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    with pytest.raises(UserError, match="nothing to score: ask for --fid and/or --is; or name"):
        evaluate_images(samples=tmp_path / "s")
    with pytest.raises(UserError, match="nothing to score: with --no-semantic, ask for --fid and/or --is"):
        evaluate_images(samples=tmp_path / "nowhere", data="digits", semantic=False)  # before reading
    folder = tmp_path / "ref"
    write_sample_folder(folder, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    with pytest.raises(
        UserError, match=f"--data {folder} gives semantic scores with --semantic, which trains"
    ):
        evaluate_images(samples=tmp_path / "s", data=str(folder))
    with pytest.raises(UserError, match="--semantic: name the dataset the images belong to with --data"):
        evaluate_images(samples=tmp_path / "s", semantic=True)
    # --data FOLDER --semantic: a classifier of that folder (it said "name the dataset with --data").
    from smapctl.eval.semantic import semantic_source

    assert semantic_source(str(folder), None, forced=True).dataset == str(folder.resolve())
    assert semantic_source(str(folder), None, forced=False) is None
    # Reconstructions of --data's images: the checkpoint's training folder comes first (the classifier
    # was trained on the images it scored); samples: the folder --data names, as a generator's default.
    trained_on = DataConfig(dataset=str(tmp_path / "train"))
    assert semantic_source(str(folder), trained_on, forced=True, scores_spec=True) is trained_on
    assert semantic_source(str(folder), trained_on, forced=True).dataset == str(folder.resolve())
    assert semantic_source(None, trained_on, forced=True) is trained_on


def test_reconstructions_take_the_classifier_of_the_training_folder(tok_run, gen_run, tmp_path, monkeypatch):
    """Reconstructions score --data's own images, so their classifier comes from the checkpoint's training
    folder; a generator's samples are scored against the folder --data names."""
    seen = []

    class Chosen(Exception):
        pass

    def record(*args, scores_spec=False, samples=None, reference=None):
        seen.append(scores_spec)
        raise Chosen

    monkeypatch.setattr(reconstruction, "choose_semantic", record)
    monkeypatch.setattr(generation, "choose_semantic", record)
    with pytest.raises(Chosen):
        evaluate_images(checkpoint=tok_run, limit=4, out=tmp_path / "a")
    with pytest.raises(Chosen):
        evaluate_images(generator=gen_run, num=10, out=tmp_path / "b")
    assert seen == [True, False]


def test_image_store_round_trip(tmp_path):
    store = ImageStore(tmp_path, 5)
    a = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    store.append("x", a[:3])
    store.append("x", a[3:])
    assert torch.equal(store.tensor("x"), a)


def test_npz_labels_and_resizing(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "labelled.npz", images, np.arange(6) % 3)  # guided-diffusion's layout: arr_0, arr_1
    s = read_image_set(tmp_path / "labelled.npz", size=8, limit=4)
    assert s.images.shape == (4, 3, 8, 8) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == [i % 3 for i in limit_indices(6, 4)]
    write_npz(tmp_path / "plain.npz", images)
    assert read_image_set(tmp_path / "plain.npz").labels is None
    # An `arr_1` that is not one integer label per image is refused, not dropped (class_acc went null).
    for bad in (np.arange(6.0), (np.arange(6) % 3)[:, None], np.arange(5), np.arange(6) - 1):
        np.savez(tmp_path / "bad.npz", images, bad)
        with pytest.raises(UserError, match=r"bad\.npz: 'arr_1' should hold the 6 images' class labels"):
            read_image_set(tmp_path / "bad.npz")


def test_an_empty_npz_is_refused_and_reports_name_their_images(tmp_path, monkeypatch, capsys):
    """An .npz of no images was scored (a report of nulls); every image set is named with its split or its
    absolute path (a folder was named as typed, and "digits" meant its held-out split unsaid)."""
    np.savez(tmp_path / "empty.npz", np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(UserError, match=r"empty\.npz: its 'arr_0' holds no images$"):
        read_image_set(tmp_path / "empty.npz")
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "empty.npz", "--data", "digits", "--out", tmp_path / "out"
    )
    assert code == 1 and len(error_lines(err)) == 1 and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    write_npz(tmp_path / "few.npz", np.zeros((2, 16, 16, 3), np.uint8))
    assert read_image_set("few.npz").source == str(tmp_path / "few.npz")
    assert (
        image_sets.source_name("digits") == "digits:val"
        and image_sets.source_name("photos:train") == "photos:train"
    )
    assert image_sets.source_name("./digits") == str(tmp_path / "digits")  # a folder of that name


def test_samples_that_are_not_square_need_a_reference_of_their_size(tmp_path, capsys, quick_classifier):
    """Non-square samples took a reference of any size (torch-fidelity squashes both to 299 x 299)."""
    rng = np.random.default_rng(0)
    write_npz(
        tmp_path / "wide.npz", rng.integers(0, 256, (12, 16, 24, 3), dtype=np.uint8), np.arange(12) % 10
    )
    write_npz(
        tmp_path / "square.npz", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10
    )
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "wide.npz", "--ref", tmp_path / "square.npz",
        "--data", "digits", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 1 and error_lines(err) == [
        f"error: --ref {tmp_path / 'square.npz'}: its images are 32x32 pixels and the samples 24x16; samples "
        "that are not square are compared with images of their own size"
    ]
    write_npz(
        tmp_path / "wide-ref.npz", rng.integers(0, 256, (12, 16, 24, 3), dtype=np.uint8), np.arange(12) % 10
    )
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "wide.npz", "--ref", tmp_path / "wide-ref.npz",
        "--data", "digits", "--semantic", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["image_size"] == [16, 24]


def test_a_builtin_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """`--data digits` / `--ref digits` is the built-in set whatever the working directory holds, as
    for reconstruction data (a ./digits folder used to replace it as the generation reference)."""
    (tmp_path / "digits" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), "white").save(tmp_path / "digits" / "a" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert len(read_image_set("digits", size=16).images) == 179  # digits' held-out split
    assert len(read_image_set("./digits", size=16).images) == 3
    with pytest.raises(
        UserError, match=r"missing: no such folder, \.npz file or dataset \(digits, photos\)$"
    ):
        read_image_set(tmp_path / "missing", size=16)
    # Without an image size a dataset is refused: the error offered one (`evaluate --samples nothere`);
    # a path that is not there is said to be missing ("neither an image folder..." left that open).
    with pytest.raises(UserError, match=r"missing: no such folder or \.npz file$"):
        read_image_set(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: neither an image folder nor an \.npz file$"):
        read_image_set(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"notes\.txt: neither an image folder, an \.npz file nor a dataset"):
        read_image_set(tmp_path / "notes.txt", size=16)


def test_rfid_runs_inception_on_the_originals_once(
    tok_run, random_inception_weights, tmp_path, capsys, monkeypatch
):
    """PLUMBING TEST (random Inception weights): rFID at 3 prefixes passes the 6 originals through
    Inception once, not once per prefix (6 + 3 x 6 images, not 3 x 12), and every prefix gets a score."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    seen = []
    forward = FeatureExtractorInceptionV3.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "forward", counting)
    out = tmp_path / "eval"
    code, _, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--prefix", "0,4,8", "--limit", 6, "--fid",
        "--no-semantic", "--inception-weights", random_inception_weights, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["k"] for r in rows] == [0, 4, 8] and all(math.isfinite(r["rfid"]) for r in rows)
    assert sum(seen) == 6 + 3 * 6
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the scratch is gone


def test_too_few_images_for_inception_fail_before_any_work(
    tok_run, random_inception_weights, tmp_path, capsys
):
    """The Inception Score's 10 splits need 10 images: known before the reconstructions are made."""
    out = tmp_path / "eval"
    code, _, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--limit", 6, "--is", "--inception-weights",
        random_inception_weights, "--out", out,
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert "error: Inception Score needs at least 10 samples (one per split); the data has 6" in err
    assert "reconstructing" not in err and not out.exists()


def test_builtin_datasets_without_a_size_are_one_line(
    random_inception_weights, tmp_path, capsys, monkeypatch, caplog
):
    """A built-in dataset has no size of its own: as --samples, or as the reference of non-square samples
    (a ValueError traceback before). A relative weights path is recorded absolute."""
    weights = ["--inception-weights", random_inception_weights]
    code, _, err = run_cli(
        capsys,
        "evaluate",
        "--samples",
        "digits:val",
        "--is",
        "--no-semantic",
        *weights,
        "--out",
        tmp_path / "e1",
    )
    assert code == 1 and "Traceback" not in err
    assert "error: --samples digits:val: a built-in dataset has no image size of its own" in err
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "wide.npz", rng.integers(0, 256, (12, 16, 24, 3), dtype=np.uint8))
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "wide.npz", "--fid", "--no-semantic", "--data", "digits",
        *weights, "--out", tmp_path / "e2",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert (
        "error: --data digits: a built-in dataset is read at one square size, and the samples are 24x16"
        in err
    )
    monkeypatch.chdir(random_inception_weights.parent)
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "wide.npz", "--is", "--no-semantic",
        "--inception-weights", random_inception_weights.name, "--out", tmp_path / "e3",
    )  # fmt: skip
    assert code == 0, err
    assert (
        "Inception Score of 12 images: 1 per split, and a split's score cannot exceed its size" in caplog.text
    )
    report = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert report["inception"]["weights"] == str(random_inception_weights)


def test_a_bad_inception_file_fails_before_any_work(tok_run, tmp_path, capsys):
    fake = tmp_path / "fake.pth"
    fake.write_text("junk\n")
    out = tmp_path / "eval"
    code, _, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--limit", 4, "--fid", "--inception-weights", fake,
        "--out", out,
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert (
        f"error: --inception-weights: {fake}: not a readable PyTorch weights file (not written by torch.save"
        in err
    )
    assert "reconstructing" not in err and not out.exists()


def test_an_unwritable_output_fails_before_any_work_and_a_failure_leaves_no_folder(
    tok_run, tmp_path, monkeypatch
):
    """The output folder used to be made only at the end, after minutes of reconstructing, training the
    reference classifier or scoring samples."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [0, 1])
    with monkeypatch.context() as mp:
        for module, work in [
            (reconstruction, "reconstruction_data"),
            (reconstruction, "choose_semantic"),
            (generation, "read_image_set"),
            (generation, "choose_semantic"),
        ]:
            mp.setattr(
                module, work, lambda *a, work=work, **k: pytest.fail(f"{work} before the output check")
            )
        for mode in (dict(checkpoint=tok_run), dict(samples=tmp_path / "s", data="digits")):
            with pytest.raises(
                UserError, match=rf"^{blocker}/eval: could not write the output folder: {blocker} is"
            ):
                evaluate_images(**mode, out=blocker / "eval")
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="nothing to score"):  # found once the samples are read
        evaluate_images(samples=tmp_path / "s", data=str(tmp_path / "s"), out=out)
    assert not out.exists()
    # ... nor the parents `mkdir -p` made for it (new/a was left behind); those that existed stay
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="nothing to score"):
        evaluate_images(samples=tmp_path / "s", data=str(tmp_path / "s"), out=tmp_path / "kept/new/a/eval")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()


def test_a_generator_with_nothing_to_score_is_refused_before_sampling(
    gen_run, tok_run, tmp_path, monkeypatch
):
    """`evaluate --generator RUN --data FOLDER` without --fid, --is or --semantic used to draw all its
    samples (minutes, or hours for 50,000 on a GPU) and only then find nothing to score."""
    folder = tmp_path / "ref"
    write_sample_folder(folder, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    info = generation._generator_info

    def trained_on_the_folder(run, tokenizer=None):  # as if its tokenizer had trained on `folder`
        path, class_names, _, token_images = info(run, tokenizer)
        return path, class_names, DataConfig(dataset=str(folder)), token_images

    monkeypatch.setattr(generation, "_generator_info", trained_on_the_folder)
    monkeypatch.setattr(generation, "_draw_samples", lambda *a, **k: pytest.fail("samples drawn"))
    out = tmp_path / "eval"
    with pytest.raises(
        UserError, match=f"nothing to score: ask for --fid and/or --is; --data {folder} gives"
    ):
        evaluate_images(generator=gen_run, data=str(folder), num=20, out=out)
    assert not out.exists()
    # A tokenizer run given as the generator is said to be one, --no-semantic or not (it was "nothing to
    # score" with --no-semantic).
    for asked in (None, False):
        with pytest.raises(UserError, match="a tokenizer checkpoint, not a generator"):
            evaluate_images(generator=tok_run, num=20, out=out, semantic=asked)


def test_the_table_title_keeps_a_long_path_on_one_line():
    """A two-column table folded its title, the data folder's path, mid-word ("/tmp/.../mydat" "a/val")."""
    from rich.console import Console

    from smapctl.eval.report import report_table

    data = "/tmp/rv_user_work/mydata/val-images-of-a-long-folder-name"
    report = {
        "task": "reconstruction",
        "data": data,
        "num_images": 100,
        "weights": "ema",
        "rows": [{"k": 0, "psnr": 20.0}],
    }
    console = Console(width=120, record=True)
    console.print(report_table(report))
    assert f"reconstruction: {data} (100 images, ema weights)" in console.export_text()


def test_the_scores_are_whole_on_a_narrow_terminal(monkeypatch):
    """At 40 columns (a terminal split in two, or COLUMNS=40 in a log) rich gave one column's room to
    another's header and printed clf-FD 141.412 as `141.4…`; at 36 it cut the column off at `141.4`, which
    reads as a score."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from smapctl import cli

    rows = [
        {"k": 0, "psnr": 8.72, "ssim": 0.0089, "class_acc": 0.0, "clf_fd": 141.41189},
        {"k": 8, "psnr": 8.73, "ssim": 0.0099, "class_acc": 1.0, "clf_fd": 139.28},
    ]
    report = {
        "task": "reconstruction",
        "data": "digits:val",
        "num_images": 16,
        "weights": "ema",
        "rows": rows,
    }
    result = SimpleNamespace(report=report, files=["ev/metrics.json"], skip_summary=lambda: None)
    for width in (36, 40, 44):
        out = io.StringIO()
        monkeypatch.setattr(cli, "console", Console(file=out, width=width, emoji=False, markup=False))
        cli._show_evaluation(result)
        lines = out.getvalue().splitlines()
        assert "…" not in out.getvalue(), (width, out.getvalue())
        for score in ("141.412", "139.280", "100.0%", "0.0089"):
            assert any(score in line for line in lines), (width, score, out.getvalue())


def test_a_reference_classifier_at_chance_is_pointed_out():
    from smapctl.eval.report import report_notes

    sem = {
        "classifier_data": "folder",
        "reference_acc": 0.25,
        "reference_acc_images": "val",
        "classifier_classes": 4,
    }
    notes = report_notes({"semantic": sem, "num_tokens": 8})
    assert any(n.startswith("WARNING that is about chance for 4 classes") for n in notes)
    sem["reference_acc"] = 0.9
    assert not any(n.startswith("WARNING") for n in report_notes({"semantic": sem, "num_tokens": 8}))
    # Samples' class accuracy is said to measure the decoder's class conditioning more than the generator
    # (a 1-step MaskGIT scored 98%).
    generated = report_notes({"task": "generation", "semantic": sem, "metrics": {"class_acc": 0.98}})
    assert any(
        n.startswith("class acc of samples a SMAP decoder made: it takes the class") for n in generated
    )
    assert not any(n.startswith("class acc of samples") for n in notes)


def test_reconstruction_accuracy_on_the_classifiers_own_images_says_so(
    tok_run, tmp_path, capsys, quick_classifier
):
    """The reference classifier's accuracy on --data digits:train is a training accuracy: said as for a
    generator's default reference (it was not)."""
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--checkpoint", tok_run, "--data", "digits:train", "--prefix", "8", "--limit", 20,
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    sem = json.loads((out / "metrics.json").read_text())["semantic"]
    assert sem["reference_acc_images"] == "digits:train (the classifier's training images among them)"
    assert "on digits:train (the classifier's training images among them)" in " ".join(stdout.split())


def test_a_tokenizer_without_classes_has_no_class_checks(tmp_path, capsys, quick_classifier, cache_env):
    """Without a class embedding k = 0 decodes nothing: "class only (k=0): 10% classified as their class"
    was reported as if it meant something."""
    recipe = load_tokenizer_recipe(
        ROOT / "recipes/demo/tokenizer.yaml", [*TINY_TOKENIZER, "model.class_condition=false"]
    )
    train_tokenizer(recipe, tmp_path / "tok")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--checkpoint", tmp_path / "tok", "--prefix", "0,8", "--limit", 20, "--out", out
    )
    assert code == 0, err
    sem = json.loads((out / "metrics.json").read_text())["semantic"]
    assert sem["class_only_acc"] is None and sem["cross_class_acc"] is None
    assert "class only" not in stdout and "cross-reconstruction" not in stdout


def test_a_generator_whose_tokenizer_moved_takes_its_new_place(
    gen_run, tok_run, tmp_path, capsys, quick_classifier, monkeypatch
):
    """Its tokenizer neither where training recorded it nor beside the run as it was: the error names
    --tokenizer, which then draws and scores the samples; their sampling.json names the tokenizer that
    decoded them, so that scoring the folder later finds the images they imitate."""
    from smapctl.train import checkpoint as ckpt

    shutil.copytree(gen_run, tmp_path / "gen")
    meta_file = ckpt.latest_checkpoint(tmp_path / "gen") / "meta.json"
    meta = json.loads(meta_file.read_text())
    moved = tmp_path / "moved-away"
    meta["tokenizer"] |= {"path": str(moved / "checkpoints" / "step_000000003"), "from_run": "../nowhere"}
    meta_file.write_text(json.dumps(meta))
    args = ("evaluate", "--generator", tmp_path / "gen", "--num", 10, "--limit", 40)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "eval")
    assert code == 1
    [line] = error_lines(err)
    recorded = moved / "checkpoints" / "step_000000003"
    assert (
        f"its tokenizer {recorded} no longer exists (moved or deleted?); name its new place with --tokenizer"
        in line
    )
    assert not (tmp_path / "eval").exists()

    other = tmp_path / "other-tok"  # a copy whose meta.json differs: another fingerprint
    shutil.copytree(tok_run, other)
    with open(ckpt.latest_checkpoint(other) / "meta.json", "a") as f:
        f.write(" ")
    with monkeypatch.context() as m:  # refused before the reference classifier trains (minutes)
        m.setattr(common, "reference_classifier", lambda *a, **k: pytest.fail("classifier trained"))
        code, _, err = run_cli(capsys, *args, "--tokenizer", other, "--out", tmp_path / "eval")
    [line] = error_lines(err)
    assert code == 1 and line.startswith(f"error: --tokenizer {other} has fingerprint")
    assert line.endswith("(or one retrained since)") and not (tmp_path / "eval").exists()

    code, _, err = run_cli(capsys, *args, "--tokenizer", tok_run, "--out", tmp_path / "eval")
    assert code == 0, err
    drew = json.loads((tmp_path / "eval" / "samples" / "sampling.json").read_text())
    assert drew["tokenizer"] == str(ckpt.latest_checkpoint(tok_run).resolve())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"] == "digits:train"

    code, _, err = run_cli(
        capsys,
        "evaluate",
        "--samples",
        tmp_path / "eval" / "samples",
        "--limit",
        40,
        "--out",
        tmp_path / "e2",
    )
    assert code == 0, err
    assert "cannot be opened" not in err  # the images they imitate: from the tokenizer that decoded them
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["data"] == "digits:train"

    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", tok_run, "--tokenizer", tok_run)
    assert code == 1 and error_lines(err) == ["error: --tokenizer: only with --generator (samples drawn now)"]


def test_other_images_beside_sample_images_are_said_to_be_left_out(tmp_path, caplog):
    """A folder of `smapctl sample` images is scored by those alone: the others were dropped silently."""
    folder = tmp_path / "s"
    write_sample_folder(folder, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])  # and its grid.png
    with caplog.at_level(logging.WARNING):
        assert len(read_image_set(folder).images) == 2
    assert "left out" not in caplog.text  # the grid is not an image to score
    Image.new("RGB", (8, 8)).save(folder / "extra.png")
    with caplog.at_level(logging.WARNING):
        assert len(read_image_set(folder).images) == 2
    assert f"{folder}: scoring its 2 `smapctl sample` images; 1 other image file(s) in it are left out" in (
        caplog.text
    )


def test_samples_scored_with_a_dataset_of_other_classes_are_refused(tmp_path, capsys, quick_classifier):
    """Digit samples (`0003_3_...png`) scored with --data photos:val were read as photos' classes 3 and 7
    and got a class accuracy and clf-FD without a word."""
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [3, 7])
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "s", "--data", "photos:val", "--out", tmp_path / "out"
    )
    photos = build_eval_dataset("photos:val", 16).class_names
    assert code == 1 and error_lines(err) == [
        f"error: {tmp_path / 's'}: its file names call class 3 '3', photos calls it {photos[3]!r}: score the"
        " samples with the dataset their generator was trained on (--data)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_generator_evaluation_into_a_folder_of_other_images_is_refused(gen_run, tmp_path, capsys):
    """`evaluate --generator RUN --out DATASET` drew into DATASET/samples: a new class folder of generated
    images in the dataset; into a `smapctl sample` folder, two sampling runs read as one."""
    dataset = tmp_path / "dataset"
    write_sample_folder(dataset / "cat", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    code, _, err = run_cli(capsys, "evaluate", "--generator", gen_run, "--num", "4", "--out", dataset)
    assert code == 1
    [line] = error_lines(err)
    assert f"{dataset}: holds images that `smapctl evaluate` did not write" in line
    assert "choose another --out" in line
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before  # nothing written


def test_npz_labels_past_the_classes_are_refused_before_the_classifier_is_trained(
    tmp_path, capsys, monkeypatch
):
    """An .npz whose `arr_1` holds a label past the reference classes was refused only after the
    classifier had been trained (minutes on a CPU, for a folder's)."""
    write_npz(tmp_path / "s.npz", np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 12]))
    monkeypatch.setattr(semantic, "load_or_train_classifier", lambda *a, **k: pytest.fail("trained first"))
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "s.npz", "--data", "digits", "--out", tmp_path / "out"
    )
    assert code == 1
    [line] = error_lines(err)
    assert line == f"error: {tmp_path / 's.npz'}: label 12 but digits has 10 classes"
    assert not (tmp_path / "out").exists()


def test_a_sample_folder_is_scored_against_its_generators_images_by_default(
    gen_run, tmp_path, capsys, quick_classifier
):
    """`evaluate --samples FOLDER` of `smapctl sample` said "nothing to score" though its sampling.json
    names the generator, whose training images `evaluate --generator` takes by default."""
    from smapctl.ops.sample import sample_images

    sample_images(gen_run, tmp_path / "s", per_class=2, batch_size=10)
    code, _, err = run_cli(capsys, "evaluate", "--samples", tmp_path / "s", "--out", tmp_path / "e")
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["data"] == "digits:train" and in_unit_interval(report["metrics"]["class_acc"])
    assert "finished" not in report["sampled_with"]  # said only of an unfinished run's images
    # --ref names the gFID reference only: the class scores stay (they were dropped without a word).
    code, _, err = run_cli(capsys, "evaluate", "--samples", tmp_path / "s", "--ref", "digits:val",
                           "--out", tmp_path / "e3")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert report["data"] == "digits:train" and "class_acc" in report["metrics"]
    # Its generator gone: as before, --data is asked for.
    shutil.copytree(tmp_path / "s", tmp_path / "s2")
    drew = json.loads((tmp_path / "s2" / "sampling.json").read_text())
    (tmp_path / "s2" / "sampling.json").write_text(json.dumps(drew | {"generator": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="nothing to score: ask for --fid and/or --is; or name"):
        evaluate_images(samples=tmp_path / "s2", out=tmp_path / "e2")


def test_an_interrupted_sample_folder_is_still_scored_against_its_generators_images(
    gen_run, tmp_path, monkeypatch, capsys, caplog, quick_classifier
):
    """An interrupted `smapctl sample` left no sampling.json, so its folder was "nothing to score" without
    --data; now it is written with the first image, and metrics.json says the run had not finished."""
    from faults import interrupt_sampling

    from smapctl.ops.sample import sample_images

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_sampling(patch, at=2)  # its own patch: undoing the test's took quick_classifier's too
        sample_images(gen_run, tmp_path / "s", per_class=2, batch_size=10)
    code, _, err = run_cli(capsys, "evaluate", "--samples", tmp_path / "s", "--out", tmp_path / "e")
    assert code == 0, err
    assert "no grid.png, which it writes last: an interrupted run's?" in caplog.text
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["data"] == "digits:train" and in_unit_interval(report["metrics"]["class_acc"])
    assert report["sampled_with"]["finished"] is False and report["metrics"]["num_samples"] == 10


def test_a_generator_evaluation_may_share_the_out_of_a_tokenizer_evaluation(tmp_path):
    """Its plot (rate_quality.png) was "images that `smapctl evaluate` did not write"."""
    out = tmp_path / "eval"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / report.PLOT_FILE)
    generation._check_generation_out(out)  # accepted
    Image.new("RGB", (8, 8)).save(out / "photo.png")
    with pytest.raises(
        UserError, match=r"holds images that `smapctl evaluate` did not write \(.*photo\.png\)"
    ):
        generation._check_generation_out(out)


def test_an_interrupted_evaluation_says_nothing_was_scored(
    tok_run, tmp_path, monkeypatch, caplog, quick_classifier
):
    """Ctrl-C during `evaluate --checkpoint` (or --samples) exited 130 without a word."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reconstruction, "reconstruction_data", interrupted)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        evaluate_images(checkpoint=tok_run, out=tmp_path / "e")
    assert "interrupted: no scores written (metrics.json is written once all are computed)" in caplog.text
    assert not (tmp_path / "e").exists()
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    monkeypatch.setattr(generation, "score_samples", interrupted)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        evaluate_images(samples=tmp_path / "s", data="digits", out=tmp_path / "e2")
    assert "interrupted: no scores written" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # what Python lost
def test_a_sigterm_python_lost_before_evaluate_stops_it_after_its_first_batch(
    tok_run, tmp_path, monkeypatch, capsys, caplog
):
    """A SIGTERM Python lost as `evaluate` started ("Exception ignored in ...") let it run to its end, to be
    killed by the scheduler's SIGKILL that follows; now it stops after its first batch of reconstructions,
    as one heard then would: exit 143, nothing written."""
    from faults import sigterm_lost_as_the_command_starts

    out = tmp_path / "e"
    args = ("evaluate", "--checkpoint", tok_run, "--limit", 8, "--batch-size", 4, "--no-semantic")
    sigterm_lost_as_the_command_starts(monkeypatch)
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert "interrupted: no scores written" in caplog.text and not out.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_the_report_is_written_ends_the_evaluation_as_complete(
    tok_run, tmp_path, capsys, caplog, signum
):
    """A Ctrl-C (or SIGTERM) just after metrics.json was written said "interrupted: no scores written" and
    exited 130 (143) with the scores complete on disk; as the table was printed, it exited 130 too, and as
    the output folder was let go after the report. The report is written whatever the signal once the
    scores are computed, and the evaluation is complete up to the command's end: exit 0, saying so once.
    Before the scores are computed the evaluation stops (130), nothing written."""
    from smapctl import cli

    name = signal.Signals(signum).name
    args = ["evaluate", "--checkpoint", tok_run, "--no-semantic", "--prefix", "4,8", "--limit", 8]
    with sigterm_caught() as caught:  # without smapctl's own handler, pytest would be the one ended
        with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.WARNING):
            signal_after(m, report, "write_text_atomic", signals := [signum])  # metrics.json
            code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "a")
        assert (code, signals, caught) == (0, [], []), err
        said = f"{name} after the scores were computed: the report is written to {tmp_path / 'a'}; the "
        assert said + "evaluation is complete" in caplog.text and caplog.text.count(name) == 1
        assert "no scores written" not in caplog.text and "metrics: " in stdout
        assert json.loads((tmp_path / "a" / "metrics.json").read_text())["num_images"] == 8
        assert (tmp_path / "a" / "rate_quality.png").is_file()
        # After the report, as the folder is let go (the result made on the way out) or the table printed:
        # the report is on disk, complete, and the whole table is shown.
        for out, owner, at in [("b", reconstruction, "EvalOutput"), ("c", cli.console, "print")]:
            caplog.clear()
            with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.WARNING):
                signal_after(m, owner, at, signals := [signum])
                code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / out)
            assert (code, signals, caught) == (0, [], []), err
            said = f"{name} as the command ended: the report is written to {tmp_path / out}; the evaluation"
            assert said + " is complete" in caplog.text and caplog.text.count(name) == 1
            assert "metrics: " in stdout and (tmp_path / out / "metrics.json").is_file()
        # Before the scores are computed: stopped, nothing written.
        caplog.clear()
        with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.WARNING):
            signal_after(m, reconstruction, "reconstruction_data", signals := [signum])
            code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "d")
        assert (code, signals, caught) == (128 + signum, [], []), err
        assert "interrupted: no scores written" in caplog.text and not (tmp_path / "d").exists()


def test_a_second_signal_as_the_report_is_written_stops_at_once_and_says_what_it_left(
    tok_run, tmp_path, capsys, caplog, monkeypatch
):
    """The first Ctrl-C lets the report be written; a second one stops at once. After metrics.json, the
    earlier evaluation's plot would have stood beside it as if of its numbers: it goes, and the message
    says what is there (not "no scores written")."""
    from smapctl.eval import plots

    out = tmp_path / "e"
    args = ["evaluate", "--checkpoint", tok_run, "--no-semantic", "--prefix", "4,8", "--out", out]
    assert run_cli(capsys, *args, "--limit", 8)[0] == 0
    signals = [signal.SIGINT, signal.SIGINT]
    signal_after(monkeypatch, report, "write_text_atomic", signals)  # metrics.json
    monkeypatch.setattr(plots, "rate_quality_plot", lambda *a: os.kill(os.getpid(), signals.pop(0)))
    with caplog.at_level(logging.WARNING):
        code, stdout, err = run_cli(capsys, *args, "--limit", 12)
    assert (code, signals) == (130, []), err
    said = f"SIGINT again: stopped at once; {out / 'metrics.json'} holds the scores, without rate_quality.png"
    assert said in caplog.text and "no scores written" not in caplog.text and not stdout
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 12
    assert not (out / "rate_quality.png").exists()


def write_class_folder(root: Path, images: torch.Tensor, labels: list[int], names: list[str]) -> None:
    """An image folder in the ImageNet layout: root/<class name>/<i>.png."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / names[label] / f"{i:03d}.png")


def test_a_class_folder_reference_is_labelled_by_its_sub_folders(tmp_path, monkeypatch, caplog):
    """`--data FOLDER --semantic`: the folder's images are the reference, labelled by their class
    sub-folders (they had no labels, so no reference accuracy); a folder of one class is refused."""
    monkeypatch.setattr(semantic, "CLASSIFIER_STEPS", 40)
    monkeypatch.setattr(semantic, "FOLDER_CLASSIFIER_SIZE", 16)
    digits = build_eval_dataset("digits", 16)
    picked = [i for i in range(60) if digits[i][1] < 3][:24]
    images = torch.stack([to_uint8(digits[i][0]) for i in picked])
    labels = [digits[i][1] for i in picked]
    names = ["0-zero", "1-one", "2-two"]  # sorted: the folder's classes in label order
    write_class_folder(tmp_path / "data", images, labels, names)
    write_sample_folder(tmp_path / "s", images[:6], labels[:6])
    for f in (tmp_path / "s").glob("0*.png"):  # as `smapctl sample` names them: label_classname_index
        label = int(f.name[:4])
        f.rename(f.with_name(f"{label:04d}_{names[label]}_{f.name.rsplit('_', 1)[1]}"))
    out = evaluate_images(
        samples=tmp_path / "s", data=str(tmp_path / "data"), semantic=True, out=tmp_path / "e"
    )
    block = out.report["semantic"]
    assert block["classifier_classes"] == 3 and in_unit_interval(block["reference_acc"])
    assert in_unit_interval(out.report["metrics"]["class_acc"])
    # Sub-folders that are not all the classifier's classes: no labels, and said when some are.
    ref = image_sets.read_image_set(tmp_path / "data")
    assert ref.labels is None and ref.folder_classes[0] == names
    assert torch.equal(image_sets.labelled_by_folder(ref, names[2:] + names[:2]).labels, 
                       torch.tensor([[1, 2, 0][y] for y in sorted(labels)]))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert image_sets.labelled_by_folder(ref, names[:2]).labels is None
    assert "sub-folder(s) 2-two are not classes of the classifier" in caplog.text
    # A loose image at the top: not the ImageNet layout, no class labels.
    shutil.copy(next((tmp_path / "data" / names[0]).iterdir()), tmp_path / "data" / "loose.png")
    assert image_sets.read_image_set(tmp_path / "data").folder_classes is None
    # One class: every image "right", the scores would say nothing.
    write_class_folder(tmp_path / "one", images[:4], [0, 0, 0, 0], names)
    (tmp_path / "one" / names[1]).mkdir()  # an empty class folder: a class without images
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="smapctl"),
        pytest.raises(
            UserError, match=r"--semantic: .*one has images of a single class \(0-zero\); a classifier needs"
        ),
    ):
        evaluate_images(
            samples=tmp_path / "s", data=str(tmp_path / "one"), semantic=True, out=tmp_path / "e1"
        )
    assert "reading the reference classifier's training images" not in caplog.text  # refused before


def test_a_sample_folder_without_its_grid_is_said_to_be_unfinished(tmp_path, caplog):
    """`smapctl sample` writes grid.png last: without it the folder is an interrupted run's, whose classes
    may be missing or (an interrupted --overwrite) mixed with an earlier run's images."""
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1])
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        generation._warn_if_unfinished(tmp_path / "s")
        assert caplog.text == ""
        (tmp_path / "s" / "grid.png").unlink()
        generation._warn_if_unfinished(tmp_path / "s")
    assert "but no grid.png, which it writes last" in caplog.text
    assert "Some classes may be missing, or hold an earlier run's images beside this one's" in caplog.text


def test_npz_samples_of_other_classes_are_refused_as_a_folder_of_them_is(tmp_path, quick_classifier):
    """An .npz's `arr_1` labels are named by the sampling.json `smapctl sample --npz` writes beside it:
    samples of classes 'cat' and 'dog' scored with digits' classifier were scored as digits 0 and 1."""
    folder = tmp_path / "s"
    folder.mkdir()
    write_npz(folder / "samples.npz", np.zeros((4, 16, 16, 3), np.uint8), np.array([0, 0, 1, 1]))
    settings = {"generator": str(tmp_path / "gone"), "seed": 0, "class_names": ["cat", "dog"]}
    (folder / "sampling.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match=r"class names in its sampling.json call class 0 'cat', digits calls"):
        evaluate_images(samples=folder / "samples.npz", data="digits", out=tmp_path / "e")
    # The generator's own classes pass; metrics.json keeps the sampling settings, not the class list.
    settings["class_names"] = [str(i) for i in range(10)]
    (folder / "sampling.json").write_text(json.dumps(settings))
    out = evaluate_images(samples=folder / "samples.npz", data="digits", out=tmp_path / "e")
    assert out.report["sampled_with"] == {"generator": str(tmp_path / "gone"), "seed": 0}
    assert in_unit_interval(out.report["metrics"]["class_acc"])


def test_a_generator_given_as_checkpoint_is_pointed_to_generator(gen_run, tmp_path, capsys):
    """`evaluate --checkpoint GEN` said "a generator checkpoint, not a tokenizer" and no more."""
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", gen_run, "--out", tmp_path / "e")
    [line] = error_lines(err)
    assert code == 1 and "a generator checkpoint, not a tokenizer" in line
    assert line.endswith(f"; to score its samples: smapctl evaluate --generator {gen_run}")


def test_a_label_equal_to_the_number_of_classes_is_past_them(tmp_path):
    """Labels are 0 .. n - 1: an .npz label 10 scored with digits' 10 classes is refused."""
    write_npz(tmp_path / "s.npz", np.zeros((2, 16, 16, 3), np.uint8), np.array([9, 10]))
    samples = read_image_set(tmp_path / "s.npz")
    digits = [str(i) for i in range(10)]
    with pytest.raises(UserError, match=r"s\.npz: label 10 but digits has 10 classes$"):
        image_sets.check_sample_classes(samples, digits, "digits")
    image_sets.check_sample_classes(read_image_set(tmp_path / "s.npz", limit=1), digits, "digits")  # [9]


def test_an_unreadable_sample_file_takes_its_label_with_it(tmp_path):
    """The labels of a `smapctl sample` folder are those of the images read: a broken file in the middle
    shifted the later images onto the labels before them."""
    images = torch.stack([torch.full((3, 8, 8), 40 * i, dtype=torch.uint8) for i in range(3)])
    write_sample_folder(tmp_path / "s", images, [0, 1, 2])
    (tmp_path / "s" / "0001_1_00001.png").write_bytes(b"")
    read = read_image_set(tmp_path / "s")
    assert read.labels.tolist() == [0, 2] and [int(im[0, 0, 0]) for im in read.images] == [0, 80]
    assert [e.path for e in read.skipped] == [str(tmp_path / "s" / "0001_1_00001.png")]


def test_every_image_of_a_large_set_is_resized(tmp_path):
    """Images are resized 256 at a time: none may be lost between the chunks."""
    images = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    write_npz(tmp_path / "many.npz", images, np.arange(300) % 10)
    read = read_image_set(tmp_path / "many.npz", size=4)
    assert read.images.shape == (300, 3, 4, 4) and len(read.labels) == 300
    last = read_image_set(write_npz(tmp_path / "last.npz", images[-1:]), size=4).images
    assert torch.equal(read.images[-1:], last)


def test_limit_picks_from_a_builtin_dataset_too():
    digits = build_eval_dataset("digits", 16)
    read = read_image_set("digits", size=16, limit=5)
    picked = limit_indices(len(digits), 5)
    assert read.images.shape == (5, 3, 16, 16)
    assert read.labels.tolist() == [digits[i][1] for i in picked]
    assert torch.equal(read.images[0], to_uint8(digits[picked[0]][0]))


def test_class_folders_of_none_of_the_classifiers_classes_are_not_warned_about(tmp_path, caplog):
    """Only a folder whose sub-folders are partly the classifier's classes is worth a warning (a typo);
    one of other classes altogether is scored without labels, as any folder."""
    write_class_folder(tmp_path / "data", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 1], ["cat", "dog"])
    ref = read_image_set(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert image_sets.labelled_by_folder(ref, ["0", "1"]).labels is None
        assert "not classes of the classifier" not in caplog.text
        assert image_sets.labelled_by_folder(ref, ["cat", "0"]).labels is None
    assert "sub-folder(s) dog are not classes of the classifier" in caplog.text


def test_the_report_file_is_strict_json_and_two_prefixes_have_a_plot(tmp_path):
    """A perfect reconstruction's PSNR (inf) is null in metrics.json, not `Infinity`, which strict JSON
    readers refuse; two prefixes are already a rate-quality curve, one is not."""

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))

    rows = [{"k": 0, "psnr": 12.5, "ssim": 0.25}, {"k": 8, "psnr": math.inf, "ssim": 1.0}]
    files = report.write_report({"task": "reconstruction", "rows": rows}, tmp_path)
    assert files == [tmp_path / "metrics.json", tmp_path / "rate_quality.png"]
    written = strict((tmp_path / "metrics.json").read_text())
    assert [r["psnr"] for r in written["rows"]] == [12.5, None]
    assert (tmp_path / "rate_quality.png").is_file()
    assert report.write_report({"task": "reconstruction", "rows": rows[1:]}, tmp_path) == [
        tmp_path / "metrics.json"
    ]
    assert not (tmp_path / "rate_quality.png").exists()


def test_the_notes_say_the_class_checks_as_measured():
    sem = {
        "class_only_acc": 0.0,  # a decoder that ignores the class: said, not left out
        "cross_class_acc": {"k0": 0.75, "kK": 0.125},
        "reference_acc": 0.9,
        "classifier_data": "digits",
        "reference_acc_images": "digits:val",
        "classifier_classes": 10,
    }
    notes = report.report_notes({"task": "reconstruction", "semantic": sem, "num_tokens": 8})
    assert notes == [
        "class only (k=0): 0.0% classified as their class",
        "cross-reconstruction (decoded with class (y+1) mod C): 75.0% follow it at k=0, 12.5% at k=8",
        "reference classifier (digits): 90.0% on digits:val",
        f"* {semantic.CLF_FD_NOTE}",
    ]
    assert report.report_notes({"task": "reconstruction", "semantic": None}) == []


class _GreyLevels(torch.nn.Module):
    """A stand-in reference classifier that knows images by their grey level: class c is -0.75 + 0.5 c."""

    image_size = 16

    def features(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]  # (B, 1)

    def head(self, feats):
        return -((feats - (-0.75 + 0.5 * torch.arange(4))) ** 2)  # (B, 4): the nearest level wins


class _ClassPainter:
    """A stand-in tokenizer of 4 tokens and 4 classes whose decoder paints a class's grey level: the class
    it is given from no token (but class 1 for class 0), the image's own class from all K, and class 3 in
    between."""

    class cfg:
        image_size, class_condition, num_classes = 16, True, 4

    def encode(self, x, y):
        from types import SimpleNamespace

        return SimpleNamespace(z=y[:, None, None].float().expand(-1, 4, 2))  # (B, K, C): its class

    def decode(self, z, c):
        k, own = z.shape[1], (z[:, 0, 0] if z.shape[1] else c).long()
        painted = torch.where(c == 0, 1, c) if k == 0 else own if k == 4 else torch.full_like(own, 3)
        return (-0.75 + 0.5 * painted.float())[:, None, None, None].expand(-1, 3, 16, 16)


@pytest.mark.parametrize("prefixes", [[0, 2, 4], [2, 4]])
def test_the_class_checks_score_each_decoding_against_its_class(prefixes):
    """Per prefix, class accuracy and clf-FD are of that prefix's reconstructions; class-only decoding is
    scored at k=0 even when k=0 is not a prefix asked for; cross-reconstructions (decoded with (y+1) mod C)
    are scored against that class, from no token and from all K."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    labels = torch.tensor([0, 0, 0, 1, 2, 3, 1, 2])
    images = (-0.75 + 0.5 * labels.float())[:, None, None, None].expand(-1, 3, 16, 16)
    ref = semantic.SemanticReference(_GreyLevels(), "levels", list("abcd"))
    tally = semantic.SemanticTally(ref, torch.device("cpu"))
    data = reconstruction.EvalImages(TensorDataset(images, labels), 16)
    tok = SimpleNamespace(model=_ClassPainter())
    recon = reconstruction.reconstruct(
        tok, data, prefixes, batch_size=3, device=torch.device("cpu"), tally=tally
    )
    assert recon.num_images == 8
    scores = {r["k"]: reconstruction._prefix_scores(r["k"], tally, None, None, 3, "cpu") for r in recon.rows}
    expected = {0: 0.625, 2: 0.125, 4: 1.0}  # k=0: the three of class 0 painted 1; k=2: one of class 3
    assert {k: s["class_acc"] for k, s in scores.items()} == {k: expected[k] for k in prefixes}
    assert scores[2]["clf_fd"] > 0.1 and scores[4]["clf_fd"] == pytest.approx(0.0, abs=1e-6)
    assert reconstruction._class_scores(tally, True) | {"cross_class_rule": None} == {
        "class_only_acc": 0.625,
        "cross_class_acc": {"k0": 0.875, "kK": 0.0},  # from no token, only the one of class 3 (c = 0) fails
        "cross_class_rule": None,
    }


def test_the_weights_asked_for_are_the_weights_scored(tok_run, tmp_path, capsys):
    """--weights model reconstructs with the trained weights (not their EMA) and metrics.json and the table
    say so, with the checkpoint's step."""
    args = ("evaluate", "--checkpoint", tok_run, "--prefix", "2,8", "--limit", 8, "--no-semantic")
    reports = {}
    for weights in ("ema", "model"):
        code, stdout, err = run_cli(capsys, *args, "--weights", weights, "--out", tmp_path / weights)
        assert code == 0, err
        reports[weights] = json.loads((tmp_path / weights / "metrics.json").read_text())
        assert f"(8 images, {weights} weights)" in stdout
    assert reports["model"]["weights"] == "model" and reports["ema"]["weights"] == "ema"
    assert reports["model"]["step"] == reports["ema"]["step"] == 3
    assert reports["model"]["rows"][1]["psnr"] != reports["ema"]["rows"][1]["psnr"]


def _grey(labels: list[int]) -> torch.Tensor:
    """uint8 images (N, 3, 16, 16) of the grey levels `_GreyLevels` knows the classes by."""
    return to_uint8((-0.75 + 0.5 * torch.tensor(labels).float())[:, None, None, None].expand(-1, 3, 16, 16))


def test_samples_are_scored_against_the_semantic_reference_they_are_given():
    """clf-FD is between the samples and the real images; with a reference of Inception statistics alone
    the semantic scores (the classifier's accuracy on real images among them) take --data's images."""
    ref = semantic.SemanticReference(_GreyLevels(), "levels", list("abcd"))
    samples = image_sets.ImageSet(_grey([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 2, 3, 1, 1]), "samples")
    real = image_sets.ImageSet(_grey([0, 0, 3, 3]), torch.tensor([0, 0, 3, 2]), "real")
    stats_alone = image_sets.ImageSet(torch.empty(0, 3, 16, 16, dtype=torch.uint8), None, "stats.npz")
    kwargs = dict(semantic=ref, fidelity=None, batch_size=4, device=torch.device("cpu"))
    metrics, block = generation.score_samples(samples, real, **kwargs)
    assert metrics["num_samples"] == 6 and metrics["class_acc"] == pytest.approx(5 / 6)
    assert metrics["clf_fd"] > 0.1 and block["reference_acc"] == 0.75
    same, _ = generation.score_samples(samples, samples, **kwargs)
    assert same["clf_fd"] == pytest.approx(0.0, abs=1e-6)
    # Samples without classes (an .npz without arr_1): no class accuracy, not `"class_acc": null`.
    unlabelled = image_sets.ImageSet(samples.images, None, "samples")
    metrics, _ = generation.score_samples(unlabelled, real, **kwargs)
    assert "class_acc" not in metrics and metrics["clf_fd"] > 0.1
    metrics, block = generation.score_samples(samples, stats_alone, semantic_reference=real, **kwargs)
    assert block["reference_acc"] == 0.75 and block["reference_acc_images"] == "real"
    assert metrics["clf_fd"] > 0.1


def test_limit_takes_a_subset_of_the_samples_and_the_skip_list_names_the_first_three(tmp_path):
    write_sample_folder(tmp_path / "samples", _grey([0, 1, 2, 3] * 3), [0, 1, 2, 3] * 3)
    sample_set, source, _ = generation._read_samples(tmp_path / "samples", None, None, 5, "skip")
    assert len(sample_set.images) == len(sample_set.labels) == 5 and source["samples"].endswith("samples")
    skipped = [image_sets.BadImageError(tmp_path / f"{i}.png", "empty file") for i in range(5)]
    block = common.skip_block(skipped, tmp_path)
    assert block["count"] == 5 and block["first"] == [str(e) for e in skipped[:3]]
    assert len((tmp_path / "skipped_images.txt").read_text().splitlines()) >= 5


def test_a_classifier_of_other_classes_is_refused_with_semantic_else_warned(
    quick_classifier, caplog, monkeypatch
):
    """The digits classifier cannot score a model of other classes: --semantic is an error, by default a
    warning and no semantic scores; the names shown are all there are, with `...` only after the fifth.
    Both before the classifier is trained (`evaluate --generator` of digits with --data photos trained the
    photos classifier for minutes first)."""
    train = semantic.load_or_train_classifier
    monkeypatch.setattr(semantic, "load_or_train_classifier", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(UserError) as e:
        common.choose_semantic("digits", None, True, ["cat", "dog"])
    assert str(e.value) == (
        "--semantic: the reference classifier's classes (digits: 0, 1, 2, 3, 4 ...) are not the model's "
        "(cat, dog)"
    )
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert common.choose_semantic("digits", None, None, ["cat", "dog"]) is None
    assert "are not the model's (cat, dog); no semantic scores" in caplog.text
    monkeypatch.setattr(semantic, "load_or_train_classifier", train)
    assert common.choose_semantic("digits", None, None, [str(d) for d in range(10)]) is not None


def test_a_builtin_reference_of_other_classes_is_refused_with_semantic_else_warned(
    tmp_path, capsys, caplog, monkeypatch
):
    """Digit samples with --ref photos:val had the photos' labels scored by the digits classifier: a
    `reference_acc` of nothing, without a word. Refused as a classifier of other classes is (before it
    trains), or, without --semantic, no semantic scores and a warning."""
    monkeypatch.setattr(semantic, "load_or_train_classifier", lambda *a, **k: pytest.fail("trained first"))
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [3, 7])
    code, _, err = run_cli(
        capsys, "evaluate", "--samples", tmp_path / "s", "--data", "digits", "--ref", "photos:val",
        "--semantic", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 1 and error_lines(err) == [
        "error: --semantic: --ref photos:val: its classes (astronaut, chelsea, coffee, rocket, motorcycle"
        " ...) are not the reference classifier's (digits: 0, 1, 2, 3, 4 ...)"
    ]
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert common.choose_semantic("digits", None, None, None, reference="photos:val") is None
    assert "are not the reference classifier's (digits: 0, 1, 2, 3, 4 ...); no semantic scores" in caplog.text


def test_samples_past_the_classes_are_refused_naming_the_classes_first(tmp_path):
    """Digit samples 0..9 scored with photos' 9 classes were refused as "label 9 but photos has 9 classes";
    the class names (photos calls class 0 'astronaut') say what is wrong."""
    write_sample_folder(tmp_path / "s", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 9])
    photos = build_eval_dataset("photos:val", 16).class_names
    with pytest.raises(UserError, match=rf"its file names call class 0 '0', photos calls it '{photos[0]}'"):
        image_sets.check_sample_classes(read_image_set(tmp_path / "s"), photos, "photos")


def test_the_skipped_images_are_named_by_their_absolute_paths(tmp_path, monkeypatch):
    """`evaluate --samples s` listed `s/0001_1_00003.png` in metrics.json and skipped_images.txt: a path
    that means nothing from anywhere else."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    skipped = [image_sets.BadImageError(Path("link") / "0001_1_00003.png", "empty file")]
    block = common.skip_block(skipped, tmp_path)
    named = str(tmp_path.resolve() / "real" / "0001_1_00003.png")
    assert block["first"] == [f"{named}: empty file"]
    assert (tmp_path / "skipped_images.txt").read_text() == f"{named}\tempty file\n"


def test_each_reference_count_is_that_of_the_images_its_scores_used():
    """With --ref an .npz of Inception statistics alone, `num_reference` was 0 while the semantic scores
    had used --data's images: it is null (no image of it was used) and the semantic block counts those."""
    ref = semantic.SemanticReference(_GreyLevels(), "levels", list("abcd"))
    samples = image_sets.ImageSet(_grey([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), "samples")
    real = image_sets.ImageSet(_grey([0, 0, 3, 3, 1]), torch.tensor([0, 0, 3, 2, 1]), "real")
    stats_alone = image_sets.ImageSet(torch.empty(0, 3, 16, 16, dtype=torch.uint8), None, "stats.npz")
    kwargs = dict(semantic=ref, fidelity=None, batch_size=4, device=torch.device("cpu"))
    _, block = generation.score_samples(samples, stats_alone, semantic_reference=real, **kwargs)
    assert block["num_reference_images"] == 5 and block["reference_acc_images"] == "real"
    assert generation._reference_block(stats_alone, True)["num_reference"] is None
    assert generation._reference_block(real, False)["num_reference"] == 5


def test_a_generator_evaluation_into_a_run_folder_is_refused_before_anything_is_written(
    gen_run, tmp_path, capsys
):
    """`evaluate --generator RUN --out RUN` drew into RUN/samples (training's preview folder) and wrote
    metrics.json among the run's files when it held no preview yet."""
    run = tmp_path / "run"
    shutil.copytree(gen_run, run, ignore=shutil.ignore_patterns("samples", ".lock"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, _, err = run_cli(capsys, "evaluate", "--generator", run, "--num", "4", "--out", run)
    assert code == 1 and error_lines(err) == [
        f"error: --out {run}: a training run's folder; the samples `evaluate --generator` draws go into"
        " OUT/samples, where training writes its previews: choose another --out (default: <run>/eval)"
    ]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


def test_a_num_rounded_up_to_whole_classes_is_said(gen_run, tmp_path, caplog, monkeypatch):
    """`--num 25` of 10 classes drew 30 samples, said in --help alone."""

    def stop(*args, **kwargs):
        raise UserError("drawn here")

    monkeypatch.setattr(generation, "choose_semantic", lambda *a, **k: object())  # no classifier trained
    monkeypatch.setattr(generation, "_draw_samples", stop)
    for num in (25, 30):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="smapctl"), pytest.raises(UserError, match="drawn here"):
            generation.evaluate_generation(generator=gen_run, num=num, out=tmp_path / "e")
        said = [r.getMessage() for r in caplog.records if "--num is rounded up" in r.getMessage()]
        assert said == (
            ["drawing 30 samples, not 25: 3 of each of the 10 classes (--num is rounded up to whole classes)"]
            if num == 25
            else []
        )


def test_an_out_inside_the_images_it_evaluates_is_refused(tok_run, gen_run, tmp_path, capsys):
    """`--data data -o data/3/eval` wrote rate_quality.png among the 3s (a plot the next evaluate or
    training read as a digit, a folder changed since for --resume); `evaluate --generator` drew its samples
    there."""
    data = tmp_path / "data"
    for name in ("0", "3"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(data / name / "a.png")
    before = snapshot(data)
    for args, out in (
        (("--checkpoint", tok_run, "--no-semantic", "--prefix", "0,8"), data / "3" / "eval"),
        (("--generator", gen_run, "--num", 10), data / "g"),
    ):
        code, _, err = run_cli(capsys, "evaluate", *args, "--data", data, "-o", out)
        assert code == 1 and "Traceback" not in err
        assert error_lines(err) == [
            f"error: --out {out}: inside --data {data}, whose images it reads; what evaluate writes would"
            " join them: choose another --out"
        ]
        assert snapshot(data) == before


class _GreyImagesSignallingAsTheSecondWorkerStarts(SignalsAsItsSecondWorkerStarts):
    def __getitem__(self, i):
        return torch.zeros(3, 16, 16), 0


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_signal_while_the_image_reading_workers_start_stops_evaluate_without_a_traceback(
    method, monkeypatch
):
    """A Ctrl-C or SIGTERM while the workers reading an image folder started under `forkserver` (Python
    3.14's default on Linux) or `spawn` stopped evaluate with torch's traceback from the half-made
    DataLoader iterator ("no attribute '_workers_status'"). The signal now waits until they have
    started; the command's handler then stops it and the workers."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    monkeypatch.setattr(reconstruction, "DataLoader", partial(DataLoader, multiprocessing_context=method))
    monkeypatch.setattr(reconstruction.EvalImages, "workers", 2)  # as for an image folder
    data = reconstruction.EvalImages(_GreyImagesSignallingAsTheSecondWorkerStarts(), 16)
    tok = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(image_size=16)))
    with stopped_as_the_second_worker_starts(monkeypatch):
        reconstruction.reconstruct(tok, data, [1], batch_size=2, device=torch.device("cpu"))


def test_an_out_folder_that_cannot_be_written_is_said_before_anything_is_scored(
    tmp_path, capsys, monkeypatch
):
    """`evaluate --samples S --out OUT` into a folder without write permission (or on a read-only mount)
    scored every sample (an Inception pass of hours on a CPU) before metrics.json could not be written.
    Said at once, as tokenize says it of its -o (os.access simulated: tests run as root too)."""
    samples, out = tmp_path / "s", tmp_path / "out"
    write_sample_folder(samples, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [0, 1])
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == out else real(p, m, *a, **k))
    monkeypatch.setattr(generation, "score_samples", lambda *a, **k: pytest.fail("scored first"))
    monkeypatch.setattr(semantic, "load_or_train_classifier", lambda *a, **k: pytest.fail("trained first"))
    code, _, err = run_cli(capsys, "evaluate", "--samples", samples, "--data", "digits", "--out", out)
    assert code == 1 and error_lines(err) == [
        f"error: {out}: could not write the output folder (Permission denied): write somewhere you may"
    ], err
    assert not any(out.iterdir())
