"""Progress of long work over many items: a tqdm bar on a terminal, and elsewhere (a log file, a batch
scheduler's output) a line now and then, so a job of hours is not silent until it ends."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Generator, Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("smapctl")

# Without a terminal, one line at most this often (seconds; $SMAPCTL_PROGRESS_EVERY sets it).
LOG_EVERY = 60.0
EVERY_ENV = "SMAPCTL_PROGRESS_EVERY"
# On a terminal a bar is drawn at the first update after this many seconds (tqdm's `delay`), none for work
# that ends sooner: a bar drawn and removed at once (the demo tokenizer's sample grid, 7 passes in 0.1 s)
# only flickered. 2 s is past the pause that goes unnoticed and below what the work worth a bar takes: the
# demo's validation (5 s on 2 cores) and generator grid (10 s) still show one. It appears on an update,
# not a timer (no thread of ours): with steps of a minute, after the first.
BAR_DELAY = 2.0


def log_every() -> float:
    value = os.environ.get(EVERY_ENV)
    if not value:
        return LOG_EVERY
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):  # nan would turn the lines off without a word
        logger.warning("%s=%r: not a number of seconds; %g is used", EVERY_ENV, value, LOG_EVERY)
        return LOG_EVERY
    return max(seconds, 0.0)


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a tqdm bar redraws itself; elsewhere its updates pile up)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr (pythonw), or a closed one
        return False


def in_notebook() -> bool:
    """Whether this is a Jupyter kernel, where tqdm.auto draws its bar as a widget (stderr is no
    terminal there: without the widget the API's encode and sample would be silent for minutes)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    # Colab's and Spyder's shells are subclasses of Jupyter's, under other names.
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


# A bar's counts, times and rate at their widest (a training's `:  31%|██| 123456/400000 [40:00:00<24:00:20,
#  3.20step/s`), which its label must leave room for; a postfix (a training's loss, images/s) comes after.
BAR_COUNTS_WIDTH = 58


def bar_label(name: str) -> str:
    """`name` as a bar's label (a training's run folder, `Inception statistics of FOLDER`), cut to leave
    the terminal's last `BAR_COUNTS_WIDTH` columns to the bar's counts, times and rate: a long run name
    would push the rate and the time left off a narrow terminal. `smap-b-vq-imagenet...` where it is cut, no
    label where fewer than 8 columns are left for it."""
    room = _bar_columns() - BAR_COUNTS_WIDTH
    if len(name) <= room:
        return name
    return name[: room - 3] + "..." if room >= 8 else ""


def _bar_columns() -> int:
    """The width of the terminal the bars are drawn on: $COLUMNS where set, else stderr's (stdout may be
    a file: `smapctl train-tokenizer ... > out.txt` draws its bar on the terminal), else stdout's or 80."""
    import shutil

    if not os.environ.get("COLUMNS", "").isdigit():
        try:
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
        except (AttributeError, ValueError, OSError):  # no stderr, no descriptor, not a terminal
            columns = 0
        if columns > 0:  # (a terminal whose size was never set says 0, as shutil knows)
            return columns
    return shutil.get_terminal_size().columns


def rate_text(rate: float) -> str:
    """A throughput as a log line gives it: `1,270`, `631`, `12.3`, `0.417` (`%.3g` writes 1.27e+03)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class progress:  # noqa: N801 (used like tqdm: `with progress(n, "tokenizing", "images") as bar`)
    """`update(n)` as items are done. On a terminal (stderr is one) a tqdm bar from the first update
    after `BAR_DELAY` seconds on, gone when done, and none for work done sooner; else
    `desc: 12,345 of 1,281,167 images (1.0%), 310 images/s` at most every `every` seconds (default
    `LOG_EVERY`, or $SMAPCTL_PROGRESS_EVERY) (logger
    "smapctl", INFO), and nothing for work done within the first `every` seconds."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        every: float | None = None,
        enabled: bool = True,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = log_every() if every is None else every
        self.done = self.initial = initial  # `initial`: done before (a resumed run); not in the rate
        self.start = self.said = time.monotonic()
        notebook = not on_terminal() and in_notebook()  # (a widget, whose label has room of its own)
        terminal = on_terminal() or notebook
        bar = enabled and terminal
        label = desc if notebook else bar_label(desc)
        self.bar = (
            tqdm(total=total, desc=label, unit=unit, leave=False, initial=initial, delay=BAR_DELAY)
            if bar
            else None
        )
        self.logs = enabled and not terminal

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.logs and (now := time.monotonic()) - self.said >= self.every:
            self.said = now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9)
            logger.info(
                "%s: %s of %s %s (%.1f%%), %s %s/s",
                self.desc, f"{self.done:,}", f"{self.total:,}", self.unit,
                100 * self.done / max(self.total, 1), rate_text(rate), self.unit,
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(
    items: Iterable[T], total: int, desc: str, unit: str, *, enabled: bool = True
) -> Generator[T, None, None]:
    """`items`, one `progress` step each: `for x in tracked(loader, len(loader), "reconstructing", "batch")`
    (a bare tqdm drew its bar into a log file: a carriage return per update, on one line)."""
    with progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
