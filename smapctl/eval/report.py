"""What `evaluate` writes and shows: metrics.json (strict JSON), the rate-quality plot of a
reconstruction at several prefixes, and the table and notes printed under it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from smapctl.eval.semantic import CLF_FD_NOTE
from smapctl.io import write_text_atomic

METRICS_FILE = "metrics.json"
PLOT_FILE = "rate_quality.png"


def _jsonable(x):
    """Non-finite floats (e.g. the PSNR of a perfect reconstruction) become null: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_report(report: dict, out_dir: Path, title: str = "") -> list[Path]:
    """metrics.json and, for reconstructions at two or more prefixes, rate_quality.png; both atomically
    (a full disk is a one-line UserError and leaves the earlier files intact)."""
    from smapctl.eval.plots import rate_quality_plot

    path, plot = Path(out_dir) / METRICS_FILE, Path(out_dir) / PLOT_FILE
    write_text_atomic(path, json.dumps(_jsonable(report), indent=2) + "\n", "the metrics")
    files = [path]
    try:
        if report["task"] == "reconstruction" and len(report["rows"]) >= 2:
            files.append(rate_quality_plot(report["rows"], plot, title))
        else:  # an earlier evaluation's plot would sit beside metrics.json as if it were of these numbers
            plot.unlink(missing_ok=True)
    except KeyboardInterrupt:  # (the same: metrics.json holds this evaluation's numbers)
        plot.unlink(missing_ok=True)
        raise
    return files


COLUMNS = {  # metrics.json key -> (table header, format)
    "k": ("k", "{:d}"),
    "num_samples": ("samples", "{:d}"),
    "psnr": ("PSNR", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "rfid": ("rFID", "{:.2f}"),
    "gfid": ("gFID", "{:.2f}"),
    "is_mean": ("IS", "{:.2f}"),
    "class_acc": ("class acc", "{:.1%}"),
    "clf_fd": ("clf-FD*", "{:.3f}"),
}


def report_table(report: dict):
    """The metrics as a rich Table: one row per prefix (reconstruction) or one row (generation)."""
    from rich.table import Table

    from smapctl.errors import one_line

    rows = report["rows"] if report["task"] == "reconstruction" else [report["metrics"]]
    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    if report["task"] == "reconstruction":
        n = report["num_images"]
        title = f"reconstruction: {report['data']} ({n} image{'s' * (n != 1)}, {report['weights']} weights)"
    else:
        n = report["metrics"]["num_samples"]
        title = f"generation: {report.get('generator') or report['samples']} ({n} sample{'s' * (n != 1)})"
    # As wide as its title (a folder's path would fold mid-word over a narrow table), within the terminal;
    # a path's bytes that are not UTF-8 escaped (a UTF-8 stdout refuses them once the scores are computed).
    title = one_line(title)
    table = Table(title=title, min_width=len(title))
    cells = [[_cell(row, key) for key in keys] for row in rows]
    for i, key in enumerate(keys):
        # No narrower than its widest score: on a narrow terminal (or COLUMNS=40 in a log) rich would give
        # one column's room to another's header and cut the scores to `141.4…`. The headers wrap instead.
        widest = max(len(line[i]) for line in cells)
        table.add_column(COLUMNS[key][0], justify="right", min_width=widest)
    for line in cells:
        table.add_row(*line)
    return table


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    cell = "-" if value is None else COLUMNS[key][1].format(value)
    if key == "is_mean" and row.get("is_std") is not None:
        cell += f" ± {row['is_std']:.2f}"
    return cell


def report_notes(report: dict) -> list[str]:
    """One-line notes under the table: the class checks, the classifier's own accuracy, what clf-FD is."""
    sem = report.get("semantic")
    if not sem:
        return []
    notes = []
    if sem.get("class_only_acc") is not None:
        notes.append(f"class only (k=0): {sem['class_only_acc']:.1%} classified as their class")
    cross = sem.get("cross_class_acc")
    if cross:
        notes.append(
            f"cross-reconstruction (decoded with class (y+1) mod C): {cross['k0']:.1%} follow it at k=0, "
            f"{cross['kK']:.1%} at k={report['num_tokens']}"
        )
    if sem.get("reference_acc") is not None:
        notes.append(
            f"reference classifier ({sem['classifier_data']}): {sem['reference_acc']:.1%} on"
            f" {sem.get('reference_acc_images') or 'real images'}"
        )
        classes = sem.get("classifier_classes")
        if classes and sem["reference_acc"] <= 1.5 / classes:  # a classifier that tells nothing apart
            notes.append(
                f"WARNING that is about chance for {classes} classes: the semantic scores here say nothing"
                " about the images (too few or too alike training images for the classifier?)"
            )
    if report.get("task") == "generation" and report["metrics"].get("class_acc") is not None:
        notes.append(
            "class acc of samples a SMAP decoder made: it takes the class, so its images follow the class"
            " whatever the tokens (README, Evaluate); clf-FD (and gFID) measure the generator"
        )
    notes.append(f"* {CLF_FD_NOTE}")
    return notes
