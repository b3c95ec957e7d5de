"""The parts of a training run that do not depend on the model family.

`Run` holds the accelerator, the run folder, the step counter and the logging; both training loops
(`train/tokenizer.py`, `train/generator.py`) use it so that devices, precision, accumulation and
distribution go through accelerate only, and only the main process logs and writes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt
from smapctl.train.config import TrainConfig

log = logging.getLogger("smapctl.train")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this recipe: precision and accumulation from the recipe, the rest from the
    launcher (`accelerate launch`, `torchrun`) or the plain process (one CPU or GPU)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=cfg.precision, gradient_accumulation_steps=cfg.grad_accum_steps)
    set_seed(cfg.seed, device_specific=True)
    return accelerator


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
    """True when the loss is finite on every process (all processes must agree to skip a step)."""
    flag = torch.tensor([1.0 if math.isfinite(loss.item()) else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / recipe_name


class TrainingRun:
    """One run folder, its accelerator, its checkpoints, metrics, samples and progress bar.

    Usage (see `train/tokenizer.py`)::

        run = TrainingRun(recipe, run_dir, kind="tokenizer", build_model=lambda: SMAP(recipe.model))
        run.start(weights, optimizers, resume=..., class_names=...)
        for step, micro_batches in run.steps(train_set):
            ...  # forward/backward per micro-batch, then run.record(step, terms, images=...)

    After each step body, `steps` writes the due checkpoint, and on SIGINT/SIGTERM it writes one and
    stops. Only the main process writes files or prints.
    """

    def __init__(self, recipe, run_dir: Path, *, kind: str, build_model):
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.build_model = build_model
        self.accelerator = make_accelerator(self.cfg)
        self.is_main = self.accelerator.is_main_process
        self.start_step = 0
        self.final_checkpoint: Path | None = None
        self.stopped_by: str | None = None
        self._nonfinite = 0
        self._window: dict[str, float] = {}
        self._window_steps = 0
        self._speed = Throughput()
        self._eval_model = None
        self._bar = None

    # ---------------------------------------------------------------------------------- setting up

    def start(self, weights: dict, optimizers: dict, *, resume: bool, class_names: list[str], meta=None):
        """Load the newest checkpoint when resuming (refusing a foreign one), or refuse to overwrite."""
        from smapctl.config import dump_yaml
        from smapctl.train.logging import MetricsWriter

        self.weights, self.optimizers = weights, optimizers
        self.class_names, self.meta = list(class_names), dict(meta or {})
        latest = ckpt.latest_checkpoint(self.run_dir)
        if resume:
            if latest is None:
                raise UserError(f"--resume: no complete checkpoint in {self.run_dir / ckpt.CHECKPOINTS}")
            self._load(latest)
        elif latest is not None:
            raise UserError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it, "
                "or --out to start a new run elsewhere"
            )
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", self.is_main)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_yaml(self.recipe))

    def _load(self, path: Path) -> None:
        from smapctl.config import to_dict

        meta = ckpt.load_meta(path)
        if meta.get("kind") != self.kind:
            raise UserError(f"--resume: {path} is a {meta.get('kind')} checkpoint, not a {self.kind} one")
        saved = (meta.get("recipe") or {}).get("model")
        if saved != to_dict(self.recipe.model):
            diff = _first_difference(saved or {}, to_dict(self.recipe.model), "model")
            raise UserError(f"--resume: {path} was trained with another model ({diff}); use another --out")
        for name, obj in self.weights.items():
            state = ckpt.load_weights(path, name)
            obj.load_state_dict(state)
        state = ckpt.load_state(path)
        for name, obj in self.optimizers.items():
            obj.load_state_dict(state[name])
        ckpt.restore_rng(state["rng"])
        self.start_step = int(state["step"])
        if self.is_main:
            log.info("resuming %s from step %d", path, self.start_step)

    # ---------------------------------------------------------------------------------- the loop

    def steps(self, dataset):
        """Yield (step, micro_batches) for the remaining steps; checkpoint and stop as due."""
        from tqdm.auto import tqdm

        from smapctl.data.datasets import make_loader
        from smapctl.train.signals import GracefulStop

        micro = micro_batch_size(self.cfg, self.accelerator.num_processes)
        if len(dataset) < self.cfg.batch_size:
            raise UserError(
                f"train.batch_size: {self.cfg.batch_size} is larger than the training set "
                f"({len(dataset)} images)"
            )
        loader = make_loader(
            dataset,
            micro,
            shuffle=True,
            num_workers=self.recipe.data.num_workers if hasattr(self.recipe, "data") else 0,
            seed=self.cfg.seed,
            drop_last=True,
            start=self.start_step * self.cfg.batch_size,
            endless=True,
        )
        batches = iter(self.accelerator.prepare_data_loader(loader, device_placement=True))
        self._bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.start_step,
            disable=not self.is_main,
            unit="step",
            dynamic_ncols=True,
            desc=self.run_dir.name,
        )
        self._speed.reset()
        with GracefulStop() as stop, self._bar:
            for step in range(self.start_step, self.cfg.max_steps):
                yield step, [next(batches) for _ in range(self.cfg.grad_accum_steps)]
                self._bar.update(1)
                done = step + 1
                if self._stop_requested(stop):
                    self.final_checkpoint = self.save(done)
                    self.stopped_by = stop.signal_name or "signal"
                    if self.is_main:
                        log.warning(
                            "stopped by %s after step %d; checkpoint %s",
                            self.stopped_by,
                            done,
                            self.final_checkpoint,
                        )
                    break
                if done % self.cfg.ckpt_every == 0 or done == self.cfg.max_steps:
                    self.final_checkpoint = self.save(done)
        self.metrics.close()
        if self.final_checkpoint is None:
            self.final_checkpoint = ckpt.latest_checkpoint(self.run_dir)

    def _stop_requested(self, stop) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def check_finite(self, loss: torch.Tensor) -> bool:
        """False (skip the step) for a non-finite loss; stop after `max_nonfinite_steps` in a row."""
        if is_finite(loss, self.accelerator):
            self._nonfinite = 0
            return True
        self._nonfinite += 1
        if self._nonfinite >= self.cfg.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise UserError(
                f"the loss was not finite {self._nonfinite} steps in a row; stopping ({keep}). "
                "Try a lower train.lr or train.precision=no"
            )
        if self.is_main:
            log.warning("non-finite loss: skipping this step (%d in a row)", self._nonfinite)
        return False

    def clip_and_step(self, model, optimizer) -> None:
        """Clip (on the last micro-batch) and step the optimizer; accelerate skips it mid-accumulation."""
        if self.accelerator.sync_gradients and self.cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------- outputs

    def record(self, step: int, terms: dict, *, images: int) -> None:
        """Add one step's loss terms to the logging window; log the window's means when due."""
        for k, v in terms.items():
            self._window[k] = self._window.get(k, 0.0) + float(v)
        self._window_steps += 1
        self._speed.add(images)
        if not self.due(step, self.cfg.log_every):
            return
        names = sorted(self._window)
        means = torch.tensor(
            [self._window[k] / self._window_steps for k in names], device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        row = dict(zip(names, means.tolist(), strict=True))
        row |= {"lr": self.optimizers["scheduler"].get_last_lr()[0], "images_per_s": self._speed.rate()}
        self.metrics.log(step + 1, row)
        if self._bar is not None:
            from smapctl.train.logging import format_postfix

            self._bar.set_postfix(
                format_postfix({"loss": row["loss"], "img/s": round(row["images_per_s"], 1)})
            )
        self._window, self._window_steps = {}, 0
        self._speed.reset()

    def due(self, step: int, every: int) -> bool:
        return (step + 1) % every == 0 or step + 1 == self.cfg.max_steps

    def eval_model(self, ema):
        """A separate model in eval mode holding the EMA weights (built once, refreshed per call)."""
        if self._eval_model is None:
            self._eval_model = self.build_model().to(self.accelerator.device).eval()
        ema.copy_to(self._eval_model)
        return self._eval_model

    def write_samples(self, step: int, make_panel) -> None:
        """Save `make_panel()` (B, 3, H, W) as samples/step_XXXXXXXXX.png (main process only)."""
        if not self.is_main:
            return
        from smapctl.data.images import save_png

        panel = make_panel()
        save_png(panel.cpu(), self.run_dir / "samples" / f"step_{step + 1:09d}.png")

    def log_eval(self, step: int, evaluate) -> None:
        if not self.is_main:
            return
        row = evaluate()
        if row:
            self.metrics.log(step + 1, row)
            text = ", ".join(f"{k} {v:.2f}" for k, v in row.items())
            (self._bar.write if self._bar is not None else print)(f"step {step + 1}: {text}")

    def save(self, step: int) -> Path | None:
        """Write a checkpoint of the bare modules (main process writes; everyone waits)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            weights = {
                n: (self.accelerator.unwrap_model(w) if isinstance(w, torch.nn.Module) else w)
                for n, w in self.weights.items()
            }
            state = {n: o.state_dict() for n, o in self.optimizers.items()}
            meta = {"class_names": self.class_names, **self.meta}
            path = ckpt.save_checkpoint(
                self.run_dir,
                step,
                kind=self.kind,
                recipe=self.recipe,
                weights=weights,
                state=state,
                meta=meta,
                keep=self.cfg.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()
        return path


def _first_difference(a: dict, b: dict, where: str) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{where}.{key}")
            return f"{where}.{key} was {a.get(key)!r}, the recipe says {b.get(key)!r}"
    return where
