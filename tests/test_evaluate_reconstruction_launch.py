"""`smapctl evaluate --checkpoint` under torchrun (gloo, two processes of one thread): the processes share
the reconstruction batches, the main one scores; the scores, the skipped images and the errors are those of
one process, and a signal stops every process after the same round."""

import json
import re

import pytest
import torch
from test_evaluate_reconstruction import NOT_AN_IMAGE, image_folder_with_broken_files
from tiny_tokenizer import before_torchrun, error_lines, torchrun

from smapctl.eval.evaluate import evaluate_images

pytestmark = pytest.mark.slow

# `smapctl` as a launched process with `quick_classifier`'s reference classifier (16 px, 40 steps: the
# real one takes minutes); with $SIGNAL_AT_BATCH ("SIGTERM 2"), rank 1 sends itself that signal as it
# reconstructs its batch of that number; with $SIGNAL_AS_THE_MAIN_PROCESS_PREPARES ("SIGTERM 1": a
# signal and a rank), that rank sends itself the signal 2 s into the 6 s the main process spends alone
# before the batches (the output folder, the data, the classifier).
LAUNCHER = """\
import os
import signal
import sys

from smapctl.eval import reconstruction, semantic

semantic.CLASSIFIER_STEPS = 40
semantic.CLASSIFIER_SIZES["digits"] = 16
real, calls = reconstruction._reconstructed, []


def reconstructed(*args, **kwargs):
    rows = real(*args, **kwargs)
    calls.append(1)
    name, _, at = os.environ.get("SIGNAL_AT_BATCH", "").partition(" ")
    if os.environ["RANK"] == "1" and at and len(calls) == int(at):
        os.kill(os.getpid(), signal.Signals[name])
    return rows


reconstruction._reconstructed = reconstructed

if os.environ.get("SIGNAL_AS_THE_MAIN_PROCESS_PREPARES"):  # rank 1 signalled as rank 0 works 6 s alone
    import threading
    import time

    real_tally, real_alone = reconstruction._semantic_tally, reconstruction.on_the_main_process

    def slow_tally(*args, **kwargs):
        time.sleep(6)
        return real_tally(*args, **kwargs)

    def alone(work, share=None):
        name, rank = os.environ["SIGNAL_AS_THE_MAIN_PROCESS_PREPARES"].split()
        if os.environ["RANK"] == rank and work.__name__ == "prepare":
            threading.Timer(2, os.kill, (os.getpid(), signal.Signals[name])).start()
        return real_alone(work, share)

    reconstruction._semantic_tally, reconstruction.on_the_main_process = slow_tally, alone
from smapctl.cli import main  # noqa: E402

sys.argv[0] = "smapctl"
main()
"""


def launched(tmp_path, *args, signalled: str | None = None, mp=None):
    """`smapctl evaluate ARGS` under torchrun through `LAUNCHER` -> (the processes' exit statuses, sorted;
    the completed process)."""
    if signalled is not None:
        mp.setenv("SIGNAL_AT_BATCH", signalled)
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    r = torchrun("evaluate", *args, script=script)
    return sorted(re.findall(r"^\s*exitcode\s*: (-?\d+)", r.stderr, re.MULTILINE)), r


def alone(**kwargs) -> dict:
    """The report of the same evaluation by one process of one thread (as torchrun gives each): torch's
    threads and those of numpy's BLAS, which computes rFID's matrix square root (with two threads on a
    2-core machine it rounded rFID otherwise in its 11th digit than torchrun's processes)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return evaluate_images(**kwargs).report
    finally:
        torch.set_num_threads(threads)


def test_a_launched_tokenizer_evaluation_shares_the_batches_and_scores_once(
    tok_run, random_inception_weights, quick_classifier, tmp_path
):
    """`evaluate --checkpoint` refused a launcher: the paper's rFID reconstructs 50,000 images at every
    prefix, on one GPU of eight. Now the processes share the batches (7 of 2 images: the last round has one)
    and the main one scores: the same metrics.json as one process, with rFID, IS and the class checks."""
    args = dict(checkpoint=tok_run, prefix="0,2,8", semantic=True, fid=True, isc=True, limit=13, batch_size=2)
    args |= dict(inception_weights=random_inception_weights)
    one = alone(**args, out=tmp_path / "one")  # (first: it trains the classifier the launch reads back)
    cli = ["--checkpoint", tok_run, "--prefix", "0,2,8", "--semantic", "--fid", "--is", "--limit", 13]
    cli += ["--batch-size", 2, "--inception-weights", random_inception_weights, "-o", tmp_path / "two"]
    statuses, r = launched(tmp_path, *cli)
    assert statuses == [] and r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reconstruction: ") == 1 and r.stdout.count("metrics: ") == 1  # the main one's
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two == one and two["num_images"] == 13 and two["semantic"]["cross_class_acc"] is not None
    assert all(row["rfid"] is not None and row["class_acc"] is not None for row in two["rows"])


def test_a_launched_tokenizer_evaluation_skips_or_stops_at_unreadable_images_as_one_process(
    tok_run, tmp_path
):
    """An image folder with two unreadable files among six, in batches of 2 (rounds of batches (0, 1) and
    (2)): they are left out and listed in the order one process lists them; with --on-error fail every
    process stops at the first, printed once."""
    broken = image_folder_with_broken_files(tmp_path / "images")
    args = ["--checkpoint", tok_run, "--data", tmp_path / "images", "--no-semantic", "--batch-size", 2]
    statuses, r = launched(tmp_path, *args, "-o", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    one = alone(checkpoint=tok_run, data=str(tmp_path / "images"), semantic=False, batch_size=2)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_images"] == 4 == one["num_images"] and two["rows"] == one["rows"]
    assert two["skipped"]["first"] == [f"{broken[0]}: empty file (0 bytes)", f"{broken[1]}: {NOT_AN_IMAGE}"]
    listed = (tmp_path / "two" / "skipped_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(p) for p in broken]

    statuses, r = launched(tmp_path, *args, "--on-error", "fail", "-o", tmp_path / "failed")
    assert statuses == ["1", "1"], r.stderr[-3000:]
    ours = before_torchrun(r.stderr)
    assert error_lines(ours) == [f"error: {broken[0]}: empty file (0 bytes)"], ours
    assert "Traceback" not in ours and not (tmp_path / "failed").exists()


@pytest.mark.parametrize(
    ("signalled", "status"),
    [("SIGTERM 1", "143"), ("SIGINT 2", "130")],
    ids=["first-round", "last-round"],
)
def test_a_signal_to_one_process_of_a_launched_tokenizer_evaluation_stops_each_with_its_status(
    tok_run, tmp_path, monkeypatch, signalled, status
):
    """40 images in batches of 10: rounds (0, 1) and (2, 3). A signal to the second process as it
    reconstructs its first batch, or its last (the rounds are done: the scores would take minutes), stops
    every process with the signal's status, said once, and no metrics.json."""
    out = tmp_path / "ev"
    args = ("--checkpoint", tok_run, "--no-semantic", "--limit", 40, "--batch-size", 10, "-o", out)
    statuses, r = launched(tmp_path, *args, signalled=signalled, mp=monkeypatch)
    assert statuses == [status, status], r.stderr[-3000:]
    ours = before_torchrun(r.stderr)
    assert ours.count("interrupted: no scores written") == 1 and "Traceback" not in ours, ours
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("differs", ["images", "tokenizer"])
def test_nodes_whose_copies_of_the_images_or_the_tokenizer_differ_stop_before_reconstructing(
    tok_run, tmp_path, differs
):
    """Two nodes, each with its own copy of the image folder and of the tokenizer's run (relative paths):
    the second node's copy has an image more, or is of another checkpoint. Each process would reconstruct
    its share of other images or with other weights, and the main process score them as the ones it
    lists: every process stops in one line, printed once, before any batch; no folder is left."""
    import shutil

    from tiny_tokenizer import another_copy, two_nodes

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        image_folder_with_broken_files(folder / "images")
    for folder in folders[: 1 if differs == "tokenizer" else 2]:
        shutil.copytree(tok_run, folder / tok_run.name)
    if differs == "tokenizer":
        another_copy(tok_run, folders[1])
    else:
        shutil.copy(folders[1] / "images" / "3" / "0.png", folders[1] / "images" / "3" / "9.png")
    out = tmp_path / "ev"
    args = ("evaluate", "--checkpoint", tok_run.name, "--data", "images", "--no-semantic", "-o", out)
    outputs = two_nodes(*args, cwds=folders, timeout=200)
    assert [status for status, _, _ in outputs] == [1, 1], outputs
    ours = [before_torchrun(err) for _, _, err in outputs]
    said = {
        "images": "error: process 1 of the launch lists 7 images, the main process 6: every process must",
        "tokenizer": "error: process 1 of the launch loaded another tokenizer than the main process's",
    }[differs]
    assert ours[0].count(said) == 1 and error_lines(ours[1]) == [], ours
    assert not out.exists()


def test_a_launched_tokenizer_evaluation_of_a_folder_without_a_readable_image_stops_every_process(
    tok_run, tmp_path
):
    """Four unreadable files in batches of 2: each process reads its batch of each round, its last one
    without reading past it. The error ("no images to evaluate") was said once, but each process then
    waited for ever as it exited, for the data workers of its iterator (they take no SIGTERM), until
    torchrun was killed."""
    (tmp_path / "images" / "3").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "images" / "3" / f"{i}.png").write_bytes(b"not a png")
    args = ["--checkpoint", tok_run, "--data", tmp_path / "images", "--no-semantic", "--batch-size", 2]
    statuses, r = launched(tmp_path, *args, "-o", tmp_path / "ev")
    assert statuses == ["1", "1"], r.stderr[-3000:]
    ours = before_torchrun(r.stderr)
    assert len(error_lines(ours)) == 1 and "no images to evaluate" in ours and "Traceback" not in ours, ours
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("rank", ["1", "0"], ids=["another", "the-main-one"])
def test_a_signal_to_a_process_as_the_main_one_prepares_stops_every_process_with_its_status(
    tok_run, tmp_path, monkeypatch, rank
):
    """SIGTERM as the main process prepared the evaluation alone (its reference classifier trains for
    minutes), the other waiting for it in a broadcast, where Python runs no signal handler. To the other:
    once the main process was done, the other left (143, silently) and the main one exited 1 at its next
    collective ("another process ... stopped"). To the main one: it stopped at once, and the other exited 1
    as it left. Now every process stops with the signal's status, said once, and the output folder is
    gone."""
    monkeypatch.setenv("SIGNAL_AS_THE_MAIN_PROCESS_PREPARES", f"SIGTERM {rank}")
    out = tmp_path / "ev"
    args = ("--checkpoint", tok_run, "--no-semantic", "--limit", 8, "-o", out)
    statuses, r = launched(tmp_path, *args)
    assert statuses == ["143", "143"], r.stderr[-3000:]
    ours = before_torchrun(r.stderr)
    assert ours.count("interrupted: no scores written") == 1 and "another process" not in ours, ours
    assert "Traceback" not in ours and not out.exists()
