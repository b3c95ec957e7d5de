"""`smapctl evaluate --samples / --generator` (smapctl/eval/generation.py): generation metrics of sample
folders, ADM .npz files and a generator sampled on the spot, the image sets they are read as (a reference
folder too large for memory taken as its Inception statistics), the offline Inception plumbing (random
weights) and the class checks of samples."""

import hashlib
import json
import logging
import math
import os
import shutil
import signal
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_helpers import ROOT, _GreyLevels, in_unit_interval, write_sample_folder
from faults import add_broken_images, without_blocking_on
from PIL import Image
from tiny_tokenizer import error_lines, run_cli

from smapctl.data.config import DataConfig
from smapctl.data.datasets import build_eval_dataset
from smapctl.data.images import to_uint8
from smapctl.errors import UserError
from smapctl.eval import common, generation, image_sets, report, semantic
from smapctl.eval.evaluate import evaluate_images
from smapctl.eval.image_sets import limit_indices, read_image_set
from smapctl.eval.npz import read_npz, write_npz
from smapctl.recipe import load_generator_recipe


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
    machine_of(monkeypatch, 2 * 16 * 3 * 16 * 16)  # the 17 files left are too many, else held and read
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
    assert caplog.text.count("interrupted") == 1  # (not "no scores written" after it)
    assert not (out / "metrics.json").exists()


def test_an_interrupt_before_or_after_an_evaluations_drawing_is_said(
    gen_run, tmp_path, monkeypatch, caplog, quick_classifier
):
    """Ctrl-C as `evaluate --generator` trained its classifier or scored its samples (minutes each) ended
    it without a word, exit 130: the scores are not written, and once drawn, the samples are kept."""
    out = tmp_path / "eval"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        m.setattr(generation, "choose_semantic", interrupted)  # before the drawing
        evaluate_images(generator=gen_run, num=10, batch_size=10, out=out)
    assert "interrupted: no scores written (metrics.json is written once all are computed)" in caplog.text
    assert not out.exists()
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        m.setattr(generation, "score_samples", interrupted)
        evaluate_images(generator=gen_run, num=10, batch_size=10, out=out)
    samples = out / "samples"
    said = f"interrupted: no scores written; the 10 samples drawn are in {samples} (`smapctl evaluate"
    assert said in caplog.text and caplog.text.count("interrupted") == 1
    assert len(list(samples.glob("*.png"))) == 11  # with grid.png


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


@pytest.mark.slow
def test_a_launched_generator_evaluation_shares_the_drawing_and_scores_once(
    gen_run, random_inception_weights, tmp_path
):
    """`evaluate --generator` refused a launcher (the 50,000 samples of the paper's gFID drawn on one GPU
    of eight): now the processes share the drawing as `smapctl sample`'s do, and the main one scores.
    The samples and scores are those of one process (of one thread, as torchrun gives each)."""
    from tiny_tokenizer import torchrun

    args = ("--generator", gen_run, "--batch-size", 4, "--no-semantic", "--is", "--fid", "--limit", 40)
    args += ("--inception-weights", random_inception_weights)
    r = torchrun("evaluate", *args, "--num-samples", 20, "-o", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("generation: ") == 1 and r.stdout.count("metrics: ") == 1  # the main one's
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # (numpy's BLAS too: gFID's matrix square root rounds otherwise with two threads)
        with threadpool_limits(limits=1):
            alone = evaluate_images(
                generator=gen_run, num=20, batch_size=4, semantic=False, isc=True, fid=True, limit=40,
                inception_weights=random_inception_weights, out=tmp_path / "one",
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"] == alone.report["metrics"] and two["metrics"]["num_samples"] == 20
    assert {k: v for k, v in two.items() if k != "samples"} == {
        k: v for k, v in alone.report.items() if k != "samples"
    }
    names = sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "samples").iterdir())
    for name in (n for n in names if n.endswith(".png")):
        pixels = [np.asarray(Image.open(tmp_path / run / "samples" / name)) for run in ("one", "two")]
        assert np.array_equal(*pixels), name


@pytest.mark.slow
def test_a_launched_generator_evaluation_refused_by_the_main_process_stops_every_process(gen_run, tmp_path):
    """The main process alone holds the output folder and checks the semantic scores' classes before the
    drawing: its refusal is every process's (each exits 1, the line printed once; the other process had
    waited for the drawing), and the folder it made is gone again."""
    from tiny_tokenizer import before_torchrun, torchrun

    out = tmp_path / "ev"
    r = torchrun("evaluate", "--generator", gen_run, "--semantic", "--data", "photos", "-o", out)
    assert r.returncode == 1 and not out.exists()
    ours = before_torchrun(r.stderr)
    assert error_lines(ours) == [
        "error: --semantic: the reference classifier's classes (photos: astronaut, chelsea, coffee, rocket, "
        "motorcycle ...) are not the model's (0, 1, 2, 3, 4 ...)"
    ], ours
    assert r.stderr.count("exitcode  : 1") == 2  # both processes, with the error's status


# `smapctl` as a launched process that waits 8 s (not 30) for the main process to exit with an error that
# only this process met.
SHORT_GRACE = """\
import sys

from smapctl import cli
from smapctl.cli import process

process.MAIN_PROCESS_GRACE = 8.0
sys.argv[0] = "smapctl"
cli.main()
"""


@pytest.mark.slow
def test_a_launched_generator_evaluation_another_node_cannot_start_stops_every_process(
    gen_run, random_inception_weights, tmp_path
):
    """Two nodes, the second without a copy of the generator: it stopped before the processes had joined,
    and the main process waited for it to join, up to the process group's 60 minutes. Now the processes
    join first: the second node names its problem and both stop within seconds, with no folder left."""
    from tiny_tokenizer import before_torchrun, two_nodes

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    shutil.copytree(gen_run, folders[0] / "gen")  # (node 1 has no copy)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(SHORT_GRACE)
    out = tmp_path / "ev"
    args = ("evaluate", "--generator", "gen", "--num-samples", 20, "--batch-size", 4, "--no-semantic", "--is")
    args += ("--inception-weights", random_inception_weights, "-o", out)
    outputs = two_nodes(*args, cwds=folders, script=launcher, timeout=100)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    assert ours[1].count("error: process 1 of the launch: gen: no such checkpoint or run folder") == 1, ours
    assert not out.exists()


@pytest.mark.slow
def test_only_the_main_process_of_a_launched_generator_evaluation_reads_the_inception_weights(
    gen_run, random_inception_weights, tmp_path
):
    """Every process of `evaluate --generator` read and checked the Inception weights (92 MB, and a
    model built from them), though the main one alone scores: a node without a copy stopped the run
    ("Inception weights file not found", said by its process after the main one had waited for it). Now
    only the main process reads them; a missing file there stops every process, said once."""
    from tiny_tokenizer import before_torchrun, error_lines, two_nodes

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
        shutil.copytree(gen_run, folder / "gen")
    shutil.copy(random_inception_weights, folders[0] / "inception.pth")  # (node 1 has no copy)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(SHORT_GRACE)
    out = tmp_path / "ev"
    args = ("evaluate", "--generator", "gen", "--num-samples", 20, "--batch-size", 4, "--no-semantic", "--is")
    outputs = two_nodes(
        *args, "--inception-weights", "inception.pth", "-o", out, cwds=folders, script=launcher
    )
    assert [status for status, _, _ in outputs] == [0, 0], outputs
    assert json.loads((out / "metrics.json").read_text())["metrics"]["num_samples"] == 20
    # The main node without a copy: every process stops before the drawing, the line said once.
    out = tmp_path / "ev2"
    outputs = two_nodes(*args, "--inception-weights", "inception.pth", "-o", out, cwds=folders[::-1])
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    said = [line for _, _, err in outputs for line in error_lines(before_torchrun(err))]
    assert said == ["error: --inception-weights: Inception weights file not found: inception.pth"], outputs
    assert not out.exists()


@pytest.mark.slow
def test_a_launched_generator_evaluation_on_nodes_that_do_not_share_its_out_names_it(
    gen_run, random_inception_weights, tmp_path
):
    """Nodes that each have their own folder for `-o keep/ev`: the error named `-o keep/ev/samples`, an
    option nobody gave (the samples go into OUT/samples), and node 1 kept an empty keep/ev/samples. Now it
    names `-o keep/ev`, and each node is left as it was (node 1's `keep`, there before, stays)."""
    from tiny_tokenizer import before_torchrun, error_lines, two_nodes

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    (folders[1] / "keep").mkdir()
    args = (
        "evaluate",
        "--generator",
        gen_run,
        "--num-samples",
        20,
        "--batch-size",
        4,
        "--no-semantic",
        "--is",
    )
    outputs = two_nodes(*args, "--inception-weights", random_inception_weights, "-o", "keep/ev", cwds=folders)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    said = [line for _, _, err in outputs for line in error_lines(before_torchrun(err))]
    assert len(said) == 1 and said[0].startswith("error: -o keep/ev: process 1 of the launch does not see"), (
        said
    )
    assert not (folders[0] / "keep").exists()
    assert (folders[1] / "keep").is_dir() and not list((folders[1] / "keep").iterdir())


# `smapctl` as a launched process whose rank 1 sends itself a signal as it draws a batch: SIGNAL_AT_BATCH
# names them ("SIGTERM 1": SIGTERM as it draws its first batch).
SIGNAL_AT_A_BATCH = """\
import os
import signal
import sys

from smapctl.ops import sample

name, at = os.environ["SIGNAL_AT_BATCH"].split()
real, calls = sample.draw, []


def draw(*args, **kwargs):
    batch = real(*args, **kwargs)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == int(at):
        os.kill(os.getpid(), signal.Signals[name])
    return batch


sample.draw = draw
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


def _launched_evaluation_signalled(
    signalled: str, num: int, batch_size: int, inception, gen_run, tmp_path, mp
):
    """`evaluate --generator` under torchrun, its second process signalling itself as `SIGNAL_AT_A_BATCH`
    says -> (the processes' exit statuses, sorted; stderr; the output folder)."""
    import re

    from tiny_tokenizer import torchrun

    mp.setenv("SIGNAL_AT_BATCH", signalled)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(SIGNAL_AT_A_BATCH)
    out = tmp_path / "ev"
    args = ("evaluate", "--generator", gen_run, "--num-samples", num, "--batch-size", batch_size)
    r = torchrun(*args, "--no-semantic", "--is", "--inception-weights", inception, "-o", out, script=launcher)
    return sorted(re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)), r.stderr, out


@pytest.mark.slow
def test_a_signal_to_one_process_of_a_launched_generator_evaluation_stops_each_with_its_status(
    gen_run, random_inception_weights, tmp_path, monkeypatch
):
    """SIGTERM to one process as the processes of `evaluate --generator` drew: they stopped after the same
    round, as `sample`'s do, but each exited 130 (the one that received it too), not 143, and left the
    process group open. Now each leaves with the signal's status, as `sample`'s processes do."""
    statuses, err, out = _launched_evaluation_signalled(
        "SIGTERM 1", 40, 4, random_inception_weights, gen_run, tmp_path, monkeypatch
    )
    assert statuses == ["143", "143"], err[-3000:]
    assert err.count("interrupted: ") == 1 and "of 40 images written" in err, err[-3000:]
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_signal_in_the_last_round_of_a_launched_generator_evaluations_drawing_stops_it(
    gen_run, random_inception_weights, tmp_path, monkeypatch
):
    """20 samples in batches of 5: rounds (0, 1) and (2, 3), the second process drawing batches 1 and 3.
    SIGINT as it drew the last one let the drawing finish, as `sample`'s, which said "the sampling is
    complete", and the evaluation went on to score the samples (minutes for 50,000) and exited 0: the
    Ctrl-C was lost. Now every process stops there (130 each), the samples kept complete, and said."""
    statuses, err, out = _launched_evaluation_signalled(
        "SIGINT 2", 20, 5, random_inception_weights, gen_run, tmp_path, monkeypatch
    )
    assert statuses == ["130", "130"], err[-3000:]
    said = f"interrupted: no scores written; the 20 samples drawn are in {out / 'samples'}"
    assert err.count(said) == 1 and err.count("interrupted") == 1, err[-3000:]
    assert "complete" not in err and not (out / "metrics.json").exists()
    assert len(list((out / "samples").glob("0*.png"))) == 20 and (out / "samples" / "grid.png").is_file()


def test_npz_labels_are_int64_class_ids_and_anything_else_is_refused(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    path = write_npz(tmp_path / "s.npz", images, np.array([2, 0, 1], np.int32))
    with np.load(path) as data:
        assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [2, 0, 1]
    for labels in (np.array([0.0, 1.0, 2.0]), np.array([0, 1]), np.array([[0, 1, 2]])):
        with pytest.raises(ValueError, match=r"expected \(3,\) integers"):
            write_npz(tmp_path / "bad.npz", images, labels)
    assert not (tmp_path / "bad.npz").exists()


def test_an_npzs_labels_take_their_names_from_its_sampling_json_and_past_them_none():
    """`_name_npz_classes`: each label the .npz holds is named by its sampling.json's class names; a label
    past them (refused later, naming the classes) gets no name and no IndexError; a folder's names stay."""
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    npz = image_sets.ImageSet(images, torch.tensor([1, 0, 2]), "s.npz")
    generation._name_npz_classes(npz, {"class_names": ["cat", "dog"]})
    assert npz.named_classes == {0: "cat", 1: "dog"} and "sampling.json" in npz.named_by
    named = image_sets.ImageSet(images, torch.tensor([0, 0, 1]), "folder", named_classes={0: "x", 1: "y"})
    generation._name_npz_classes(named, {"class_names": ["cat", "dog"]})
    assert named.named_classes == {0: "x", 1: "y"} and named.named_by == "its file names"


def test_a_generators_evaluation_of_batch_size_32_draws_the_images_sample_draws(
    gen_run, tmp_path, capsys, quick_classifier
):
    """`evaluate --seed`'s help promises that with --batch-size 32 an evaluation draws the images `smapctl
    sample` draws by default (its --per-class: --num over the classes); nothing checked it, nor `sample`'s
    default batch size of 32 (another default would draw other images from the same seed). 40 images: one
    batch of 32 and one of 8."""
    code, _, err = run_cli(capsys, "sample", "--checkpoint", gen_run, "--per-class", 4, "-o", tmp_path / "s")
    assert code == 0, err
    args = ("--generator", gen_run, "--num", 40, "--batch-size", 32, "--limit", 100)
    code, _, err = run_cli(capsys, "evaluate", *args, "--out", tmp_path / "e")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "s").glob("*.png") if p.name != "grid.png")
    assert len(names) == 40 and names == sorted(
        p.name for p in (tmp_path / "e" / "samples").glob("*.png") if p.name != "grid.png"
    )
    for name in names:
        pixels = [np.asarray(Image.open(tmp_path / run / name)) for run in ("s", "e/samples")]
        assert np.array_equal(*pixels), name
