"""`smapctl evaluate`'s dispatch (smapctl/eval/evaluate.py) and what its two modes share (common.py,
report.py): the options of the other mode refused, the output folder checked before any work, an
interruption said, the choice of the reference classifier, the skip list, and the report (metrics.json,
its table and notes). A tokenizer's reconstructions are tested in test_evaluate_reconstruction.py, generated
samples in test_evaluate_generation.py; their tiny tokenizer and generator (`tok_run`, `gen_run`) are
conftest's, their shared helpers evaluate_helpers.py's."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from evaluate_helpers import write_sample_folder
from faults import snapshot
from PIL import Image
from tiny_tokenizer import error_lines, run_cli

from smapctl.errors import UserError
from smapctl.eval import common, generation, image_sets, reconstruction, report, semantic
from smapctl.eval.evaluate import evaluate_images
from smapctl.eval.image_sets import limit_indices


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


def test_a_generation_table_shows_the_inception_score_as_mean_and_std():
    """One row of a generation's scores: the IS column holds the mean with its spread over the splits
    (`5.00 ± 0.50`), not the spread alone, nor the mean without it."""
    from rich.console import Console

    from smapctl.eval.report import report_table

    metrics = {"num_samples": 40, "gfid": 12.345, "is_mean": 5.0, "is_std": 0.5, "clf_fd": 1.5}
    report = {"task": "generation", "generator": "runs/gen", "samples": "x", "metrics": metrics}
    console = Console(width=120, record=True)
    console.print(report_table(report))
    text = console.export_text()
    assert "generation: runs/gen (40 samples)" in text
    row = next(line for line in text.splitlines() if "12.35" in line)
    assert "5.00 ± 0.50" in row and "1.500" in row


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


def test_the_reference_accuracy_says_when_it_is_on_the_classifiers_training_images(tmp_path):
    """Only the training split of the classifier's own dataset (or its own folder) is its training images:
    a held-out split of that dataset, or another dataset, is not said to be."""
    digits = semantic.SemanticReference(None, "digits", list("0123456789"))
    trained = " (the classifier's training images among them)"
    assert common.on_images(digits, "digits:train") == "digits:train" + trained
    assert common.on_images(digits, "digits:val") == "digits:val"
    assert common.on_images(digits, "photos:train") == "photos:train"
    folder = semantic.SemanticReference(None, str(tmp_path.resolve()), ["a", "b"])
    assert common.on_images(folder, str(tmp_path)) == str(tmp_path) + trained
    assert common.on_images(folder, str(tmp_path / "val")) == str(tmp_path / "val")


def test_metrics_json_records_how_the_inception_scores_were_made(tmp_path):
    """The Inception block names the weights file (absolute), whether it is the published one, the feature
    extractor and the 10 IS splits, so that two metrics.json can be told comparable or not."""
    weights = tmp_path / "w.pth"
    made = common.Fidelity(fid=True, isc=True, weights=weights, weights_sha256="6726825d" + "0" * 56)
    assert common.inception_block(made) == {
        "weights": str(weights.resolve()),
        "weights_sha256": "6726825d" + "0" * 56,
        "published_weights": True,
        "feature_extractor": "inception-v3-compat",
        "is_splits": 10,
    }
    assert common.inception_block(None) is None
