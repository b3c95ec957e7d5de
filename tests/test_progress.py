"""Long work says how far it got: a bar on a terminal, a log line now and then elsewhere."""

import logging
from types import SimpleNamespace

import smapctl.progress as progress_module
from smapctl.progress import progress


class Terminal:
    text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def tqdm_clock(monkeypatch) -> list[float]:
    """The clock tqdm's bars read (`tqdm.std.time`, taken by each bar as it starts): `now[0] += s`."""
    import tqdm.std

    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    return now


def test_without_a_terminal_it_logs_a_line_now_and_then(monkeypatch, caplog):
    """`tokenize` of ImageNet under a scheduler said nothing for 20 minutes (tqdm's bar is off there)."""
    caplog.set_level(logging.INFO, logger="smapctl")
    clock = iter([0.0, 10.0, 70.0, 80.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with progress(1_281_167, "tokenizing", "images") as bar:  # started at 0 s
        bar.update(1_000)  # 10 s: too soon to say
        bar.update(20_000)  # 70 s: a line
        bar.update(1_000)  # 80 s: too soon again
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["tokenizing: 21,000 of 1,281,167 images (1.6%), 300 images/s"]


def test_tracked_loops_log_as_progress_does(monkeypatch, caplog):
    """`evaluate`'s loops drew tqdm bars into logs (a carriage return per update); they go through
    `progress` now."""
    from smapctl.progress import tracked

    caplog.set_level(logging.INFO, logger="smapctl")
    clock = iter([0.0, 10.0, 70.0, 80.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    assert list(tracked("abc", 3, "reconstructing", "batches")) == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == [
        "reconstructing: 2 of 3 batches (66.7%), 0.0286 batches/s"
    ]


def test_rates_are_plain_numbers():
    """`%.3g` wrote a rate above 1,000 as `1.27e+03 images/s`, beside `804 images/s`."""
    from smapctl.progress import rate_text

    assert [rate_text(r) for r in (1270.4, 1_234_567.0, 804.2, 100.0, 99.94, 12.34, 0.4167, 0.0)] == [
        "1,270", "1,234,567", "804", "100", "99.9", "12.3", "0.417", "0"
    ]  # fmt: skip


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="smapctl")
    now = tqdm_clock(monkeypatch)
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    with progress(10, "decoding", "images", every=0) as bar:
        now[0] += 3
        bar.update(10)
    assert caplog.records == [] and "decoding" in terminal.text
    assert terminal.text.endswith("\r")  # gone when done (`leave=False`): the line is blanked
    # `enabled=False` (the other processes of a launcher): neither.
    terminal.text = ""
    with progress(10, "decoding", "images", every=0, enabled=False) as bar:
        now[0] += 3
        bar.update(10)
    assert caplog.records == [] and terminal.text == ""


def test_a_long_label_leaves_the_bar_its_rate_and_a_log_line_says_it_whole(monkeypatch, caplog):
    """A folder's name in the label (`Inception statistics of FOLDER`) pushed the rate and the time left
    off an 80-column terminal; a log line (no terminal) still names the whole folder."""
    caplog.set_level(logging.INFO, logger="smapctl")
    monkeypatch.setenv("COLUMNS", "80")
    now = tqdm_clock(monkeypatch)
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    label = "Inception statistics of imagenet-validation-images-resized-to-256"
    with progress(10, label, "images") as bar:
        now[0] += 3
        bar.update(10)
    [drawn] = [line for line in terminal.text.split("\r") if "10/10" in line]
    assert drawn.startswith("Inception statistic...: ") and 0 < drawn.find("images/s") <= 80 - 8, drawn
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    with progress(10, label, "images", every=0) as bar:
        bar.update(10)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [label]


def test_a_bars_label_takes_the_width_of_the_terminal_it_is_drawn_on():
    """The bars are drawn on stderr: with stdout written to a file (`... > out.txt`) a label was cut to the
    80 columns of no terminal while stderr's had 150."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    code = "from smapctl.progress import bar_label; print(bar_label('x' * 80))"
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 150, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    try:
        r = subprocess.run(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=env,
            text=True,
            timeout=60,
        )
    finally:
        os.close(main)
        os.close(terminal)
    assert r.returncode == 0 and r.stdout.strip() == "x" * 80, r.stdout


def test_on_a_terminal_only_work_that_lasts_draws_a_bar(monkeypatch):
    """A tiny model's sample grid (7 passes in 0.1 s) drew a bar that was gone at once: a flicker, and
    a line of clutter in the terminal's log. A bar waits `BAR_DELAY` seconds for its first update."""
    now = tqdm_clock(monkeypatch)
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    with progress(7, "the sample grid", "passes") as bar:
        for _ in range(7):
            now[0] += 0.1
            bar.update(1)
    assert terminal.text == ""
    # A pass a second and a half: nothing at the first (1.5 s), the bar from the second (3 s) on.
    now[0] = 0.0
    with progress(7, "the sample grid", "passes") as bar:
        now[0] += 1.5
        bar.update(1)
        assert terminal.text == ""
        for _ in range(6):
            now[0] += 1.5
            bar.update(1)
    assert "1/7" not in terminal.text and "2/7" in terminal.text and "7/7" in terminal.text
    assert terminal.text.endswith("\r")  # and gone when done, as before


def test_the_interval_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", "600")
    assert progress(1, "x", "images").every == 600
    for bad in ("nan", "inf", "soon"):  # nan turned the lines off without a word
        monkeypatch.setenv("SMAPCTL_PROGRESS_EVERY", bad)
        assert progress(1, "x", "images").every == progress_module.LOG_EVERY
        assert f"SMAPCTL_PROGRESS_EVERY={bad!r}: not a number of seconds; 60 is used" in caplog.text


def test_a_resumed_run_counts_from_where_it_was_and_rates_only_its_own_work(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="smapctl")
    clock = iter([0.0, 100.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with progress(1_000, "tokenizing", "images", initial=600, every=60) as bar:
        bar.update(100)  # 100 s
    assert [r.getMessage() for r in caplog.records] == ["tokenizing: 700 of 1,000 images (70.0%), 1 images/s"]
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: 0.0)
    now = tqdm_clock(monkeypatch)
    with progress(1_000, "tokenizing", "images", initial=600) as bar:
        now[0] += 3
        bar.update(1)
    assert "601/1000" in terminal.text


def test_a_jupyter_kernel_gets_a_bar(monkeypatch, capsys):
    """In a notebook stderr is no terminal: the API's encode and sample were silent for minutes (its
    bars are off without a terminal, not turned into log lines). A Jupyter kernel gets tqdm.auto's bar."""
    import sys
    import types

    from smapctl.progress import in_notebook

    assert not in_notebook()
    ipython = types.ModuleType("IPython")
    jupyter = type("ZMQInteractiveShell", (), {})
    colab = type("Shell", (jupyter,), {})  # Colab's and Spyder's: subclasses under other names
    for shell, expected in (
        (jupyter, True),
        (colab, True),
        (type("TerminalInteractiveShell", (), {}), False),
    ):
        ipython.get_ipython = shell
        monkeypatch.setitem(sys.modules, "IPython", ipython)
        assert in_notebook() is expected, shell
    monkeypatch.setattr(progress_module, "in_notebook", lambda: True)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    monkeypatch.setenv("COLUMNS", "80")  # (what a kernel's stderr, no terminal, gives)
    now = tqdm_clock(monkeypatch)
    label = "sampling " + "x" * 60  # whole: the widget has room for it, unlike an 80-column terminal
    with progress(3, label, "images", every=float("inf")) as bar:
        now[0] += 3
        bar.update(3)
    assert label in capsys.readouterr().err


def test_a_bar_inside_the_training_bar_waits_too_and_draws_below_it(monkeypatch):
    """The sample grid and the validation of a training run draw below the run's own bar (tqdm's position
    1); quick ones drew a second line there and took it away at once."""
    from tqdm.auto import tqdm

    now = tqdm_clock(monkeypatch)
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    with tqdm(total=100, desc="run", unit="step") as run:  # as `Runner._start_progress` draws it
        drawn = terminal.text
        with progress(7, "the sample grid", "passes") as bar:
            for _ in range(7):
                now[0] += 0.1
                bar.update(1)
        assert terminal.text == drawn
        with progress(2, "validation", "images") as bar:
            for _ in range(2):
                now[0] += 1.5
                bar.update(1)
        assert terminal.text.removeprefix(drawn).startswith("\n\rvalidation:")  # on the line below
        run.update(1)


def test_a_rate_that_rounds_to_a_thousand_is_written_with_a_separator():
    """`%.3g` of 999.7 is `1e+03`: the plain form takes over from 100 on, where both agree."""
    from smapctl.progress import rate_text

    assert [rate_text(r) for r in (999.7, 100.4)] == ["1,000", "100"]


def test_a_label_is_cut_with_an_ellipsis_and_left_out_where_under_8_columns_remain(monkeypatch):
    """The bar's counts take `BAR_COUNTS_WIDTH` columns; of the rest, fewer than 8 hold no useful label."""
    from smapctl.progress import BAR_COUNTS_WIDTH, bar_label

    name = "smap-b-vq-imagenet-" + "x" * 40
    monkeypatch.setenv("COLUMNS", str(BAR_COUNTS_WIDTH + 8))
    assert bar_label(name) == "smap-..."
    monkeypatch.setenv("COLUMNS", str(BAR_COUNTS_WIDTH + 7))
    assert bar_label(name) == ""
    monkeypatch.setenv("COLUMNS", str(BAR_COUNTS_WIDTH + len(name)))
    assert bar_label(name) == name


def test_a_terminal_of_no_size_takes_the_width_shutil_gives(monkeypatch):
    """A terminal whose size was never set (a serial console, a container's fresh pty) says 0 columns:
    taken as stderr's width, every bar's label would be cut to nothing. Its width is then shutil's
    (stdout's, or 80 columns), and a 20-character label is kept whole."""
    import os

    from smapctl.progress import bar_label

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(progress_module.sys, "stderr", SimpleNamespace(fileno=lambda: 2))
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    assert bar_label("x" * 20) == "x" * 20
