"""The parts of a training run that do not depend on the model family.

`TrainingRun` holds the accelerator, the run folder, the step counter and the logging; both training loops
(`train/tokenizer.py`, `train/generator.py`) use it so that devices, precision, accumulation and
distribution go through accelerate only, and only the main process logs and writes. The run folder it
holds (its lock, the folders it writes) is `train/run_folder.py`'s; what `--resume` checks and says,
`train/resume.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from smapctl.data.datasets import deaf_workers, record_iterators, shutdown_iterators
from smapctl.errors import UserError, agreed
from smapctl.io import remove_empty_folders
from smapctl.precision import precision_name, resolve_train_precision
from smapctl.train import checkpoint as ckpt
from smapctl.train.config import TrainConfig
from smapctl.train.ema import EMA
from smapctl.train.layout import RUN_RECIPE
from smapctl.train.resume import (
    check_resumable,
    check_same_classes,
    holds_checkpoints,
    nothing_to_resume,
    past_a_damaged,
    resume_command,
    warn_of_changed_settings,
)
from smapctl.train.run_folder import (
    check_the_folders_it_writes,
    in_use,
    is_scaffolding,
    lock_folder,
    remove_stale_temp_files,
)
from smapctl.train.signals import STOPPING

log = logging.getLogger("smapctl.train")

# Under fp16, a step whose gradients overflow at a loss scale above this is the scaler finding its level
# (skipped, not counted); at or below it, they are non-finite gradients (counted towards
# train.max_nonfinite_steps). From the default 65536, 16 halvings reach it.
_OVERFLOW_SCALE_FLOOR = 1.0


# What continues a run stopped by a signal, when a command other than its own `train-*` trained it
# (`reproduce mini` sets "the same command"): the stop message named `train-* --resume` there, before
# the reproduction's own advice, and that command resumes the one run but not the reproduction.
CONTINUE_WITH: ContextVar[str | None] = ContextVar("continue_with", default=None)


TRACKERS_FOLDER = "trackers"  # RUN/trackers/: where train.log_with's trackers keep their files


def tracker_problem(names: list[str]) -> str | None:
    """What a training would say of train.log_with's trackers: one not installed (accelerate would leave
    it out with a log line), or None."""
    import accelerate.utils

    from smapctl.train.config import TRACKER_PACKAGES

    for name in names:
        if not getattr(accelerate.utils, f"is_{name}_available")():
            return (
                f"train.log_with: {name} is not installed in this environment (pip install "
                f"{TRACKER_PACKAGES.get(name, name)}), or drop it from the list"
            )
    return None


def tracker_config(recipe) -> dict:
    """The recipe as flat `section.key` hyper-parameters of the types trackers take (TensorBoard's
    hparams refuse None and lists: they become text)."""
    from smapctl.config import to_dict

    flat = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    add("", to_dict(recipe))
    return flat


def make_accelerator(cfg: TrainConfig, run_dir: Path | None = None):
    """An Accelerator for this recipe: precision and accumulation from the recipe, the rest from the
    launcher (`accelerate launch`, `torchrun`) or the plain process (one CPU or GPU); train.log_with's
    trackers, writing under `run_dir`/trackers/."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from smapctl.launch import check_joined, cpu_processes, process_state

    state = process_state()
    precision = resolve_train_precision(cfg.precision, state.device, announce=state.is_main_process)
    if state.num_processes > 1:
        # `auto` times a matmul in each process, and timings of processes sharing a machine differ: the
        # main process's choice holds for all (two could otherwise train in different precisions).
        from accelerate.utils import broadcast_object_list

        precision = broadcast_object_list([precision], from_process=0)[0]
    refuse_sharding(_sharding_asked())  # before accelerate sets it up (on the CPU it raises a traceback)
    _say_dynamo_unused(state.is_main_process)
    _say_launcher_precision_unused(cfg.precision, precision, state.device, state.is_main_process)
    _forget_earlier_precision(precision)
    problem = tracker_problem(cfg.log_with)
    if problem is not None:
        raise UserError(problem)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        cpu=cpu_processes(),
        # The loaders pin their batches on a GPU machine (`data/datasets.py`): copy them to the GPU
        # without blocking the host, or pinning buys nothing. No effect on the CPU.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # Compiling is train.compile's (`TrainingRun.prepare`, with the settings the GAN's adaptive weight
        # needs); accelerate's own, asked by its config file, would also turn TF32 on for fp32 on a GPU.
        dynamo_backend="no",
        log_with=list(cfg.log_with) or None,
        project_dir=None if run_dir is None else str(run_dir / TRACKERS_FOLDER),
    )
    check_joined(accelerator.num_processes, "each would train alone and overwrite the others' files")
    refuse_sharding(accelerator.distributed_type)
    set_seed(seed_in_range(cfg.seed, accelerator.num_processes), device_specific=True)
    return accelerator


def _say_dynamo_unused(say: bool) -> None:
    """A dynamo backend asked of `accelerate launch` (its config file's, or `--dynamo_backend`): not used,
    said once, with the setting that compiles."""
    asked = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip()
    if say and asked.lower() not in ("", "no"):
        log.warning(
            "accelerate's dynamo backend %s is not used: smapctl compiles the networks itself with"
            " --set train.compile=true",
            asked,
        )


def _say_launcher_precision_unused(requested: str, precision: str, device, say: bool) -> None:
    """A mixed precision asked of `accelerate launch` (`launch.launcher_precision`): the recipe's
    train.precision decides, and accelerate's setting would otherwise be dropped without a word (a run
    launched with bf16 trains in fp32). Said once when they differ."""
    from smapctl.launch import launcher_precision

    asked = launcher_precision()
    if not say or asked in (None, precision):
        return
    trains = ("bf16", "fp16") if torch.device(device).type == "cuda" else ("bf16",)  # fp16: GPUs only
    instead = f"; --set train.precision={asked} trains in {asked}" if asked in trains else ""
    log.warning(
        "accelerate's mixed precision %s is not used: the recipe's train.precision (%s) decides, %s here%s",
        asked,
        requested,
        precision_name(precision),
        instead,
    )


def _forget_earlier_precision(precision: str) -> None:
    """accelerate keeps one mixed precision per Python process: a second training in the same process
    (the Python API, a notebook) in another precision, `auto` on a GPU (bf16) then `no` say, would stop with
    accelerate's "AcceleratorState has already been initialized ... restart your runtime". The earlier
    training is over: its precision is dropped, and the process's devices and process group are kept.
    (Its Accelerator shares that state: it must not be used afterwards.)"""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _sharding_asked():
    """The sharded training `accelerate launch` asks for (`--use_fsdp`, `--use_deepspeed`, or its config
    file's choice, passed on in the environment), else None."""
    from accelerate.utils import DistributedType
    from accelerate.utils.environment import parse_flag_from_env

    asked = {
        "ACCELERATE_USE_FSDP": DistributedType.FSDP,
        "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
        "ACCELERATE_USE_MEGATRON_LM": DistributedType.MEGATRON_LM,
    }
    return next((kind for flag, kind in asked.items() if parse_flag_from_env(flag)), None)


def refuse_sharding(distributed_type) -> None:
    """smapctl trains with data parallelism (DDP), one copy of every network per process: its EMA,
    checkpoints, gradient clipping and the GAN's adaptive weight read whole parameters, which FSDP and
    DeepSpeed would hand out in shards."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(
            f"accelerate is configured for {distributed_type.value}, which smapctl does not train with: "
            "it trains with plain data parallelism; choose multi-GPU in `accelerate config`, or launch "
            "with `accelerate launch --multi_gpu` or torchrun"
        )


def seed_in_range(seed: int, processes: int) -> int:
    """`seed` for accelerate's set_seed(device_specific=True), which adds the process index and hands the
    sum to numpy (seeds below 2**32): unchanged unless that would overflow."""
    return seed % (2**32 - processes)


def micro_batch_size(cfg: TrainConfig, num_processes: int) -> int:
    """The per-process, per-accumulation-step batch: `batch_size` is the global batch of one step."""
    parts = num_processes * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise UserError(
            f"train.batch_size: {cfg.batch_size} does not split over {num_processes} process(es) x "
            f"{cfg.grad_accum_steps} accumulation step(s); choose a multiple of {parts}"
        )
    return cfg.batch_size // parts


@dataclass
class Throughput:
    """Images per second over the last logging window."""

    images: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def reset(self) -> None:
        self.images, self.start = 0, time.perf_counter()


def is_finite(loss: torch.Tensor, accelerator) -> bool:
    """True when the loss is finite on every process (all processes must agree to skip a step). One wait
    for the device, at the `.item()`."""
    flag = torch.isfinite(loss.detach()).reshape(1).float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return flag.item() == accelerator.num_processes


def _worker_init(previous, worker_id: int) -> None:
    """DataLoader workers ignore SIGINT, SIGTERM and SIGHUP: a signal to the whole process group (Ctrl-C, a
    cluster scheduler, a terminal closed) would otherwise kill them mid-step and crash the main process
    before its checkpoint. The main process stops them itself, and they exit on their own if it dies.
    (`deaf_workers` blocks them from a worker's start where it can, before this runs; on Windows this
    alone holds a Ctrl-C off.)"""
    for signum in STOPPING:
        signal.signal(signum, signal.SIG_IGN)
    if previous is not None:
        previous(worker_id)


class TrainingRun:
    """One run folder, its accelerator, its checkpoints, metrics, samples and progress bar.

    Usage (see `train/tokenizer.py`)::

        run = TrainingRun(recipe, run_dir, kind="tokenizer", build_model=lambda: SMAP(recipe.model))
        run.check_resume(resume)  # optional: fail before the data and models are built
        run.start(weights, optimizers, resume=..., class_names=...)  # bare modules and optimizers
        model, optimizer = run.prepare(model, optimizer)  # accelerate's prepare (+ torch.compile)
        with closing(run.steps(train_set)) as steps:  # closed on any exit: the data workers stop
            for step, micro_batches in steps:
                ...  # per micro-batch, inside accelerator.accumulate: forward, run.check_finite(loss),
                ...  # accelerator.backward(loss), run.clip_and_step((model, optimizer)); then
                ...  # lr = scheduler.get_last_lr()[0] (this step's), scheduler.step(),
                ...  # run.record(step, terms, images=..., lr=lr)

    After each step body, `steps` writes the due checkpoint, and on SIGINT/SIGTERM it writes one and
    stops. Only the main process writes files or prints. Resuming repeats an uninterrupted run bit for
    bit on the same CPUs and process count (on GPUs, up to their non-deterministic kernels: attention
    and embedding backward, unless torch.use_deterministic_algorithms is on): the sample stream
    restarts after the samples the checkpoint's steps consumed (also when the batch size has changed
    since), and
    every process's RNG is saved and restored just before the loop; random numbers drawn for samples and
    evaluation are kept out of the training stream (`own_rng`).
    """

    def __init__(self, recipe, run_dir: Path, *, kind: str, build_model):
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.build_model = build_model
        self.accelerator = make_accelerator(self.cfg, self.run_dir)
        self.is_main = self.accelerator.is_main_process
        self.start_step = 0
        self.start_samples = 0  # samples of the data stream consumed before start_step
        self.final_checkpoint: Path | None = None
        self.stopped_by: str | None = None
        self._nonfinite = 0  # optimiser steps skipped in a row for a non-finite loss or gradient
        # What was not finite in the current step ("loss" of a micro-batch, or its "gradients"), or None.
        self._step_skipped: str | None = None
        self._lr: float | None = None  # the learning rate of the last recorded step
        # name -> the step's values since the last row, kept on the device: read once per row, as a
        # float() per term and step made the host wait for the GPU every step
        self._window: dict[str, list[torch.Tensor]] = {}
        self._rng_state = None  # this process's RNG state from the checkpoint, restored as the loop starts
        self._checked: tuple[bool, Path | None] | None = None
        self._speed = Throughput()
        self._eval_model = None
        self._memory_checked = False  # `prepare` warns once of a model too large for the machine's memory
        self._back_to_training: list[torch.nn.Module] = []
        self._bar = None
        self._said: tuple[float, float | None] = (0.0, None)  # `_say_progress`'s (last line, interval)
        self._lock = None  # the run folder's lock file, held open by the main process (`check_resume`)
        self.metrics = None  # the MetricsWriter of metrics.jsonl (`start`), closed by `close`
        self._made_the_folder = False  # True when this run created the folder it holds
        self._made_parents: list[Path] = []  # and the parents `mkdir -p` made for it, innermost first
        self.on_removed: list[Callable[[], None]] = []  # called when `close` removes a failed run's folder
        # A main-process write's error under a launcher, raised by every process at the next agreement
        # (`on_main`, `_share_problem`).
        self._problem: UserError | None = None

    # ---------------------------------------------------------------------------------- setting up

    def check_resume(self, resume: bool) -> Path | None:
        """Fail fast, before any data or model is built: the batch must split over processes x
        accumulation; `--resume` needs a complete checkpoint of the same kind and model; a fresh start
        must not overwrite one; the run folder must be creatable. Returns the checkpoint to resume from
        (or None)."""
        if self._checked is not None and self._checked[0] == resume:
            return self._checked[1]
        micro_batch_size(self.cfg, self.accelerator.num_processes)
        self._hold_the_folder(resume)
        problem = None
        try:
            latest = ckpt.latest_checkpoint(self.run_dir)
            if resume and latest is None:
                raise UserError(nothing_to_resume(self.run_dir))
            if not resume and latest is not None:
                raise UserError(holds_checkpoints(self.run_dir))
            if latest is not None:
                with past_a_damaged(latest):
                    meta = ckpt.load_meta(latest)
                self._check_compatible(latest, meta)
        except UserError as e:
            problem = e
        self._agree_on(problem)
        if latest is not None:
            warn_of_changed_settings(self.recipe, meta, self.resume_command())
        self._checked = (resume, latest)
        return latest

    def _agree_on(self, problem: UserError | None) -> None:
        """Raise, in every process of a launcher, the problem one of them met in the run folder (the main
        process's first), naming the process when it is another: where the nodes do not see one folder
        (nothing shared), one node's old checkpoints or missing ones would otherwise stop its process alone,
        silently (an error every process meets is printed by the main one), and the main process would say
        only that another has stopped. One process alone raises its own."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            mine = None if problem is None else (str(problem), problem.exit_code)
            told = gather_object([mine])  # by process index
            first = next((p for p, theirs in enumerate(told) if theirs is not None), None)
            if first is None:
                return
            said, status = told[first]
            error = UserError(said if first == 0 else f"process {first} of the launch: {said}")
            error.exit_code = status
            raise agreed(error) from problem
        if problem is not None:
            raise problem

    def _hold_the_folder(self, resume: bool) -> None:
        """Create the run folder and take its lock (main process), or refuse, in every process alike,
        while another training holds it: two trainings in one folder would interleave their checkpoints
        and metrics. The lock is the kernel's (`flock`): it goes with its process, however that ends."""
        problem = None
        # `--resume` into a folder that does not exist is refused next, without creating it.
        if self.is_main and self._lock is None and (not resume or self.run_dir.is_dir()):
            from smapctl.io import ensure_dir, missing_folders

            made = missing_folders(self.run_dir)  # the folder and the parents `mkdir -p` makes for it
            new, parents = bool(made), made[1:]  # (not new, not an error, for a name ensure_dir refuses)
            try:
                ensure_dir(self.run_dir, "the run folder")
                check_the_folders_it_writes(self.run_dir)
                self._lock, holder = lock_folder(self.run_dir)
            except UserError as e:  # said by every process: the others would wait at the broadcast
                problem = str(e)
            else:
                if holder is not None:
                    problem = in_use(self.run_dir, holder)
            if problem is None:
                self._made_the_folder, self._made_parents = new, parents
            elif new:  # made here for nothing
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
                    remove_empty_folders(parents)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem is not None:
            raise agreed(UserError(problem))

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(failed=error_type is not None)

    def close(self, failed: bool = False) -> None:
        """Let go of the run folder (the process's end does it too): another training may use it now. A
        folder this run created is removed first when the run failed before writing anything but what
        it writes as it starts (`is_scaffolding`): still under the lock, so that no other training can
        have taken it meanwhile (a training refused for the lock leaves the folder alone; without locks,
        on Windows or a file system that has none, there is no such guard)."""
        if self.metrics is not None:  # a run that failed in its loop never reached the loop's own close
            self.metrics.close()
        if failed and self._made_the_folder:
            with contextlib.suppress(OSError):
                entries = list(self.run_dir.iterdir())
                if all(p.is_file() and is_scaffolding(p) for p in entries):
                    for p in entries:
                        p.unlink()
                    self.run_dir.rmdir()
                    for undo in self.on_removed:  # what the run recorded elsewhere (a pin) goes with it
                        undo()
                    remove_empty_folders(self._made_parents)  # a first run's `runs/` stayed, empty
        self._made_the_folder, self._made_parents = False, []
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def start(self, weights: dict, optimizers: dict, *, resume: bool, class_names: list[str], meta=None):
        """Load the newest checkpoint when resuming (refusing a foreign one), or refuse to overwrite."""
        from smapctl.config import dump_yaml
        from smapctl.io import write_text_atomic
        from smapctl.train.logging import MetricsWriter

        self.weights, self.optimizers = weights, optimizers
        self.class_names, self.meta = list(class_names), dict(meta or {})
        if not self.is_main:  # only the main process evaluates and saves the average: a copy per process
            for obj in weights.values():  # (4 bytes a parameter, and its update) is kept once
                if isinstance(obj, EMA):
                    obj.release()
        latest = self.check_resume(resume)
        if latest is not None:
            with past_a_damaged(latest):
                self._load(latest)

        def set_up_the_folder() -> MetricsWriter:
            self._trim_metrics()
            remove_stale_temp_files(self.run_dir)
            # A resume with nothing to train keeps the run's recipe (its max_steps, which the printed
            # resume command reads, would become the lower one asked for).
            if latest is None or self.start_step < self.cfg.max_steps:
                write_text_atomic(self.run_dir / RUN_RECIPE, dump_yaml(self.recipe), "the run's recipe")
            trackers = None
            if self.cfg.log_with:  # (a resumed run's go on in the same folder, from its step)
                self.accelerator.init_trackers(self.run_dir.name, config=tracker_config(self.recipe))
                trackers = self.accelerator
            return MetricsWriter(self.run_dir / "metrics.jsonl", is_main=True, trackers=trackers)

        metrics = self.on_main(set_up_the_folder)
        self.metrics = (
            metrics if metrics is not None else MetricsWriter(self.run_dir / "metrics.jsonl", is_main=False)
        )
        self._share_problem()

    def prepare(self, *objects):
        """`accelerator.prepare`, then `torch.compile` on each network when `train.compile` is set.

        Compiled here rather than through accelerate's `dynamo_backend`: accelerate keeps the first
        Accelerator's settings for the whole process, so a second run in it (tests, `reproduce mini`)
        would silently ignore its own. `accelerator.unwrap_model(m, keep_torch_compile=False)` gives
        the plain module back (checkpoints and EMA use it).
        """
        if not self._memory_checked:  # the first network prepared is the one trained
            self._memory_checked = True
            self._warn_of_memory(next(o for o in objects if isinstance(o, torch.nn.Module)))
        prepared = self.accelerator.prepare(*objects)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        if self.cfg.compile:
            prepared = tuple(torch.compile(o) if isinstance(o, torch.nn.Module) else o for o in prepared)
        return prepared if len(prepared) > 1 else prepared[0]

    def _warn_of_memory(self, model: torch.nn.Module) -> None:
        """On the CPU, a warning when the model's weights, gradients, AdamW state and EMA cannot fit in
        the machine's memory (`training_memory_problem`), before the first step, where the run would die."""
        from smapctl.runtime import training_memory_problem

        if self.accelerator.device.type != "cpu" or not self.is_main:
            return
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        problem = training_memory_problem(trained, self.cfg.ema_decay > 0, processes)
        if problem is not None:
            log.warning("%s", problem)

    def resume_command(self) -> str:
        """`resume_command`; a launched run's says to launch it again as it was (pasted as it is, it would go
        on in one process, whose random streams are reseeded)."""
        n = self.accelerator.num_processes
        again = f", launched again with {n} processes" if n > 1 else ""
        return resume_command(self.kind, self.run_dir) + again

    def _check_compatible(self, path: Path, meta: dict) -> None:
        check_resumable(self.recipe, self.kind, path, meta, self.resume_command())

    def _warn_if_the_precision_changed(self, path: Path, saved: str | None) -> None:
        """One warning when the run goes on in another precision than its checkpoint trained in: `auto`
        on a machine with other bf16 support (a resume elsewhere), or a --set. It goes on, in the
        precision asked for, but does not repeat an uninterrupted run bit for bit."""
        now = self.accelerator.mixed_precision
        if saved is None or saved == now or not self.is_main:  # checkpoints before the record: unknown
            return
        why = "auto on this machine" if self.cfg.precision == "auto" else "as train.precision asks"
        log.warning(
            "--resume: %s trained in %s, this run goes on in %s (%s), so it will not repeat an "
            "uninterrupted run bit for bit; --set train.precision=%s keeps %s",
            path,
            precision_name(saved),
            precision_name(now),
            why,
            saved,
            precision_name(saved),
        )

    def _load(self, path: Path) -> None:
        meta = ckpt.load_meta(path)
        self._check_compatible(path, meta)
        check_same_classes(path, meta, self.class_names)
        for name, obj in self.weights.items():
            if isinstance(obj, EMA) and obj.released:
                continue
            try:  # a shape the recipe checks above do not cover
                ckpt.load_weights_into(obj, path, name, fits="this run")
            except UserError as e:
                raise type(e)(f"--resume: {e}") from None
        self._warn_if_the_precision_changed(path, meta.get("trained_precision"))
        state = ckpt.load_state(path)
        missing = [key for key in (*self.optimizers, "step", "rng") if key not in state]
        if missing:  # a KeyError traceback
            raise ckpt.DamagedCheckpoint(
                f"--resume: {path / ckpt.STATE} lacks {', '.join(missing)} (a broken or hand-edited file)"
            )
        for name, obj in self.optimizers.items():
            obj.load_state_dict(state[name])
        for obj in self.optimizers.values():
            if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
                _follow_the_schedule(obj)
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.start_step = int(state["step"])
        # Checkpoints written before `samples` was saved: their runs kept one batch size throughout.
        self.start_samples = int(state.get("samples", self.start_step * self.cfg.batch_size))
        self._rng_state = self._own_rng_state(state["rng"])
        if self.is_main:
            log.info("resuming %s from step %d", path, self.start_step)
            if self.start_step >= self.cfg.max_steps:
                log.warning(
                    "nothing to train: the run is at step %d and train.max_steps is %d (raise it with "
                    "--max-steps to train further)",
                    self.start_step, self.cfg.max_steps,
                )  # fmt: skip

    def _own_rng_state(self, saved):
        """This process's entry of the checkpoint's per-process RNG states (a single dict in checkpoints
        written by one process before per-process states were saved)."""
        states = [saved] if isinstance(saved, dict) else list(saved)
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        if len(states) == n:
            return states[rank]
        if self.is_main:
            log.warning(
                "the checkpoint holds the random states of %d process(es) but this run has %d: the random "
                "streams (a tokenizer's tail dropping and posterior samples, a generator's noise and class "
                "dropout) are reseeded, so the resumed run will not "
                "repeat an uninterrupted run exactly",
                len(states),
                n,
            )
        from accelerate.utils import set_seed

        n = self.accelerator.num_processes
        set_seed(seed_in_range(self.cfg.seed + self.start_step, n), device_specific=True)
        return None

    def _trim_metrics(self) -> None:
        """A fresh run starts a fresh metrics file; a resumed one keeps the rows up to its checkpoint's
        step (the interrupted run may have logged later steps, and a killed writer may have torn the last
        line), so each step appears once."""
        from smapctl.io import write_text_atomic
        from smapctl.train.logging import read_metrics

        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        unreadable: list[int] = []
        earlier = read_metrics(path, unreadable)
        lines = len(earlier) + len(unreadable)
        torn = [n for n in unreadable if n != lines]  # the last line, torn by a kill, is expected
        if torn and self.start_step > 0:  # rows lost with the rewrite below: said (they would go silently)
            log.warning(
                "%s: %d unreadable line(s) left out as the run goes on (line %s; edited or damaged?)",
                path,
                len(torn),
                ", ".join(map(str, torn[:5])) + (", ..." if len(torn) > 5 else ""),
            )
        rows = [r for r in earlier if r.get("step", 0) <= self.start_step]  # none when fresh
        if earlier and self.start_step == 0:  # a run stopped before its first checkpoint, started again
            log.warning(
                "%s: a fresh start (no checkpoint to resume): its metrics.jsonl of %d steps is replaced",
                self.run_dir,
                len({r.get("step") for r in earlier}),
            )
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows), "the metrics")

    # ---------------------------------------------------------------------------------- the loop

    def steps(self, dataset):
        """Yield (step, micro_batches) for the remaining steps; checkpoint and stop as due. Iterate it
        under `contextlib.closing`, so an error in the loop body stops the data workers at once."""
        from smapctl.data.datasets import batch_size_problem, data_workers, make_loader

        micro = micro_batch_size(self.cfg, self.accelerator.num_processes)
        problem = batch_size_problem(self.cfg.batch_size, len(dataset))
        if problem is not None:
            raise UserError(problem)
        loader = make_loader(
            dataset,
            micro,
            shuffle=True,
            num_workers=data_workers(self.recipe.data.num_workers) if hasattr(self.recipe, "data") else 0,
            seed=self.cfg.seed,
            drop_last=True,
            start=self.start_samples,
            endless=True,
        )
        started: list = []
        if loader.num_workers > 0:
            loader.worker_init_fn = partial(_worker_init, loader.worker_init_fn)
        prepared = self.accelerator.prepare_data_loader(loader, device_placement=True)
        if loader.num_workers > 0:  # accelerate's loader iterates the DataLoader it wraps
            record_iterators(deaf_workers(getattr(prepared, "base_dataloader", prepared)), started)
        try:
            yield from self._steps(iter(prepared))
        finally:
            shutdown_iterators(started)

    def _steps(self, batches):
        """`steps` over the prepared loader's iterator."""
        from smapctl.train.signals import NO_CHECKPOINT_YET, RESUME_FROM_NEWEST, GracefulStop

        self._start_progress()
        self._speed.reset()
        # Restored here, after everything the caller set up since `start`, so that the step after the
        # checkpoint draws exactly the random numbers the interrupted run would have drawn.
        if self._rng_state is not None:
            ckpt.restore_rng(self._rng_state)
            self._rng_state = None
        with GracefulStop(announce=self.is_main) as stop, self._bar:
            stop.take_unheard()
            if self.start_step == 0:  # a fresh run: no checkpoint yet (--resume: "no complete checkpoint")
                stop.after_second = NO_CHECKPOINT_YET
            for step in range(self.start_step, self.cfg.max_steps):
                yield step, [next(batches) for _ in range(self.cfg.grad_accum_steps)]
                self._count_skipped_step()
                self._bar.update(1)
                done = step + 1
                if self._stop_requested(stop):
                    self._stop_after(done, stop.signal_name)
                    break
                if done % self.cfg.ckpt_every == 0 or done == self.cfg.max_steps:
                    self.final_checkpoint = self.save(done)
                    stop.after_second = RESUME_FROM_NEWEST
        if (
            self.stopped_by
            and self.accelerator.num_processes > 1
            and threading.main_thread() is threading.current_thread()
        ):
            # A launcher signals each of its processes, not always at once: one that stopped for
            # another's signal and gets its own now, on its way out, ends quietly with that status
            # (the handler put back would raise KeyboardInterrupt into whatever it is finishing).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.metrics.close()
        if self.final_checkpoint is None:
            self.final_checkpoint = ckpt.latest_checkpoint(self.run_dir)

    def _start_progress(self) -> None:
        """The loop's progress: a bar on a terminal, else (`_say_progress`) a line now and then."""
        from tqdm.auto import tqdm

        from smapctl.progress import bar_label, log_every, on_terminal

        # On a terminal a bar; in a log file (a batch job) its carriage-return updates piled up (tens of MB
        # over a long run): there a line per logged row instead, at most once a `progress.LOG_EVERY`.
        terminal = on_terminal()
        self._bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.start_step,
            disable=not self.is_main or not terminal,
            unit="step",
            dynamic_ncols=True,
            desc=bar_label(self.run_dir.name),
        )
        # (when `_say_progress` last spoke, how often it speaks: None for a bar instead)
        self._said = (time.monotonic(), log_every() if self.is_main and not terminal else None)

    def _stop_after(self, done: int, signal_name: str) -> None:
        """A signal asked the run to stop after step `done`: its window logged, a checkpoint saved, and the
        main process says where to continue from (or that the run is complete)."""
        self._log_window(done - 1)
        self.final_checkpoint = self.save(done)
        self.stopped_by = signal_name
        if self.is_main and done == self.cfg.max_steps:
            # Nothing is left to continue: a resume hint here sent users to --resume a finished run.
            # The command still exits as interrupted (`a && b` stops).
            log.warning(
                "%s during the last step: the run is complete; checkpoint %s",
                self.stopped_by,
                self.final_checkpoint,
            )
        elif self.is_main:
            log.warning(
                "stopped by %s after step %d; checkpoint %s (continue: %s)",
                self.stopped_by,
                done,
                self.final_checkpoint,
                CONTINUE_WITH.get() or self.resume_command(),
            )

    def _stop_requested(self, stop) -> bool:
        """True when any process was asked to stop. Every process then takes the signal as its own (a
        SIGTERM before a SIGINT), so each names it and exits with its status: otherwise the main process
        would say "stopped by signal" and exit 0 when only another one has received SIGTERM. The same reduce
        tells every process of a write the main process could not make in this step (`on_main`)."""
        flags = torch.tensor(
            [*stop.flags(), float(self._problem is not None)], device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        *counts, failed = flags.tolist()  # one device sync
        if failed > 0:
            self._share_problem()
        name = stop.first_asked(counts)
        if name is not None:
            stop.take(name)
        return name is not None

    def check_finite(self, loss: torch.Tensor) -> bool:
        """False (skip the rest of this optimiser step) for a non-finite loss of one micro-batch. The
        step then counts as skipped; `max_nonfinite_steps` skipped steps in a row stop the run."""
        if is_finite(loss, self.accelerator):
            return True
        self._step_skipped = "loss"
        return False

    def _count_skipped_step(self) -> None:
        """After each step body: `max_nonfinite_steps` counts optimiser steps, not micro-batches, so a
        step with any non-finite micro-batch adds one and only a step that completed resets the count."""
        skipped, self._step_skipped = self._step_skipped, None
        if not skipped:
            self._nonfinite = 0
            return
        self._nonfinite += 1
        if self._nonfinite >= self.cfg.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            what = "loss was" if skipped == "loss" else "gradients were"
            # Every process counts alike: the loss's finiteness is reduced over them, and the gradients
            # are reduced before their check.
            raise agreed(
                UserError(
                    f"the {what} not finite {self._nonfinite} steps in a row; stopping ({keep}). "
                    "Try a lower train.lr (in a new run: --out) or train.precision=no"
                )
            )
        if self.is_main:
            log.warning("non-finite %s: skipping this step (%d in a row)", skipped, self._nonfinite)

    def clip_and_step(self, *pairs) -> bool:
        """Clip (on the last micro-batch) and step each (model, optimizer) of `pairs` together; accelerate
        skips the steps mid-accumulation. False when any of their gradients are not finite: none of them
        steps, and the step counts as skipped, as for a non-finite loss (a finite loss can have a NaN
        gradient; one NaN element, spread by the clip, turns every weight and the EMA into NaN).

        Under fp16 the losses of all `pairs` were scaled by one factor: each optimizer's gradients are
        unscaled once, before the clip, and the scale is updated once for the step, as torch's AMP recipe
        for several optimizers does (accelerate's `optimizer.step()` updates it after each optimizer,
        which forgets that the next one's gradients were unscaled: the discriminator of an fp16 GAN run
        would learn at 1/65536 of its rate). Gradients that overflowed the scale skip the step too, without
        counting towards `train.max_nonfinite_steps`: the scale is lowered, as the scaler is made to;
        once the scale is down to 1, non-finite gradients count as without a scaler.

        Each optimizer must be the one `accelerator.prepare` returned: the bare optimizer would step on
        every micro-batch."""
        from accelerate.optimizer import AcceleratedOptimizer

        acc = self.accelerator
        for _, optimizer in pairs:
            if not isinstance(optimizer, AcceleratedOptimizer):
                raise TypeError("clip_and_step: pass the optimizer returned by accelerator.prepare")
        if not acc.sync_gradients:  # mid-accumulation: accelerate makes these no-ops
            for _, optimizer in pairs:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return True
        # The gradients are reduced over the processes by now: every process decides the same.
        scaler = acc.scaler
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norms = []
        for model, optimizer in pairs:  # every pair: the scaler records each one's overflow as it unscales
            if scaler is not None:
                scaler.unscale_(optimizer.optimizer)
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            else:
                norms.append(acc.clip_grad_norm_(model.parameters(), clip))
        # One device sync for all pairs' norms (the clip has to finish before anything is decided).
        # (A model without gradients has a CPU norm of 0: on the device with the others.)
        norms = [torch.as_tensor(n).to(acc.device, torch.float32) for n in norms]
        finite = bool(torch.stack(norms).isfinite().all())
        if finite:
            for _, optimizer in pairs:
                if scaler is not None:
                    scaler.step(optimizer.optimizer)  # the bare one: unscaled already, updated below
                else:
                    optimizer.step()
        for _, optimizer in pairs:
            optimizer.zero_grad(set_to_none=True)
        if not finite and (scaler is None or scaler.get_scale() <= _OVERFLOW_SCALE_FLOOR):
            # Without a scaler, or with gradients non-finite even at a scale of 1: not an fp16 overflow
            # but NaN/inf gradients, which the halving scale would have skipped for ever, silently.
            self._step_skipped = "gradients"
            if scaler is not None:
                scaler.update(_OVERFLOW_SCALE_FLOOR)  # halving would not help: the scale stays at 1
        elif scaler is not None:
            scaler.update()
        return finite

    # ---------------------------------------------------------------------------------- outputs

    def record(self, step: int, terms: dict, *, images: int, lr: float) -> None:
        """Add one step's loss terms to the logging window; log the window's means when due. A term
        present in only some steps of the window (e.g. the GAN loss as it starts) is averaged over those.
        `lr` is the learning rate this step used (read before `scheduler.step()`); a row shows its last
        step's."""
        self._lr = lr
        device = self.accelerator.device
        for k, v in terms.items():
            if isinstance(v, torch.Tensor):
                value = v.detach().to(device, torch.float32).reshape(())
            else:  # filled on the device (a copy from the host would wait for it)
                value = torch.full((), float(v), dtype=torch.float32, device=device)
            self._window.setdefault(k, []).append(value)
        self._speed.add(images)
        if self.due(step, self.cfg.log_every):
            self._log_window(step)

    def _log_window(self, step: int) -> None:
        """Write the means of the window as the row of `step + 1` (every process must call this)."""
        if not self._window:
            return
        names = sorted(self._window)
        values = torch.stack([v for k in names for v in self._window[k]]).tolist()  # one device sync
        window_means, start = [], 0
        for k in names:  # summed in double precision, in order: the values of a host sum step by step
            n = len(self._window[k])
            window_means.append(sum(values[start : start + n]) / n)
            start += n
        means = torch.tensor(window_means, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        row = dict(zip(names, means.tolist(), strict=True))
        row |= {"lr": self._lr, "images_per_s": self._speed.rate()}
        self.on_main(lambda: self.metrics.log(step + 1, row))
        if self._bar is not None:
            from smapctl.train.logging import format_postfix

            self._bar.set_postfix(
                format_postfix({"loss": row["loss"], "img/s": round(row["images_per_s"], 1)})
            )
        self._say_progress(step, row)
        self._window = {}
        self._speed.reset()

    def _say_progress(self, step: int, row: dict) -> None:
        """Without a terminal (the main process): `run: step 1,200 of 400,000 (0.3%), loss 0.0521, 631
        images/s` at most once a `progress.LOG_EVERY` ($SMAPCTL_PROGRESS_EVERY), and at the last step."""
        said, every = self._said
        now = time.monotonic()
        if every is None or (now - said < every and step + 1 < self.cfg.max_steps):
            return
        self._said = (now, every)
        from smapctl import progress
        from smapctl.errors import one_line

        total = self.cfg.max_steps
        name = one_line(self.run_dir.name)  # (a name that is not UTF-8 crashed the run here)
        print(
            f"{name}: step {step + 1:,} of {total:,} ({100 * (step + 1) / total:.1f}%), loss "
            f"{row.get('loss', float('nan')):.4g}, {progress.rate_text(row['images_per_s'])} images/s",
            flush=True,
        )

    def due(self, step: int, every: int) -> bool:
        return (step + 1) % every == 0 or step + 1 == self.cfg.max_steps

    @contextmanager
    def own_rng(self):
        """Random numbers drawn inside (building a model, evaluation loaders, previews) do not move the
        training RNG, so the losses of a run do not depend on when it samples, evaluates or resumed."""
        device = self.accelerator.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    @contextmanager
    def _training_mode_after(self):
        """Models that `eval_model` switched to eval mode go back to training mode after the block."""
        try:
            yield
        finally:
            while self._back_to_training:
                self._back_to_training.pop().train()

    def eval_model(self, ema):
        """A separate model in eval mode whose weights are the EMA's own tensors (built once on the meta
        device, given the average's current tensors per call: no copy of the weights, which for SMAP-B
        kept 1.6 GB more for the rest of the run). With EMA decay 0 the model itself, in eval mode until
        the preview or evaluation is over (no copy of a model that may not fit twice)."""
        from smapctl.models.kv_attention import fill_rotary_tables

        if getattr(ema, "model", None) is not None:
            if ema.model.training:
                self._back_to_training.append(ema.model)
            return ema.model.eval()
        if self._eval_model is None:
            with self.own_rng(), torch.device("meta"):
                self._eval_model = self.build_model().eval().requires_grad_(False)
        model = self._eval_model
        model.load_state_dict(ema.state_dict(), assign=True)  # the average moves in place; they follow
        fill_rotary_tables(model, self.accelerator.device)  # buffers that the average does not hold
        return model

    def write_samples(self, step: int, make_panel) -> None:
        """Save the panel of `make_panel()` -> (panel (B, 3, H, W), images a row) as
        samples/step_XXXXXXXXX.png (main process only: the others may not hold the preview batch)."""
        from smapctl.data.images import save_png

        def write() -> None:
            with self.own_rng(), self._training_mode_after():
                panel, nrow = make_panel()
            save_png(panel.cpu(), self.run_dir / "samples" / f"step_{step + 1:09d}.png", nrow)

        self.on_main(write)

    def log_eval(self, step: int, evaluate) -> None:
        """Log `evaluate()`'s row of metrics (main process only)."""

        def log_row() -> None:
            with self.own_rng(), self._training_mode_after():
                row = evaluate()
            if row:
                self.metrics.log(step + 1, row)
                text = ", ".join(f"{k} {v:.2f}" for k, v in row.items())
                (self._bar.write if self._bar is not None else print)(f"step {step + 1}: {text}")

        self.on_main(log_row)

    def on_main(self, work):
        """`work()` in the main process (its writes: files, metrics, checkpoints) -> its result; None in
        the others. Alone, its UserError (a full disk, say) is raised at once. Under a launcher it is
        kept, the main process's later writes are skipped, and every process raises it at the next
        agreement (the end of the step, `_stop_requested`; a checkpoint, `save`; `start`): the others
        would wait at their next collective, under NCCL until the launcher kills them."""
        if not self.is_main or self._problem is not None:
            return None
        if self.accelerator.num_processes == 1:
            return work()
        try:
            return work()
        except UserError as e:
            self._problem = e
            return None

    def _share_problem(self) -> None:
        """Raise the main process's kept UserError (`on_main`) in every process; all must call this."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast_object_list

        said = None if self._problem is None else str(self._problem)
        said = broadcast_object_list([said], from_process=0)[0]
        if self._problem is not None:
            raise agreed(self._problem)
        if said is not None:
            raise agreed(UserError(said))

    def save(self, step: int) -> Path | None:
        """Write a checkpoint of the bare modules (main process writes; everyone waits). The RNG states
        of all processes are gathered, so each resumes its own stream (tail dropping, sampling)."""
        from accelerate.utils import gather_object

        self.accelerator.wait_for_everyone()
        rng = [ckpt.capture_rng()]
        if self.accelerator.num_processes > 1:
            rng = gather_object(rng)  # [rank 0's, rank 1's, ...]

        def write() -> Path:
            weights = {
                n: (
                    self.accelerator.unwrap_model(w, keep_torch_compile=False)
                    if isinstance(w, torch.nn.Module)
                    else w
                )
                for n, w in self.weights.items()
            }
            # The samples consumed so far: a resume with another batch size continues the stream there.
            samples = self.start_samples + (step - self.start_step) * self.cfg.batch_size
            state = {n: o.state_dict() for n, o in self.optimizers.items()} | {"rng": rng, "samples": samples}
            if self.accelerator.scaler is not None:
                state["grad_scaler"] = self.accelerator.scaler.state_dict()
            # The precision trained in: `auto` is resolved anew at each start (a resume elsewhere can differ).
            meta = {
                "class_names": self.class_names,
                "trained_precision": self.accelerator.mixed_precision,
                **self.meta,
            }
            return ckpt.save_checkpoint(
                self.run_dir,
                step,
                kind=self.kind,
                recipe=self.recipe,
                weights=weights,
                state=state,
                meta=meta,
                keep=self.cfg.keep_checkpoints,
            )

        path = self.on_main(write)
        self._share_problem()  # and everyone waits for the checkpoint
        return path


def _follow_the_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Give the optimizer the learning rate of the schedule as the recipe has it now at the restored step.
    The restored rate was computed by the old schedule (kept, a resume with a later max_steps would train
    its first step at the old run's final rate); unchanged, the schedule gives the very same number, so a
    resume stays bitwise equal. The lambdas are the new recipe's: LambdaLR does not save functions."""
    rates = [
        base * f(scheduler.last_epoch)
        for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (LambdaLR sets it only in step())
