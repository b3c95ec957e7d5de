"""Commands started by a multi-process launcher (`accelerate launch`, `torchrun`): which spread their work
over the processes (training, `sample`, `tokenize`, `evaluate` of a tokenizer or a generator), and which
refuse to run more than once at a time."""

from __future__ import annotations

import ast
import os
import re
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

from smapctl.errors import UserError, agreed

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (1 without one): torchrun's `WORLD_SIZE`, or the size an
    MPI launcher (`accelerate launch --mpirun_hostfile`, `mpirun`) gives, read as accelerate reads them."""
    from accelerate.utils import get_cpu_distributed_information

    return get_cpu_distributed_information().world_size


# The environment variables accelerate reads: its own (`accelerate launch` passes its options in them) and
# those of the launchers whose processes it joins (torchrun's, MPI's).
_ACCELERATE_READS = ("ACCELERATE_", "FSDP_", "RANK", "WORLD_SIZE", "LOCAL_", "PMI_", "OMPI_", "MV2_", "MPI_")


def environment_problem(e: BaseException) -> str | None:
    """One line for accelerate's ValueError at an environment variable of its own or a launcher's that it
    cannot read (`ACCELERATE_USE_CPU=maybe`, `RANK=x`): its message names the value, not the variable, and
    comes as a traceback. None for any other error."""
    if not isinstance(e, ValueError) or not _raised_in_accelerate(e):
        return None
    if truth := re.fullmatch(r"invalid truth value (.*)", str(e)):  # (accelerate lowercases the value)
        value, takes, read = truth[1], "true or false (1 or 0, yes or no)", str.lower
    elif number := re.fullmatch(r"invalid literal for int\(\) with base 10: ('.*')", str(e)):
        value, takes, read = ast.literal_eval(number[1]), "an integer", str
    else:
        return None
    names = [n for n, v in sorted(os.environ.items()) if n.startswith(_ACCELERATE_READS) and read(v) == value]
    if not names:
        return None
    shown = ", ".join(f"{name}={os.environ[name]!r}" for name in names)
    return f"environment variable {shown}: accelerate reads it and takes {takes}; unset it or set it so"


def _raised_in_accelerate(e: BaseException) -> bool:
    """True when `e` was raised inside accelerate's code."""
    tb, inside = e.__traceback__, False
    while tb is not None:
        inside = "accelerate" in Path(tb.tb_frame.f_code.co_filename).parts
        tb = tb.tb_next
    return inside


def launched_rank() -> int:
    """This process's rank among the launcher's (0 without one), read as accelerate reads it."""
    from accelerate.utils import get_cpu_distributed_information

    return get_cpu_distributed_information().rank


def check_joined(num_processes: int, otherwise: str) -> None:
    """One-line error when accelerate set up fewer processes than the launcher started (mpirun on a GPU
    host without LOCAL_RANK, say): `otherwise` says what each process would then do alone."""
    launched = launched_processes()
    if num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes but accelerate set up {num_processes}; {otherwise}"
        )


def has_gpu() -> bool:
    """Under torchrun without a GPU, accelerate joins the processes (gloo) only when told to use the CPU;
    otherwise every process silently works alone."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def cpu_processes() -> bool:
    """True when a launcher started several processes on a machine without GPUs (accelerate's `cpu`)."""
    return launched_processes() > 1 and not has_gpu()


def launcher_precision() -> str | None:
    """The mixed precision asked of `accelerate launch` (`--mixed_precision bf16`, or its config file's),
    which it passes on in the environment, or None. smapctl does not take it: training follows
    train.precision, the other commands run in fp32. Its default, `no`, cannot be told from one asked
    for, so it counts as none."""
    import os

    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    return None if asked in ("", "no") else asked


# How long the processes of a launcher wait for each other at a collective: the main process alone
# writes checkpoints (tens of GB for the 3B generator) and checks a token cache's image list (minutes
# on a network filesystem) while the others wait; NCCL's default of 10 minutes would end the run.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def process_state():
    """accelerate's `PartialState` of this process: joined with the others of a launcher (one device per
    process: `cuda:LOCAL_RANK` on GPUs, gloo on CPUs), or the plain process alone."""
    from accelerate import PartialState

    _check_the_device_asked()
    if launched_processes() > 1:
        _collect_before_shutdown()
        return PartialState(cpu=cpu_processes(), timeout=PROCESS_GROUP_TIMEOUT)
    return PartialState(cpu=cpu_processes())


def _collect_before_shutdown() -> None:
    """In a process of a launcher, Python's garbage is collected as the process ends, before the
    interpreter shuts down (an `atexit` function). An error that stopped a command leaves its model in
    reference cycles (its traceback's frames), and through the model's wrapper the process group: freed
    only by the interpreter's last collection, where a gloo group ends the process by SIGABRT
    ("terminate called without an active exception": one of its threads takes the GIL too late) instead
    of the error's exit status. Collected here, the group goes while its threads still can."""
    import atexit

    atexit.unregister(_collect)  # once, however many commands this process runs
    atexit.register(_collect)


def _collect() -> None:
    import gc

    gc.collect()


def _check_the_device_asked() -> None:
    """The device accelerate takes from `ACCELERATE_TORCH_DEVICE` (a shell set up on a GPU machine, say):
    one torch does not know, or that this machine does not have, would otherwise be a traceback of torch's
    as the run sets up (`Found no NVIDIA driver on your system`, `Expected one of cpu, cuda, ... device
    string: gpu`)."""
    asked = os.environ.get("ACCELERATE_TORCH_DEVICE")
    if asked is None:
        return
    try:
        kind = torch.device(asked).type
    except RuntimeError:
        kind = None
    backend = getattr(torch, kind or "", None)  # torch.cuda, torch.xpu, torch.mps
    there = kind is not None and (not hasattr(backend, "is_available") or backend.is_available())
    if not there:
        what = f"this machine has no {kind} device" if kind else "not a device torch knows"
        raise UserError(
            f"environment variable ACCELERATE_TORCH_DEVICE={asked!r}: {what}; unset it (smapctl chooses the"
            " device)"
        )


def on_the_main_process(work: Callable[[], T], share: Callable[[T], object] | None = None):
    """`work()` done by the main process of a launch alone, once every process has joined: its UserError
    is raised in every process (`agreed`: the others would otherwise wait at their next collective for a
    process that has left, until the launcher killed them). The main process gets what `work` returns, the
    others `share` of it (a picklable summary, sent to them) or None. Without a launcher, `work()`."""
    if launched_processes() == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    state = process_state()
    result, problem, interrupted = None, None, None
    # A signal to another process, which waits in the broadcast (where Python runs no signal handler), is a
    # flag, and every process stops for it together after the broadcast, each with the signal's status:
    # acted on once `work` (a classifier's training: minutes) has ended, it would make that process leave,
    # and the main process exit 1 at its next collective ("another process ... stopped"). The main
    # process's own signal stops its work at once, and the others with it (else they exit 1 when it leaves).
    with RoundStops(state.num_processes, state.device, defer=not state.is_main_process) as rounds:
        if state.is_main_process:
            try:
                result = work()
            except UserError as e:  # said by every process: the others would wait at the broadcast
                problem = e
            except KeyboardInterrupt as e:
                interrupted = e
        shared = share(result) if share is not None and result is not None else None  # (main: None on error)
        told = (None if problem is None else str(problem), shared, _signal_of(interrupted))
        said, shared, signum = broadcast_object_list([told])[0]
        if interrupted is not None:
            raise interrupted
        if signum is not None:  # (the main process said that it stopped)
            stop = StoppedTogether(signum)
            stop.said = True
            raise stop
        try:
            rounds.round_done(last=False)
        except StoppedTogether as stop:
            stop.said = not state.is_main_process  # (the main process says that it stopped)
            raise
    if problem is not None:
        raise agreed(problem)
    if said is not None:
        raise agreed(UserError(said))
    return result if state.is_main_process else shared


def _signal_of(interrupt: KeyboardInterrupt | None) -> int | None:
    """The signal that raised `interrupt` in this process: a `StoppedTogether`'s own, SIGTERM when the
    CLI's handler raised it (`GracefulStop.unheard`), else SIGINT; None for None."""
    from smapctl.train.signals import GracefulStop

    if interrupt is None:
        return None
    if isinstance(interrupt, StoppedTogether):
        return interrupt.signum
    return int(signal.SIGTERM if GracefulStop.unheard == signal.SIGTERM else signal.SIGINT)


# The commands that spread their work over the processes of a launcher.
SPREAD_OVER_PROCESSES = (
    "train-tokenizer",
    "train-generator",
    "sample",
    "tokenize",
    "evaluate --checkpoint",
    "evaluate --generator",
)


def refuse_multi_process(command: str) -> None:
    """One-line error when `command` (a smapctl subcommand) does not split its work and was started by a
    launcher: each process would do the whole job and write the same files."""
    n = launched_processes()
    if n > 1 and command not in SPREAD_OVER_PROCESSES:
        spread = ", ".join(SPREAD_OVER_PROCESSES)
        raise UserError(
            f"smapctl {command} runs as one process, but the launcher started {n}: run it without "
            f"accelerate launch / torchrun (these spread over processes: {spread})"
        )


class StoppedTogether(KeyboardInterrupt):
    """Every process of a launcher stopped after the same round of work (`RoundStops`), for the signal
    `signum` one of them received: the CLI exits with 128 + it in each, as a stopped training does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RoundStops:
    """A signal (SIGINT, SIGTERM) stops every process of a launcher after the same round of work: a
    round of one batch per process, of `sample`, `tokenize` or the generator's token cache. Inside the
    block a process's signal only flags it (`signals.completing`); `round_done` sums the flags over the
    processes and every one raises `StoppedTogether` there, the main process having gathered the whole
    round (one that ended at once, where the signal found it, would leave the others waiting at a
    collective: with gloo they would stop with it, one round short; with NCCL until torchrun kills them,
    losing what the main process has not yet kept). A signal during the last round lets the work finish,
    `signal_name` naming it (the caller says so). One process alone (`world` 1) stops at once. A SIGTERM
    Python lost before the work began (`GracefulStop.unheard`) stops it after the first round. With
    `defer` False this process's own signals stop it at once, as outside the block; it still stops with
    the others for theirs (`on_the_main_process`: the main process's work, the others waiting).

        with RoundStops(world, device) as rounds:
            for each round: ...; rounds.round_done(last=...)
    """

    def __init__(self, world: int, device, defer: bool = True):
        self.world, self.device = world, device
        self.defer = defer  # False: this process's own signals stop it at once (it still counts the others')
        self.signal_name: str | None = None  # taken during the last round (the work goes on to its end)
        self._stop = None
        self._block = None

    def __enter__(self) -> RoundStops:
        if self.world > 1 and self.defer:
            from smapctl.train.signals import completing

            self._block = completing()
            self._stop = self._block.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._block is not None:
            self._block.__exit__(*exc)

    def round_done(self, last: bool) -> None:
        """After a round (the same call in every process): raises `StoppedTogether` when a process of the
        launch was asked to stop, unless `last` (then the work finishes, and `signal_name` says why)."""
        from accelerate.utils import reduce

        from smapctl.train.signals import GracefulStop, stop_if_unheard

        if self.world == 1:
            if not last:
                stop_if_unheard()
            return
        if self._stop is not None:
            self._stop.take_unheard()  # this process's lost signal is among the flags summed
        flags = [0.0] * len(GracefulStop.SHARED) if self._stop is None else self._stop.flags()
        flags = reduce(torch.tensor(flags, device=self.device), reduction="sum")  # (each flag summed)
        name = GracefulStop.first_asked(flags.tolist())  # SIGTERM before SIGINT, as training takes them
        if name is None:
            return
        if not last:
            raise StoppedTogether(int(signal.Signals[name]))
        if self._stop is not None:
            self._stop.take(name)
        self.signal_name = name if self._stop is None else self._stop.signal_name


def gather_rows(tensors: tuple[torch.Tensor, ...], batch_size: int, processes: int) -> list[tuple]:
    """Each process's `tensors` of one round (of the same number of rows, at most `batch_size`), in process
    order: padded to `batch_size` rows for accelerate's `gather`, cut back to their own length after. One
    process: `tensors` as they are."""
    if processes == 1:
        return [tensors]
    from accelerate.utils import gather

    n = tensors[0].shape[0]
    counts = gather(torch.tensor([n], device=tensors[0].device)).tolist()
    each = []
    for t in tensors:
        t = torch.cat([t, t.new_zeros((batch_size - n, *t.shape[1:]))])
        # Sent flat and shaped back here: accelerate's gather over NCCL reshapes what it received by
        # `view(-1, *shape[1:])`, which a tensor of 0 elements (`tokenize --prefix 0`) cannot take.
        each.append(gather(t.reshape(-1)).view(len(counts), batch_size, *t.shape[1:]))
    return [tuple(t[p][:c] for t in each) for p, c in enumerate(counts)]


def different_images(listings: list, what: str) -> UserError | None:
    """The error, agreed by every process, when a process of a launch lists other images than the main
    one (else None): `listings`, each process's (count, digest of the images' paths and labels) by process
    index, and `what` naming them ("images", "training images in data/train")."""
    other = next((p for p, theirs in enumerate(listings) if theirs != listings[0]), None)
    if other is None:
        return None
    theirs, ours = (x[0] if x else 0 for x in (listings[other], listings[0]))
    said = f"{theirs:,} {what}, the main process {ours:,}"
    if theirs == ours:
        said = f"other {what} or labels than the main process"
    return agreed(
        UserError(
            f"process {other} of the launch lists {said}: every process must read the same images (a folder "
            "each node has a copy of must be the same on every node)"
        )
    )


def different_checkpoints(prints: list, checkpoints: dict[str, tuple[Path, str]]) -> UserError | None:
    """The error, agreed by every process, when a process of a launch loaded other checkpoints than the
    main one (else None). `checkpoints` names each ("generator") with (its folder, its fingerprint,
    `ops.load.fingerprint`), `prints` holds each process's `fingerprints(checkpoints)` by process index. On
    nodes that each have a copy of a run, an older or retrained copy on one would draw or encode that
    node's share with other weights, and nothing else says so: the samples or tokens would mix two
    models."""
    other = next((p for p, theirs in enumerate(prints) if theirs != prints[0]), None)
    if other is None:
        return None
    name = next(n for i, n in enumerate(checkpoints) if prints[other][i] != prints[0][i])
    return agreed(
        UserError(
            f"process {other} of the launch loaded another {name} than the main process's "
            f"({checkpoints[name][0]}): its node's copy is of another step or training; give every node the "
            "same copy"
        )
    )


def fingerprints(checkpoints: dict[str, tuple[Path, str]]) -> tuple[str, ...]:
    """What a process sends of its `checkpoints` for `different_checkpoints` to compare."""
    return tuple(print_ for _, print_ in checkpoints.values())


def check_same_checkpoints(checkpoints: dict[str, tuple[Path, str]]) -> None:
    """Under a launcher (joined): every process must have loaded the checkpoints the main one loaded
    (`different_checkpoints`)."""
    from accelerate.utils import gather_object

    error = different_checkpoints(gather_object([fingerprints(checkpoints)]), checkpoints)
    if error is not None:
        raise error


def check_same_images(data, what: str) -> None:
    """Under a launcher (joined), for a folder's images `data` (an `ImageFolderDataset`; others are the same
    in every process): every process must list the images the main one lists (`different_images`), `what`
    naming them. Each process reads its share by index into its own listing: on nodes that each have a
    copy of a folder, one copy with an image more or less (or another class folder) would give its
    processes other images than their shares, or other counts of batches, and a collective would then wait
    for ever."""
    from accelerate.utils import gather_object

    from smapctl.data.folder import ImageFolderDataset

    if not isinstance(data, ImageFolderDataset):
        return
    listing = data.listing()  # (paths and labels: copies on other nodes have other file times)
    error = different_images(gather_object([(listing["images"], listing["sha256"])]), what)
    if error is not None:
        raise error
