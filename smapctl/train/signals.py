"""Stop a training loop cleanly on Ctrl-C or SIGTERM (a cluster's pre-emption notice)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from smapctl.progress import on_terminal

# The signals that stop a command (SIGHUP, where there is one, taken as SIGTERM: `cli.process._on_sighup`):
# its data workers ignore them, as the command decides what they do and stops its workers itself, and a
# finished command's exit is kept from them (`cli.process.entry`).
STOPPING = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))

RESUME_FROM_NEWEST = "--resume goes on from the newest one"
NO_CHECKPOINT_YET = "no checkpoint was written yet: run the command again without --resume"


class GracefulStop:
    """Inside `with GracefulStop() as stop:`, SIGINT/SIGTERM only set `stop.requested`, so the loop can
    finish its step, write a checkpoint and return. A second signal restores the previous handlers and
    re-delivers itself: a second Ctrl-C raises KeyboardInterrupt at once (also in a process that started
    with SIGINT ignored, as a non-interactive shell starts a background job), a second SIGTERM terminates.
    The previous handlers are restored on exit. Outside the main thread, signals cannot be caught and
    this is a no-op.

    Under several processes each one gets its own flag; the loop should stop when any process asks
    (reduce the flags across processes before deciding, and `take` the signal another one received).

    `GracefulStop.last_signal` keeps the number of the last signal that asked a loop to stop in this
    process, so a command can exit with 128 + that number, as a program killed by it would: a chained
    `smapctl train-tokenizer ... && smapctl train-generator ...` must not go on after Ctrl-C.
    """

    last_signal: int | None = None
    # A SIGTERM the command's handler (`cli.process._on_sigterm`) turned into a KeyboardInterrupt where
    # Python cannot raise one: in a callback it runs for an import's module lock, or a `__del__`. Python
    # prints "Exception ignored in ..." and loses it, and a training started after it would run to its end,
    # to be killed by the scheduler's SIGKILL without a checkpoint. `take_unheard` asks the loop to stop.
    unheard: int | None = None

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), announce: bool = True):
        self.signals = signals
        self.announce = announce
        self.requested = False
        self.signal_name: str | None = None
        # What goes on after a second signal (the loop says what it knows: before its first checkpoint,
        # --resume would fail)
        self.after_second = RESUME_FROM_NEWEST
        self.said = False  # the signal taken has been said (`unsaid`)
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if self.announce:  # else it would end without a word after the first signal's line
                say_from_handler(
                    f"{signal.Signals(signum).name} again: stopping at once, without this step's checkpoint; "
                    + self.after_second
                )
            self._restore()
            if signum == signal.SIGTERM:  # at once, even if the process is stuck in a long call
                signal.signal(signum, signal.SIG_DFL)
            elif signal.getsignal(signum) in (signal.SIG_IGN, signal.SIG_DFL, None):
                # A process started in the background by a non-interactive shell inherits SIGINT ignored:
                # re-delivered to that, the second Ctrl-C would be lost and the run would go on.
                signal.signal(signum, signal.default_int_handler)
            # raise(), not os.kill(getpid()): on Windows os.kill ends the process outright, with no handler
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        GracefulStop.last_signal = signum
        if self.announce:
            # On a terminal the progress bar's line is ended first; a log file has no bar, and would get
            # a blank line before it.
            lead = "\n" if on_terminal() else ""
            say_from_handler(
                f"{lead}{self.signal_name}: finishing this step and saving a checkpoint "
                "(send it again to stop at once)"
            )

    # The signals the processes of a launcher stop for together, in the order they take one when they
    # received different ones: a scheduler's SIGTERM before a SIGINT.
    SHARED = ("SIGTERM", "SIGINT")

    def flags(self) -> list[float]:
        """1.0 for the `SHARED` signal this process was asked to stop by, else 0.0: summed over the
        processes, `first_asked` tells which one they all take."""
        return [float(self.requested and self.signal_name == name) for name in self.SHARED]

    @classmethod
    def first_asked(cls, counts) -> str | None:
        """The signal some process was asked to stop by, from the summed `flags` (SIGTERM first), or None."""
        return next((name for name, count in zip(cls.SHARED, counts, strict=True) if count > 0), None)

    def take(self, name: str) -> None:
        """Name the signal `name` another process of a launcher received as this one's, so the loop says it
        and the command exits with its status; a signal of its own stays. `requested` stays as it was: a
        signal of its own arriving next (the launcher signals each process) is its first, not a second
        one that would end it at once, in the middle of the checkpoint the others are writing."""
        if self.signal_name is None:
            self.signal_name = name
            GracefulStop.last_signal = int(signal.Signals[name])

    def unsaid(self) -> str | None:
        """The name of the signal taken, the first time it is asked for (then it is said), else None: a
        signal is said once, where it is first seen (by a `completing` block, or at the command's end)."""
        if not self.requested or self.said:
            return None
        self.said = True
        return self.signal_name

    def take_unheard(self) -> None:
        """A signal the command received before this loop began and lost (`unheard`) asks it to stop,
        as if it came now: the loop stops after its first step with a checkpoint."""
        signum, GracefulStop.unheard = GracefulStop.unheard, None
        if signum is not None and not self.requested:
            self._handle(signum, None)

    def let_go(self) -> None:
        """The handlers it replaced put back, for the signals it still handles: one set since (`cli`'s
        SIGTERM ignored by a command on its way out with an error) stays."""
        self._previous = {s: h for s, h in self._previous.items() if signal.getsignal(s) == self._handle}
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: the old handler was installed outside Python; the default is the best we can do.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def stop_if_unheard() -> None:
    """In the work loop of one process (`tokenize`, `sample`, a token cache), after a batch that was not
    the last: a SIGTERM Python lost before the work began (`GracefulStop.unheard`) stops it here, as one
    that came during the batch would (the KeyboardInterrupt `cli`'s handler raises). Otherwise the work
    would run to its end, to be killed by the scheduler's SIGKILL that follows, with nothing kept for
    --resume."""
    if GracefulStop.unheard is not None:
        GracefulStop.unheard = None
        raise KeyboardInterrupt


@contextmanager
def completing(complete: str | None = None) -> Iterator[GracefulStop]:
    """A `GracefulStop` without its line, for the last of a command's work (its result being written, a
    sampling's last round): a SIGINT or SIGTERM meanwhile only sets `requested`, the work finishes and the
    command ends as a complete one (exit 0), the caller saying so in one line. A second signal stops at
    once, as `GracefulStop`'s does. `GracefulStop.last_signal` is as it was before, however the block
    ends: it tells a training's command to exit as interrupted, and one run later in the same process
    (the Python API, a test) would exit 130 for a signal a sampling or an evaluation has taken.

    `complete`, for the last work of a CLI command (`CommandEnd`): what is written once the block ends
    well ("the token file codes.pt is written; tokenize is complete"). The signals stay caught until the
    command has ended (its final print, its output folder let go): otherwise one there would exit 130 with
    every file written. The command's end says such a signal, with `complete`."""
    before = GracefulStop.last_signal
    stop = GracefulStop(announce=False).__enter__()
    try:
        yield stop
        if complete is not None and CommandEnd.current is not None:
            CommandEnd.current.keep(stop, complete, before)
            stop = None
    finally:
        if stop is not None:
            stop.__exit__()
        GracefulStop.last_signal = before


def completed(complete: str) -> None:
    """The last work of a CLI command is done, its files complete (`complete` says which): a signal until
    the command has ended lets it end as complete (exit 0), said in one line; as a `completing(complete)`
    block ending here."""
    with completing(complete):
        pass


def say_late_signal(said: str | None, in_last_round: bool, done: str, complete: str) -> None:
    """Say the signal (`said`: its name, or None) that came as a command's work ended, which let the work
    finish: during a launch's last round, or once every image was `done` ("encoded", "drawn"), followed
    by what is `complete`."""
    if said is not None:
        when = "during the last round" if in_last_round else f"once every image was {done}"
        logging.getLogger("smapctl").warning("%s %s: %s", said, when, complete)


class CommandEnd:
    """The end of a CLI command (`cli.process.main`), to which the `completing` blocks of its last work hand
    their caught signals once its files are complete: held until the command has ended, so that no signal
    between the files and the command's end (its final print, its output folder let go, the launcher's
    process group left) exits 130 with the work complete. Outside a command (the Python API) nothing is
    held."""

    current: CommandEnd | None = None

    def __init__(self) -> None:
        self.held: list[tuple[GracefulStop, str, int | None]] = []
        self.ended_well = False
        CommandEnd.current = self

    def keep(self, stop: GracefulStop, complete: str, last_signal: int | None) -> None:
        """Hold `stop` (its handlers in place) until `close`; `last_signal`: `GracefulStop.last_signal`
        before it, put back then."""
        self.held.append((stop, complete, last_signal))

    def close(self) -> None:
        """The handlers held put back (the newest first); a signal they took once the command's files were
        complete is said in one line, when it ended well (else its error is what it says)."""
        CommandEnd.current = None
        for stop, _, last_signal in reversed(self.held):
            stop.let_go()
            GracefulStop.last_signal = last_signal
        if not self.ended_well:
            return
        for stop, complete, _ in self.held:
            name = stop.unsaid()
            if name is not None:
                logging.getLogger("smapctl").warning("%s as the command ended: %s", name, complete)


def say_from_handler(text: str) -> None:
    """A line on stderr from a signal handler: a closed pipe (or a write it interrupted) must not keep
    the handler from doing what the signal asks."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, RuntimeError):
        pass
