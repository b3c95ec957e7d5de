"""Metrics as JSON lines (one dict per line, appended, flushed) and a short progress-bar postfix."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from smapctl.io import loads_json, make_folders, write_error

_KEPT = "the checkpoints written so far are intact (continue with --resume)"


def _number(v: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; anything else unchanged."""
    if isinstance(v, torch.Tensor):
        return v.detach().item()
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def _scalar(v: Any) -> Any:
    """A JSON value: non-finite floats become null (strict JSON has no NaN)."""
    v = _number(v)
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter:
    """Appends `{"step": step, **metrics}` lines to `path`; a no-op unless `is_main` (STYLE habit 6).

    Appending means a resumed run continues the same file; steps after a resume may repeat steps logged
    after the last checkpoint of the interrupted run.
    """

    def __init__(self, path: str | Path, is_main: bool, trackers=None):
        self.path = Path(path)
        self.is_main = is_main
        self.trackers = trackers  # an Accelerator whose trackers (train.log_with) get each row too
        self._file = None
        if is_main:
            try:
                make_folders(self.path.parent)
                self._file = open(self.path, "a", encoding="utf-8")
            except OSError as e:
                raise write_error(self.path, e, "the metrics", kept=_KEPT) from e

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:  # a torn last line is skipped by `read_metrics` and trimmed on --resume
            raise write_error(self.path, e, "the metrics", kept=_KEPT) from e
        if self.trackers is not None:  # their numbers (a null, not finite, is left out)
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
            self.trackers.log(numbers, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.trackers is not None:  # their files flushed and closed (`end_training` would also end the
            for tracker in self.trackers.trackers:  # process group, which the other processes still use)
                tracker.finish()
            self.trackers = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path, unreadable: list[int] | None = None) -> list[dict[str, Any]]:
    """All rows of a metrics file (a torn last line from a killed process is skipped); the numbers of
    the lines skipped, from 1, are added to `unreadable` when given."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = loads_json(line)
        except ValueError:  # (json.JSONDecodeError too)
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif unreadable is not None:  # (a number or a list parses, but is no row)
            unreadable.append(number)
    return rows


def format_postfix(metrics: dict[str, Any], digits: int = 4) -> dict[str, str]:
    """Short strings for `tqdm.set_postfix(...)`: `{"loss": 0.123456}` -> `{"loss": "0.1235"}`."""
    out = {}
    for k, v in metrics.items():
        v = _number(v)
        out[k] = f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return out
