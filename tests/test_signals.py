"""Graceful stop on SIGINT / SIGTERM (smapctl/train/signals.py)."""

import os
import signal
import sys
import time

import pytest

from smapctl.train.signals import GracefulStop


def _wait_for(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_graceful_stop_sets_flag_then_second_sigint_interrupts():
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and then a second Ctrl-C has nothing to re-deliver to.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        prev_term = signal.getsignal(signal.SIGTERM)
        with GracefulStop(announce=False) as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert _wait_for(lambda: stop.requested)
            assert stop.signal_name == "SIGTERM"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(lambda: False, seconds=2.0)
            # The second signal already put the previous handlers back.
            assert signal.getsignal(signal.SIGTERM) is prev_term
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is prev_term
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("inherited", [signal.SIG_IGN, signal.SIG_DFL])
def test_a_second_sigint_stops_a_process_that_started_with_sigint_ignored(inherited):
    """`cmd &` in a non-interactive shell starts the process with SIGINT ignored: the second Ctrl-C (or
    `kill -INT`) was re-delivered to that, said "stopping at once", and the run went on."""
    outer = signal.signal(signal.SIGINT, inherited)
    try:
        with GracefulStop(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(lambda: stop.requested)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(lambda: False, seconds=2.0)
    finally:
        signal.signal(signal.SIGINT, outer)


def test_graceful_stop_restores_handlers_on_exit():
    prev = signal.getsignal(signal.SIGINT)
    with GracefulStop(announce=False) as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested) and stop.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is prev


def test_a_second_sigterm_ends_the_process_at_once(monkeypatch):
    """smapctl's own SIGTERM handler (outside training loops) raises an exception, which a process stuck
    in a long call would not see; the second SIGTERM of a loop goes to the system's default: the end."""

    def raising(*_):
        raise KeyboardInterrupt

    sent = []
    before = signal.signal(signal.SIGTERM, raising)
    try:
        with GracefulStop(announce=False) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop._handle(signal.SIGTERM, None)
            assert stop.requested and sent == []
            stop._handle(signal.SIGTERM, None)
            assert sent == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_signal_line_ends_a_terminals_progress_bar_first(monkeypatch, capsys):
    """On a terminal the line "SIGINT: finishing this step..." begins on a line of its own, below the bar
    being drawn; in a log file (no bar) it left a blank line before it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with GracefulStop(announce=True) as stop:
        stop._handle(signal.SIGINT, None)
    assert capsys.readouterr().err.startswith("\nSIGINT: finishing this step")


def test_a_second_signal_says_the_run_stops_at_once(monkeypatch, capsys):
    """After the first signal's line ("finishing this step...") a second Ctrl-C ended the run silently."""
    sent = []
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=True) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop._handle(signal.SIGINT, None)
            stop._handle(signal.SIGINT, None)
            assert sent == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, before)
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("SIGINT: finishing this step and saving a checkpoint")  # no blank line before
    assert second == (
        "SIGINT again: stopping at once, without this step's checkpoint; --resume goes on from the newest one"
    )


def test_a_caught_signal_is_remembered_for_the_exit_status(monkeypatch):
    """The command exits with 128 + the signal that stopped its loop (130 for Ctrl-C), so a chained
    `train-tokenizer && train-generator` does not go on: the handler must record it, not only set the flag."""
    monkeypatch.setattr(GracefulStop, "last_signal", None)
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=False) as stop:
            stop._handle(signal.SIGINT, None)
            assert stop.requested and stop.signal_name == "SIGINT"
    finally:
        signal.signal(signal.SIGINT, before)
    assert GracefulStop.last_signal == signal.SIGINT


def test_a_signal_still_stops_the_loop_when_stderr_is_closed(monkeypatch):
    """Writing the "finishing this step" line to a closed stderr raises ValueError (a reentrant write:
    RuntimeError): raised from the handler, it would end the run mid-step instead of asking it to stop."""
    import io

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(announce=True) as stop:
            stop._handle(signal.SIGINT, None)
            assert stop.requested
    finally:
        signal.signal(signal.SIGINT, before)
        GracefulStop.last_signal = None


def test_a_signal_another_process_received_leaves_this_ones_own_as_its_first(monkeypatch):
    """A launcher signals each of its processes, not at once: a process that stopped for another's SIGTERM
    took its own, arriving next, for a second one and ended at once, in the middle of the checkpoint."""
    sent = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        with GracefulStop(announce=False) as stop:
            monkeypatch.setattr(signal, "raise_signal", sent.append)
            stop.take("SIGTERM")
            assert stop.signal_name == "SIGTERM" and GracefulStop.last_signal == signal.SIGTERM
            stop._handle(signal.SIGTERM, None)  # its own
            assert stop.requested and sent == []
            stop.take("SIGINT")  # a signal of its own stays
            assert stop.signal_name == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, before)
        GracefulStop.last_signal = None


@pytest.mark.parametrize("another", [False, True], ids=["main process", "another process of a launch"])
def test_a_hangup_is_taken_once_as_sigterm(monkeypatch, capsys, another):
    """SIGHUP (a terminal gone) goes to SIGTERM's handler of the moment, said once by the main process;
    the SIGHUPs after it are ignored: a hangup may come twice (the kernel's, then the shell's), and as a
    second SIGTERM it would stop a training at once, without its checkpoint."""
    from smapctl.cli import process

    monkeypatch.setattr(process, "_another", another)
    monkeypatch.setattr(process, "hung_up", False)
    taken = []
    before = signal.signal(signal.SIGTERM, lambda signum, _: taken.append(signum))
    hangup = signal.signal(signal.SIGHUP, process._on_sighup)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        assert _wait_for(lambda: taken) and taken == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and process.hung_up
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGHUP, hangup)
    said = capsys.readouterr().err.splitlines()
    assert said == ([] if another else ["SIGHUP (the terminal went away): stopping as for SIGTERM"])
