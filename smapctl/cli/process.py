"""How a `smapctl` command lives as a process: where its output goes (`console`, `err_console`, `say`; its
log lines, `setup_logging`), what SIGINT, SIGTERM and SIGHUP do to it and to its exit (`main`, `entry`), the
processes of a launcher (which one prints, leaving together, outliving the main one), and how an error
becomes one line and an exit status.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from smapctl.train.signals import STOPPING


def a_spawned_worker() -> bool:
    """True in a process that multiprocessing's `spawn` start method (the default on macOS and Windows) is
    setting up from a smapctl command, a DataLoader worker: it runs the `smapctl` script again as its first
    step, importing this module, before it takes its work (torch first: seconds)."""
    import multiprocessing.process

    return bool(getattr(multiprocessing.process.current_process(), "_inheriting", False))


def entry(app) -> None:
    """The `smapctl` program (its console script, `python -m smapctl`): `main`, then the process's exit
    kept from SIGTERM, SIGINT and SIGHUP. Once a command has ended, its files complete and its exit status
    decided, one of them in the tenth of a second the interpreter then takes to shut down (torch's modules
    freed) would otherwise end the process with it (-15) instead of that status: a finished job would read
    as killed. A second one during the exit functions still ends the process (a shutdown that hangs); once
    they have run, they are ignored (`_deaf_as_the_modules_are_freed`; after a hangup, SIGHUP to the end).
    In-process callers (the tests) call `main`, which puts their handlers back."""
    try:
        main(app)
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum in STOPPING:
                if hung_up and signum == signal.SIGHUP:  # (the next ones of a hangup, ignored to the end)
                    signal.signal(signum, signal.SIG_IGN)
                elif signal.getsignal(signum) is not signal.SIG_IGN:  # (ignored: by the shell, or `main`)
                    signal.signal(signum, _the_second_ends_it)


def _the_second_ends_it(signum, frame) -> None:
    """A signal as the process exits, after its command: let go; the next one of its kind ends it."""
    signal.signal(signum, signal.SIG_DFL)


def _deaf_as_the_modules_are_freed() -> None:
    """The last exit function (registered as this module is imported, before torch is): past it the
    interpreter puts the default handlers back (`_PySignal_Fini`) and then frees its modules, for a second
    with torch's, where a SIGINT or SIGTERM ended a finished command with it (-2, -15). Ignored from here,
    unless one came since the command ended (`_the_second_ends_it` let go): the next still ends it."""
    for signum in STOPPING:
        if signal.getsignal(signum) is _the_second_ends_it:
            signal.signal(signum, signal.SIG_IGN)


atexit.register(_deaf_as_the_modules_are_freed)


if a_spawned_worker():
    # A Ctrl-C (to the whole process group, as a terminal sends it; on Windows to the console) while it
    # imports torch would kill it with a traceback, and a training with it, before its checkpoint. The
    # command's own process decides what a signal does and stops its workers itself; forked workers start
    # with both blocked (`data.datasets.deaf_workers`) and do not come here.
    for _signum in STOPPING:
        signal.signal(_signum, signal.SIG_IGN)


def _no_zero_columns() -> None:
    """Take COLUMNS=0 out of the environment, as Python reads it (`shutil.get_terminal_size` asks the
    terminal, else 80): rich takes it for a width of 0 and prints nothing, so every result, error and usage
    line of a command went missing (an error exited 1 or 2 without a word). Before the consoles are made,
    which read it once."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) == 0:
        del os.environ["COLUMNS"]


_no_zero_columns()

# No emoji codes: `digits:train:` or a path with `:name:` in it must print as written.
console = Console(emoji=False, markup=False)  # results name paths, which may hold `[...]`

err_console = Console(stderr=True, emoji=False)


class _OutputThatMayFail:
    """sys.stdout or sys.stderr for a command, which may stop taking its lines while it works: a pipe whose
    reader ended first (`| head`, a `tee` killed with its terminal), a log file on a full disk or over its
    quota (`> ~/train.log`, the run folder elsewhere), a terminal gone (a hangup: its writes fail with
    EIO). The first write that fails points the stream at /dev/null, says why once in the command's log
    when stdout failed (stderr is the log), and the command runs on, its files written as usual and its
    exit status its own. A training piped into `head -2` died at its third progress line without a
    checkpoint (Click made the BrokenPipeError a silent exit 1), one logging to a full disk with a
    traceback, and a `tokenize` stopped by a hangup exited 1 with a traceback from its "stopped by
    SIGTERM" line. Everything else is the stream's own."""

    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name
        self.dropped = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._drop(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._drop(e)

    def _drop(self, e: OSError) -> None:
        """From here on into /dev/null (the stream's unwritten buffer too, at its next flush). A stream in
        non-blocking mode that is full for now (BlockingIOError) is not closed: raised as before."""
        if isinstance(e, BlockingIOError):
            raise e
        if self.dropped:
            return
        self.dropped = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        # (stderr: nowhere left to say it. Help or a usage error: no command runs on to say it of.)
        if self._name != "stdout" or not logging.getLogger().handlers:
            return
        why = (
            "was closed by its reader"
            if isinstance(e, BrokenPipeError)
            else f"could not be written ({e.strerror or e})"
        )
        logging.getLogger("smapctl").warning(
            "the command's output (stdout) %s: what it prints from here on is dropped; it runs on and"
            " writes its files as usual",
            why,
        )

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _outputs_that_may_fail():
    """`_OutputThatMayFail` as sys.stdout and sys.stderr for the block, each when it is a file
    descriptor's (not an in-process caller's capture)."""
    streams = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # none (`>&-`), or a capture
            continue
        streams[name] = stream
        setattr(sys, name, _OutputThatMayFail(stream, name))
    try:
        yield
    finally:
        for name, stream in streams.items():
            if getattr(getattr(sys, name), "_stream", None) is stream:
                setattr(sys, name, stream)


def say(text: str) -> None:
    """One line of a command's result on stdout, as it is: a path in it may hold `[...]` (read as markup, it
    would be cut out of the line or stop the command with a MarkupError traceback once its work is done) or a
    line break (written as \\n, as errors write it); not wrapped at a pipe's 80 columns."""
    from smapctl.errors import one_line

    console.print(one_line(text), highlight=False, soft_wrap=True)


# Where launchers put a process's rank (torchrun and accelerate; the MPI launchers accelerate reads).
_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "MV2_COMM_WORLD_RANK",
)


def not_main_process() -> bool:
    """True in the processes of a launcher other than the main one (without a launcher, torch and
    accelerate are not imported to find out)."""
    if not any(name in os.environ for name in _RANK_VARIABLES):
        return False
    from smapctl.launch import launched_rank

    return launched_rank() != 0


class _StderrHandler(logging.Handler):
    """One line per message on the sys.stderr of the moment (as rich's console writes: a command run
    in-process may replace sys.stderr later), through tqdm, so that a progress bar being drawn on it is
    moved below the message instead of running into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _OneLineFormatter(logging.Formatter):
    """smapctl's own records through `errors.one_line`: they name paths, and a name's bytes that are not
    UTF-8 came out as `\\udcNN` (stderr's backslashreplace) where the command's result and error lines
    write `\\xNN`; a line break in a name as \\n. Other libraries' records stay as they wrote them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from smapctl.errors import one_line

        text = super().formatMessage(record)
        return one_line(text) if record.name.split(".")[0] == "smapctl" else text


def _terminal_handler() -> logging.Handler:
    """On a terminal (or with FORCE_COLOR): rich's coloured level and message, on one line that the
    terminal wraps, not rich: its log table cuts a line at the width into indented pieces, paths split
    mid-name, so the command a stopped run prints to continue it would not paste whole. Through tqdm's
    write mode, as `_StderrHandler`: a bar being drawn is moved below the message."""
    from rich.logging import RichHandler
    from rich.text import Text

    class TerminalHandler(RichHandler):
        def emit(self, record: logging.LogRecord) -> None:
            from tqdm import tqdm

            line = Text.assemble(
                self.get_level_text(record), " ", self.render_message(record, self.format(record))
            )
            try:
                with tqdm.external_write_mode(file=sys.stderr):
                    self.console.print(line, soft_wrap=True)
            except Exception:
                self.handleError(record)

    handler = TerminalHandler(console=err_console, show_time=False, show_path=False)
    handler.setFormatter(_OneLineFormatter("%(message)s"))
    return handler


def setup_logging() -> None:
    if err_console.is_terminal:
        handler = _terminal_handler()
    else:
        # A job's log file (or a pipe): one line per message. Rich would wrap them at 80 columns there, so
        # the command a stopped run prints to continue it would come out split over two indented lines.
        handler = _StderrHandler()
        handler.setFormatter(_OneLineFormatter("%(levelname)s %(message)s"))
    # The other processes of a launcher report errors only: their warnings would repeat the main one's
    # (what they skip or find is summed up by the main process). The unreadable images each one meets
    # are its own, and named by it as met (the first `data.folder.WARNED_AS_MET`), as README says;
    # the logger's name is spelled here, not imported (`--help` imports nothing heavy).
    other = not_main_process()
    logging.basicConfig(
        level=logging.ERROR if other else logging.INFO, format="%(message)s", handlers=[handler]
    )
    if other:
        logging.getLogger("smapctl.data.unreadable").setLevel(logging.WARNING)
    if "torch" not in sys.modules:
        # torch sets its loggers' levels (WARNING, or what TORCH_LOGS asks) as its import ends: a Ctrl-C
        # during that import would leave them at INFO, and torch's exit hooks print "INFO FakeTensor cache
        # stats:" and its counts under the command's stop line.
        logging.getLogger("torch").setLevel(logging.WARNING)
    # matplotlib's INFO is its own bookkeeping: "INFO generated new fontManager" would come among a first
    # `evaluate`'s (or `cross-recon`'s) lines on each new machine or CI container, as if smapctl said it.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def leave_processes() -> None:
    """Close a launcher's process group when a command ends well, or stops in every process at once (a
    `UserError.agreed`, a training stopped by a signal after its checkpoint): PyTorch warns of a leaked
    NCCL group at exit otherwise, and a gloo group left open could end the process by SIGABRT
    ("terminate called without an active exception") instead of its exit status. After any other error
    it stays open, as closing may wait on processes that are stuck. Read from sys.modules: a command that
    never imported torch has no group (and `--help` stays instant)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _leave_together() -> None:
    """`leave_processes` after an error every process of a launcher raised at the same point (a
    `UserError.agreed`), once all of them are there. torchrun sends SIGTERM to the others as soon as one
    has exited: the first out (often not the main process, which prints the error) would get the slower
    ones killed before they ignore SIGTERM, exiting 143 or -15 instead of the error's status, without its
    line, their gloo group left open (which can end a process by SIGABRT). Each process ignores SIGTERM
    before it gets here (`_ignore_sigterm`), so none is left to be killed once the barrier is passed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with contextlib.suppress(RuntimeError):  # another process left anyway: this one goes on out
            dist.barrier()
    leave_processes()


def _lost_another_process(e: RuntimeError) -> bool:
    """True for the error a collective raises when another process of the group has gone (gloo: the peer
    closed its connection; NCCL: a remote error or an abort)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(e, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(e)
    markers = (
        "Connection closed by peer",
        "Connection reset by peer",
        "Broken pipe",
        "NCCL communicator was aborted",
    )
    return any(marker in text for marker in markers)


terminated = False  # set when SIGTERM stopped the command
hung_up = False  # set when SIGHUP came (`_on_sighup`)
_another = False  # a process of a launcher other than the main one (`main`), which leaves the saying to it

_leaving = False  # set when the command is on its way out with an error (`_ignore_sigterm`)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (`kill`, a cluster's pre-emption or time limit) raised where the command is, as Ctrl-C
    is: its `finally` blocks run, so no half-written temporary file is left behind."""
    global terminated
    terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    # Where Python cannot raise it (a callback for an import's module lock, a `__del__`) the interrupt is
    # lost, "Exception ignored in ...": a training loop begun after it stops at its first step. (`main`
    # imported the module before it set this handler: no import here.)
    sys.modules["smapctl.train.signals"].GracefulStop.unheard = signal.SIGTERM
    raise KeyboardInterrupt


def _on_sighup(signum, frame) -> None:
    """SIGHUP (the terminal or ssh session the command runs in has gone away) taken as SIGTERM: a training
    finishes its step, writes its checkpoint and stops (143), any other command stops as for SIGTERM.
    By default it ended the process at once, the steps since the last checkpoint lost. The SIGHUPs after
    it are ignored: a hangup may come more than once (the shell's to each of its jobs, the kernel's to the
    foreground job as the shell exits), and a second SIGTERM would stop at once, without the checkpoint."""
    global hung_up
    hung_up = True
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not _another:
        signals = sys.modules["smapctl.train.signals"]  # (imported by `main`: no import in a handler)
        lead = "\n" if signals.on_terminal() else ""  # (a bar being drawn: `kill -HUP` on a live terminal)
        signals.say_from_handler(f"{lead}SIGHUP (the terminal went away): stopping as for SIGTERM")
    signal.raise_signal(signal.SIGTERM)  # to SIGTERM's handler of the moment (a training's, or `_on_sigterm`)


@contextlib.contextmanager
def stopping_together():
    """A signal stopped every process of a launcher after the same round of work (`launch.RoundStops`:
    the main process said how far they got): each leaves with the signal's status, as a stopped training
    does."""
    from smapctl.launch import StoppedTogether

    try:
        yield
    except StoppedTogether as e:
        _ignore_sigterm()
        _leave_together()
        raise typer.Exit(128 + e.signum) from None


def _ignore_sigterm() -> None:
    """SIGTERM ignored from here on (in the main thread), by a process on its way out with an error: a
    launcher sends SIGTERM to every process once one has exited (often another one that met the same
    error and said nothing), and it must not cut the error line short, or leave none. `main` puts the
    earlier handler back as it returns, except under torchrun (see `main`)."""
    global _leaving
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _leaving = True


PLAIN_BELOW = 110  # columns (`_plain_help_when_narrow`)


@contextlib.contextmanager
def _plain_help_when_narrow(app, argv: list[str]):
    """Typer's boxed help cuts a word longer than its column with an ellipsis (`--inception-weig…`;
    `evaluate`'s `weights-inception-2015-12-05-6726825d.pth` needs 107 columns): below `PLAIN_BELOW`
    columns, and when help goes to a file or a pipe (80 columns), Click's plain help, which wraps them,
    is shown instead: for a command's options (the list of commands reads better boxed, where Click
    shortens each line; its words fit 40 columns). Usage errors keep Typer's box."""
    import shutil

    import typer.core

    before = typer.core.HAS_RICH  # read when help is formatted (from TYPER_USE_RICH at import)
    if any(a in ("-h", "--help") for a in argv[1:]) and shutil.get_terminal_size().columns < PLAIN_BELOW:
        words = [a for a in argv[1:] if not a.startswith("-")]
        groups = {group.name for group in app.registered_groups}  # `reproduce`: a list of commands
        if words and words[-1] not in groups:
            typer.core.HAS_RICH = False
    try:
        yield
    finally:
        typer.core.HAS_RICH = before  # the Python API or the tests may run another command after


QUIETED: list[tuple] = []  # the streams (stdout, stderr) that Click's own output does not reach


def _refuse_a_removed_current_folder(argv: list[str]) -> None:
    """A command (not its --help) run in a folder removed after the shell went into it: one line saying so.
    torch's import stopped the process there with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
    and status 2, which named neither the folder nor what to do."""
    from smapctl.errors import UserError

    if any(a in ("-h", "--help") for a in argv[1:]):
        return
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UserError(
            "the current folder no longer exists (removed after the shell went into it):"
            " cd into a folder that exists and run the command again"
        ) from None


@contextlib.contextmanager
def _click_output_from_the_main_process(other: bool):
    """In the processes of a launcher other than the main one (`other`), what Click prints itself goes
    nowhere: help, `--version` and usage errors (an unknown option, a missing argument, a bad value) come
    from the command line, which every process reads alike, and each would print them. They still exit with
    the same status. The commands' own output is theirs (`_Command.invoke`)."""
    if not other:
        yield
        return
    import io

    streams = sys.stdout, sys.stderr
    QUIETED.append(streams)
    sys.stdout = sys.stderr = io.StringIO()
    try:
        yield
    finally:
        QUIETED.pop()
        sys.stdout, sys.stderr = streams


def _stop_with_the_launcher() -> None:
    """Under torchrun (and `accelerate launch`, which uses it) each worker gets one SIGTERM when the
    launcher dies: torchrun starts its workers in sessions of their own, so `kill -9` of the launcher's
    group left them training, writing checkpoints beside a resumed run. A daemon thread looks at the
    parent once a second. (The kernel's parent-death signal comes once per thread of the dying launcher,
    and a second SIGTERM means "stop at once"; a handler turning it into one SIGTERM can be re-entered.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="smapctl-launcher-watch", daemon=True).start()


def _debug() -> bool:
    """Tracebacks instead of one-line errors: `--debug` (which sets it as the command line is read) or
    SMAPCTL_DEBUG."""
    return bool(os.environ.get("SMAPCTL_DEBUG"))


def _said_once(message: str) -> int:
    """An error every process of a launcher meets alike (a path, another process gone), printed by the
    main process alone: the status to exit with."""

    _ignore_sigterm()
    if not not_main_process():
        _print_error(message)
    return 1


def _print_error(message: str) -> None:
    """`error: MESSAGE` on stderr, one line."""
    from smapctl.errors import one_line

    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def _said_user_error(e) -> int:
    """A `UserError`, printed once under a launcher when every process met it alike, else by each (its
    own); the processes that agreed on it leave together. The status to exit with."""
    from smapctl.errors import one_line

    held = _hold_sigterm() if e.same_in_every_process and not_main_process() and not e.agreed else None
    _ignore_sigterm()
    if not (e.same_in_every_process and not_main_process()):
        # Another process of a launcher starts a line of its own: the main one's progress bar may be
        # drawn on the current one (its error would be read as part of the bar).
        lead = "\n" if not_main_process() else ""
        err_console.print(
            f"{lead}[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True
        )
    if e.agreed:
        _leave_together()
    if held is not None and not _outlive_the_main_process(held):
        # The main process did not exit with it: it did not meet this error, and nobody printed it (the
        # main one said only that another process had stopped, "its message ... above").
        from smapctl.launch import launched_rank

        err_console.print(
            f"\n[bold red]error:[/] process {launched_rank()} of the launch: {escape(one_line(str(e)))}",
            highlight=False,
            soft_wrap=True,
        )
    return e.exit_code


# How long a process of a launcher that leaves an error to the main process waits for the main one to exit.
MAIN_PROCESS_GRACE = 30.0


def _hold_sigterm() -> set | None:
    """Under torchrun (`accelerate launch` too), SIGTERM blocked, kept pending for
    `_outlive_the_main_process` (on Linux a blocked signal is not discarded though ignored) -> the signal
    mask before; None elsewhere (another launcher, a test's emulated rank), where nothing is waited for."""
    if (
        "TORCHELASTIC_RUN_ID" in os.environ
        and hasattr(signal, "sigtimedwait")
        and threading.current_thread() is threading.main_thread()
    ):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return None


def _outlive_the_main_process(held: set) -> bool:
    """In a process of a launcher other than the main one, leaving with an error that the main process
    prints (a usage error, a refused launcher, any error every process meets alike): wait for torchrun's
    SIGTERM, which comes once the main process has exited, or MAIN_PROCESS_GRACE seconds -> whether it
    came. Exiting first, it would have torchrun's SIGTERM end the main process, on a loaded machine still
    importing torch, without its line and with -15. `held`: the signal mask `_hold_sigterm` replaced, put
    back (SIGTERM is ignored by then)."""
    try:
        return signal.sigtimedwait({signal.SIGTERM}, MAIN_PROCESS_GRACE) is not None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _on_exit(e: SystemExit) -> None:
    """Click's own exit (0 when a command ends well, 2 for a usage error, 130 for Ctrl-C): a SIGTERM that
    stopped the command exits as one (143)."""
    if not e.code:
        leave_processes()
    elif e.code == 2 and not_main_process() and (held := _hold_sigterm()) is not None:
        _ignore_sigterm()  # (a usage error, which the main process prints)
        _outlive_the_main_process(held)
    else:
        _ignore_sigterm()
    if e.code == 130 and terminated:  # Typer's code for Ctrl-C
        sys.exit(_stopped_by_sigterm())


def _stopped_by_sigterm() -> int:
    """The line "stopped by SIGTERM", said by the main process of a launch (or the one process) -> the
    status to exit with, 143."""
    if not not_main_process():
        err_console.print("stopped by SIGTERM", style="red", highlight=False)
    return 128 + signal.SIGTERM


def _this_process_is_another() -> bool:
    """Whether this is a process of a launcher other than the main one; a rank accelerate cannot read
    (`RANK=x`) is one line and status 1, Ctrl-C while the launcher imports torch 130."""
    try:
        return not_main_process()
    except KeyboardInterrupt:  # under a launcher that imported torch (seconds): each would print a traceback
        sys.exit(128 + signal.SIGINT)
    except ValueError as e:  # which process this is is unknown
        from smapctl.launch import environment_problem  # (it imports torch: not for --help)

        message = environment_problem(e)
        if _debug() or message is None:
            raise
        _print_error(message)
        sys.exit(1)


def _said_status(e: Exception) -> int | None:
    """The status to exit with for an error the command raised, said in one line; None for a fault (or
    under --debug), which is shown in full."""
    from smapctl.errors import UserError, no_temp_folder, path_error

    if _debug():
        return None
    if isinstance(e, UserError):
        return _said_user_error(e)
    if isinstance(e, OSError):
        # A path the system refused where no code expected it (a file name over the system's limit): one
        # line naming it, not a traceback. An OSError naming no path is a fault, shown in full.
        message = path_error(e) or no_temp_folder(e)
    elif isinstance(e, ValueError):
        # An environment variable accelerate reads holds a value it cannot (`ACCELERATE_USE_CPU=maybe`,
        # `WORLD_SIZE=two`): one line naming it, not accelerate's traceback, which does not.
        from smapctl.launch import environment_problem  # (it imports torch: not for a recipe's error)

        message = environment_problem(e)
    elif isinstance(e, RuntimeError) and _lost_another_process(e):
        # Another process of a launcher stopped (its own error is printed above): this one's collective
        # failed after it. One line, from the main process, instead of a page of gloo or NCCL traceback.
        message = (
            "another process of this launch stopped (its message, if it could leave one, is above);"
            " this one stopped with it"
        )
    else:
        message = None
    return None if message is None else _said_once(message)


def _status_unless_terminated(e: Exception) -> int | None:
    """`_said_status(e)`, or 143 when a SIGTERM came as the error was being looked at, before SIGTERM was
    ignored (`_on_sigterm` raised KeyboardInterrupt there): a launcher's, sent once another process has
    exited, while the main process was still finding that process gone. It exited -2 (Python's status for
    an unhandled KeyboardInterrupt) with a traceback, where a process ended by that SIGTERM exits 143."""
    try:
        return _said_status(e)
    except KeyboardInterrupt:
        if not terminated:
            raise
        _ignore_sigterm()
        return _stopped_by_sigterm()


def main(app) -> None:
    """Run the Typer `app` as the command `smapctl`: its errors as one line and a status, its signals as
    a launcher's processes expect them, its output streams as they may fail (`_OutputThatMayFail`: also
    for the lines said as it ends)."""
    with _outputs_that_may_fail():
        _main(app)


def _main(app) -> None:
    from smapctl.errors import UserError
    from smapctl.train.signals import CommandEnd, GracefulStop

    # Training loops catch SIGTERM themselves (to save a checkpoint) and put this handler back after.
    global terminated, hung_up, _another, _leaving
    terminated, hung_up, _leaving, previous, previous_hangup = False, False, False, None, None
    # The signal that stopped a training earlier in this process (the Python API, a test) is not this
    # command's: otherwise a training run next would exit 130 as if stopped by it.
    GracefulStop.last_signal = GracefulStop.unheard = None
    other = _another = _this_process_is_another()
    # More DataLoader workers than CPUs: torch says so as the loader is made and again as it is iterated.
    # Under a launcher the main process says it (once; each process's loaders are alike).
    warnings.filterwarnings(
        "ignore" if other else "once", message="This DataLoader will create", category=UserWarning
    )
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        # SIGHUP as SIGTERM, unless the command was started to ignore it (`nohup`)
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            previous_hangup = signal.signal(signal.SIGHUP, _on_sighup)
    # Once a command's files are complete, the signals its last work caught stay caught to the very end
    # (its final print, its process group left): otherwise one there would exit 130 with every file written.
    end = CommandEnd()
    try:
        _stop_with_the_launcher()
        _refuse_a_removed_current_folder(sys.argv)
        with _plain_help_when_narrow(app, sys.argv), _click_output_from_the_main_process(other):
            app()
        end.ended_well = True
    except (UserError, OSError, ValueError, RuntimeError) as e:
        if (status := _status_unless_terminated(e)) is None:
            raise
        sys.exit(status)
    except SystemExit as e:
        end.ended_well = not e.code
        _on_exit(e)
        raise
    finally:
        end.close()  # before SIGTERM's handler is put back: the command's, held, was installed after it
        # A torchrun worker on its way out with an error keeps ignoring SIGTERM until the process ends:
        # the launcher sends it once another process has exited, and the default handler put back here
        # would kill this one as the interpreter shuts down (-15 instead of the error's status).
        if previous is not None and not (_leaving and "TORCHELASTIC_RUN_ID" in os.environ):
            signal.signal(signal.SIGTERM, previous)
        if previous_hangup is not None:
            signal.signal(signal.SIGHUP, previous_hangup)
        # The command's SIGTERM (heard or lost) is over with it, its handler gone: noted as lost, it would
        # stop the next tokenize, sampling, token cache or training of the Python API in this process after
        # its first batch or step (`signals.stop_if_unheard`).
        GracefulStop.unheard = None
    leave_processes()
