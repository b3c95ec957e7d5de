"""`smapctl evaluate --checkpoint` (smapctl/eval/reconstruction.py): a tokenizer's reconstruction
metrics per prefix with the semantic scores and the plot, rFID's image store, the offline Inception path's
one-line errors, unreadable images, and signals during a tokenizer's evaluation."""

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_helpers import ROOT, _GreyLevels, in_unit_interval
from faults import (
    SignalsAsItsSecondWorkerStarts,
    add_broken_images,
    fill_disk,
    signal_after,
    sigterm_caught,
    snapshot,
    stopped_as_the_second_worker_starts,
    temp_files,
)
from PIL import Image
from tiny_tokenizer import DEMO_TOKENIZER_TINY, error_lines, run_cli

from smapctl.data.datasets import build_eval_dataset
from smapctl.data.images import to_uint8
from smapctl.errors import UserError
from smapctl.eval import reconstruction, report, semantic
from smapctl.eval.fidelity import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from smapctl.eval.image_sets import limit_indices
from smapctl.eval.metrics import psnr, ssim
from smapctl.eval.reconstruction import ImageStore, parse_prefixes
from smapctl.ops.load import load_tokenizer
from smapctl.recipe import load_tokenizer_recipe
from smapctl.train.tokenizer import train_tokenizer


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
            assert row["ssim"] == pytest.approx(ssim(rec, x).mean().item(), abs=1e-6)  # 16 px: scored


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


def test_disk_full_for_the_scratch_folder_of_the_image_sets_is_one_line(tmp_path, monkeypatch):
    """The scratch folder inside --out that keeps the image sets of rFID/IS, made as the reconstructions
    start: a full disk (or no inode left) there was unchecked, so its OSError raised as it was passed (a
    traceback). One line naming --out and saying to free some space."""
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full)
    with pytest.raises(UserError) as e, reconstruction._scratch(tmp_path):
        pass
    assert str(e.value) == (
        f"{tmp_path}: could not write a temporary folder (No space left on device): the disk is full; free"
        " some space or write elsewhere"
    )


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


def test_an_image_folder_whose_name_is_not_utf8_is_scored_and_plotted(tok_run, tmp_path, capsys):
    """Images in a folder named in Latin-1 (`images\xe9`, bytes that are not UTF-8) were scored, and then
    the plot's title naming the folder stopped the command with a matplotlib TypeError traceback."""
    data = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"images\xe9"))
    image_folder_with_broken_files(Path(data))
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", tok_run, "--data", data, "--no-semantic", "--out", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "Traceback" not in err, err
    assert (out / "rate_quality.png").is_file() and json.loads((out / "metrics.json").read_text())[
        "data"
    ] == data


def test_a_second_signal_as_the_table_is_shown_ends_complete_naming_the_report(
    tok_run, tmp_path, capsys, monkeypatch
):
    """A Ctrl-C that reaches the table (the first one is held until the report is written) leaves the
    report complete: exit 0 and one line naming it, an --out whose name is not UTF-8 by its bytes (it came
    out as \\udcNN, where the other lines write \\xNN)."""
    from smapctl import cli

    def interrupted(result):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_show_evaluation", interrupted)
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"eval\xe9"))
    args = ["evaluate", "--checkpoint", tok_run, "--no-semantic", "--prefix", "4", "--limit", 4]
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 0 and "Traceback" not in err, err
    said = f"SIGINT as the scores were shown: they are complete in {tmp_path}/eval\\xe9/metrics.json"
    assert said in err and os.path.isfile(os.path.join(out, "metrics.json"))


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


def test_a_recipe_that_holds_out_nothing_says_its_val_fraction_is_0(tmp_path, monkeypatch):
    """`evaluate --checkpoint` without --data, of a tokenizer trained with data.val_fraction 0: only a
    fraction that rounds to no image was checked, so asking why of the rounding for 0 too passed (a
    ZeroDivisionError traceback). One line saying the fraction is 0."""
    from types import SimpleNamespace

    from tokenize_helpers import write_image

    from smapctl.data import datasets
    from smapctl.data.config import DataConfig
    from smapctl.train import checkpoint

    for i, name in enumerate(("a", "b")):
        write_image(tmp_path / "images" / name / "0.png", i)
    monkeypatch.setattr(checkpoint, "load_meta", lambda path: {})
    monkeypatch.setattr(datasets, "check_split_listing", lambda *args: None)
    recipe = SimpleNamespace(data=DataConfig(dataset=str(tmp_path / "images"), val_fraction=0.0))
    model = SimpleNamespace(cfg=SimpleNamespace(image_size=16))
    tok = SimpleNamespace(model=model, recipe=recipe, class_names=["a", "b"], path=tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"its recipe holds out no images \(data.val_fraction is 0\); pass"):
        reconstruction.reconstruction_data(tok, None, None)


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


def test_image_store_round_trip(tmp_path):
    store = ImageStore(tmp_path, 5)
    a = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    store.append("x", a[:3])
    store.append("x", a[3:])
    assert torch.equal(store.tensor("x"), a)


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


def test_a_tokenizer_without_classes_has_no_class_checks(tmp_path, capsys, quick_classifier):
    """Without a class embedding k = 0 decodes nothing: "class only (k=0): 10% classified as their class"
    was reported as if it meant something."""
    recipe = load_tokenizer_recipe(
        ROOT / "recipes/demo/tokenizer.yaml", [*DEMO_TOKENIZER_TINY, "model.class_condition=false"]
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
        # Before the scores are computed (as its data is made, or in its first batch): stopped, nothing
        # written.
        for out, at in [("d", "reconstruction_data"), ("e", "_batch_rows")]:
            caplog.clear()
            with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.WARNING):
                signal_after(m, reconstruction, at, signals := [signum])
                code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / out)
            assert (code, signals, caught) == (128 + signum, [], []), (at, err)
            assert "interrupted: no scores written" in caplog.text and not (tmp_path / out).exists()


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


def test_a_generator_given_as_checkpoint_is_pointed_to_generator(gen_run, tmp_path, capsys):
    """`evaluate --checkpoint GEN` said "a generator checkpoint, not a tokenizer" and no more."""
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", gen_run, "--out", tmp_path / "e")
    [line] = error_lines(err)
    assert code == 1 and "a generator checkpoint, not a tokenizer" in line
    assert line.endswith(f"; to score its samples: smapctl evaluate --generator {gen_run}")


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
    cfg = SimpleNamespace(image_size=16, class_condition=False, num_classes=1)
    tok = SimpleNamespace(model=SimpleNamespace(cfg=cfg))
    with stopped_as_the_second_worker_starts(monkeypatch):
        reconstruction.reconstruct(tok, data, [1], batch_size=2, device=torch.device("cpu"))


def test_an_evaluation_stopped_by_an_unreadable_image_ends_its_reading_workers(tok_run, tmp_path):
    """With --on-error fail, the error at an unreadable image held the batch loader in its traceback's
    frames, and with it the two processes reading the image folder, until Python's next collection."""
    import multiprocessing

    from smapctl.data.images import BadImageError

    image_folder_with_broken_files(tmp_path / "images")
    tok = load_tokenizer(tok_run, "ema", torch.device("cpu"))
    dataset, _ = reconstruction.reconstruction_data(tok, str(tmp_path / "images"), None, "fail")
    assert dataset.workers == 2
    with pytest.raises(BadImageError) as caught:
        reconstruction.reconstruct(tok, dataset, [1], batch_size=2, device=torch.device("cpu"))
    assert caught.value.__traceback__ is not None and multiprocessing.active_children() == []


def test_each_launched_process_reconstructs_only_its_share_of_the_batches(tok_run, monkeypatch):
    """A launched process that reconstructed every batch itself (and sent the others only its own) ended
    as one that had reconstructed its share, metrics.json the same: the launch was as slow as one process.
    Each reconstructs the batches of its turn in every round (here the second process of 2: the 2nd and
    4th of 4); the other process's rows come back from the gathers stubbed here."""
    import accelerate.utils

    tok = load_tokenizer(tok_run, "ema", torch.device("cpu"))
    dataset, _ = reconstruction.reconstruction_data(tok, None, 8)
    assert len(dataset) == 8 and dataset.workers == 0  # (read in this process)
    monkeypatch.setattr(reconstruction, "gather_rows", lambda rows, batch_size, world: [rows] * world)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda sent: sent * 2)
    monkeypatch.setattr(reconstruction.RoundStops, "round_done", lambda self, last: None)
    seen = []

    def batch_rows(model, batch, *args, real=reconstruction._batch_rows):
        if batch is not None:
            seen.append(batch[0])
        return real(model, batch, *args)

    monkeypatch.setattr(reconstruction, "_batch_rows", batch_rows)
    share = reconstruction.Spread(1, 2, [])
    reconstruction.reconstruct(tok, dataset, [4], batch_size=2, device=torch.device("cpu"), spread=share)
    ours = [torch.stack([dataset[i][0] for i in batch]) for batch in (range(2, 4), range(6, 8))]
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, ours, strict=True))
