"""Metrics logging (smapctl/train/logging.py)."""

import math

import pytest
import torch
from faults import fill_disk

from smapctl.errors import UserError
from smapctl.train.logging import MetricsWriter, format_postfix, read_metrics


def test_metrics_writer_appends_json_lines_on_main_only(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    with MetricsWriter(path, is_main=True) as w:
        w.log(1, {"loss": torch.tensor(0.5), "lr": 1e-4, "bad": float("nan")})
    with MetricsWriter(path, is_main=True) as w:  # a resumed run appends
        w.log(2, {"loss": 0.25})
    MetricsWriter(tmp_path / "other.jsonl", is_main=False).log(3, {"loss": 1.0})
    assert not (tmp_path / "other.jsonl").exists()
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # torn line from a killed process
    rows = read_metrics(path)
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4, "bad": None}, {"step": 2, "loss": 0.25}]


def test_metrics_writer_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    fill_disk(monkeypatch, free=30)
    with MetricsWriter(tmp_path / "metrics.jsonl", is_main=True) as w:
        w.log(1, {"loss": 0.5})  # 25 bytes: fits
        with pytest.raises(UserError) as e:
            w.log(2, {"loss": 0.25})
    assert str(e.value) == (
        f"{tmp_path / 'metrics.jsonl'}: could not write the metrics (No space left on device): the disk is "
        "full; free some space or write elsewhere; the checkpoints written so far are intact (continue "
        "with --resume)"
    )


def test_format_postfix():
    post = format_postfix({"loss": torch.tensor(0.123456), "kimg": 12, "gn": math.inf})
    assert post == {"loss": "0.1235", "kimg": "12", "gn": "inf"}
