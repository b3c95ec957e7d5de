"""The PNGs of the mini reproduction: rate-quality curves (mean over seeds, band = min..max) and labelled
image panels. matplotlib's object API with the Agg canvas only: no pyplot, no global state, no display."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from smapctl.data.images import to_uint8
from smapctl.io import atomic_output

DPI = 80


@dataclass
class Series:
    """One line: per-seed values (seeds x points) at positions x."""

    label: str
    x: list[int]
    values: list[list[float]]
    style: dict = field(default_factory=dict)  # matplotlib line keywords (color, linestyle, marker)


@dataclass
class Axis:
    title: str
    ylabel: str
    series: list[Series]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def line_grid(path: Path, axes: list[Axis], xlabel: str, ncols: int, title: str = "") -> Path:
    """Axes in a grid of `ncols` columns; each series is its mean line with a min..max band over seeds."""
    from matplotlib.ticker import MaxNLocator

    nrows = -(-len(axes) // ncols)
    figure = _new_figure(3.3 * ncols, 2.6 * nrows + 0.4)
    for i, axis in enumerate(axes):
        ax = figure.add_subplot(nrows, ncols, i + 1)
        for s in axis.series:
            v = np.asarray(s.values, dtype=np.float64)  # (seeds, points)
            (line,) = ax.plot(s.x, v.mean(axis=0), label=s.label, linewidth=1.4, markersize=3, **s.style)
            if v.shape[0] > 1:
                ax.fill_between(s.x, v.min(axis=0), v.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_title(axis.title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(axis.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def image_panel(path: Path, rows: list[tuple[str, torch.Tensor]], title: str = "", scale: int = 3) -> Path:
    """Rows of images (n, 3, S, S) in [-1, 1] (rows may differ in n), each with a label on its left,
    enlarged `scale` times (nearest neighbour) with a 2 px gap."""
    size, gap = rows[0][1].shape[-1] * scale, 2
    cols = max(len(images) for _, images in rows)
    canvas = np.full((len(rows) * (size + gap), cols * (size + gap), 3), 255, dtype=np.uint8)
    for r, (_, images) in enumerate(rows):
        cells = to_uint8(images).repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
        for c, cell in enumerate(cells):
            y, x = r * (size + gap), c * (size + gap)
            canvas[y : y + size, x : x + size] = rearrange(cell, "c h w -> h w c").numpy()
    height, width = canvas.shape[:2]
    margin, top = 1.9, (0.35 if title else 0.05)  # inches left of the images (row labels) and above
    fig_w, fig_h = margin + width / DPI, top + height / DPI
    figure = _new_figure(fig_w, fig_h)
    ax = figure.add_axes((margin / fig_w, 0, width / DPI / fig_w, height / DPI / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([r * (size + gap) + size / 2 for r in range(len(rows))], [label for label, _ in rows])
    ax.set_xticks([])
    ax.tick_params(labelsize=8, length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.08 / fig_h, va="top")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    """Write the figure as a PNG atomically (`smapctl.io`: a full disk is a one-line error)."""
    with atomic_output(path, "the figure") as f:
        figure.savefig(f, dpi=DPI, format="png")
    return path
