"""The rate-quality plot of `smapctl evaluate`: each reconstruction metric against the prefix length k."""

from __future__ import annotations

import os
from pathlib import Path

from smapctl.io import atomic_output

# Metric key in a metrics.json row -> (axis label, panel title, True when higher is better); the axis label
# is short, as a long one ran into the panel on its left.
PLOTTED = {
    "psnr": ("PSNR (dB)", "PSNR (dB)", True),
    "ssim": ("SSIM", "SSIM", True),
    "rfid": ("rFID", "rFID (Inception)", False),
    "is_mean": ("IS", "Inception Score", True),
    "class_acc": ("class accuracy", "class accuracy (ref. classifier)", True),
    "clf_fd": ("clf-FD", "clf-FD (not Inception FID)", False),
}


def rate_quality_plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per metric present in `rows` (dicts with "k" and metric values), metric against k; written
    atomically as a PNG with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    from smapctl.errors import one_line

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["k"])
    metrics = [m for m in PLOTTED if any(r.get(m) is not None for r in rows)]
    if not metrics:
        raise ValueError("rate_quality_plot: the rows hold no metric to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        points = [(r["k"], r[metric]) for r in rows if r.get(metric) is not None]
        ks, values = zip(*points, strict=True)
        ax.plot(ks, values, marker="o")
        label, title_of_panel, higher_better = PLOTTED[metric]
        ax.set_xlabel("prefix length k (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{title_of_panel} ({'higher' if higher_better else 'lower'} is better)", fontsize=8)
        ax.grid(alpha=0.3)
    if title:  # (it names the data or samples folder, whose bytes that are not UTF-8 matplotlib refuses)
        fig.suptitle(one_line(title), fontsize=9)
    fig.tight_layout()
    try:
        with atomic_output(path, "the plot") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
