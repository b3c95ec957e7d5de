"""train.log_with: the metrics rows also go to accelerate's experiment trackers (TensorBoard tested)."""

from __future__ import annotations

import pytest
from tiny_tokenizer import error_lines, run_cli, write_recipe

from smapctl.train.logging import read_metrics

tensorboard = pytest.importorskip("tensorboard")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run's TensorBoard event files hold: tag -> [(step, value)], in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "trackers").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_gets_every_metrics_row_and_a_resumed_run_goes_on(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    args = ["train-tokenizer", recipe, "--out", run, "--set", "train.log_with=[tensorboard]"]
    code, _, err = run_cli(capsys, *args, "--max-steps", 6)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--max-steps", 9, "--resume")
    assert code == 0, err
    assert "differ from the run's own recipe" not in err
    rows = read_metrics(run / "metrics.jsonl")
    logged = scalars(run)
    assert (
        [step for step, _ in logged["loss"]] == [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    )
    assert [v for _, v in logged["loss"]] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    validation = [r for r in rows if "val/psnr_k4" in r]
    assert validation and [s for s, _ in logged["val/psnr_k4"]] == [r["step"] for r in validation]
    # the recipe as hyper-parameters, in the run's folder: trackers/<run name>/
    assert list((run / "trackers").iterdir()) == [run / "trackers" / "run"]
    [hparams, *_] = sorted((run / "trackers" / "run").rglob("hparams.yml"))
    assert "model.num_latent_tokens: 4" in hparams.read_text()


def test_an_unknown_or_missing_tracker_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    import accelerate.utils

    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe, "--out", run, "--set", "train.log_with=[tensorbord]"
    )
    assert (
        code == 2
        and "train.log_with: 'tensorbord' is not a tracker accelerate knows (tensorboard, wandb" in err
    )
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    code, _, err = run_cli(capsys, "train-tokenizer", recipe, "--out", run, "--set", "train.log_with=[wandb]")
    assert code == 1 and error_lines(err) == [
        "error: train.log_with: wandb is not installed in this environment (pip install wandb), or drop it "
        "from the list"
    ]
    assert not run.exists()
    code, _, err = run_cli(
        capsys, "train-tokenizer", recipe, "--out", run, "--dry-run", "--set", "train.log_with=[wandb]"
    )
    assert code == 0 and "WARNING train.log_with: wandb is not installed in this environment" in err


def test_the_trackers_are_those_accelerate_knows():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from smapctl.train.config import TRACKERS

    assert sorted(TRACKERS) == sorted(LOGGER_TYPE_TO_CLASS)
