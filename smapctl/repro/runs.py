"""The trainings of the mini reproduction: one run folder each under the work folder, reused when done.

A run folder whose newest checkpoint was written by the same recipe at its last step is reused; one
interrupted with the same recipe is resumed; one from another recipe (or, for a generator, another
tokenizer) is deleted and trained again. `fresh=True` retrains everything it is asked for.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from smapctl.io import write_text_atomic
from smapctl.recipe import (
    GeneratorRecipe,
    TokenizerRecipe,
    load_generator_recipe,
    load_tokenizer_recipe,
    with_absolute_paths,
)
from smapctl.train import checkpoint as ckpt
from smapctl.train.runner import CONTINUE_WITH
from smapctl.train.signals import GracefulStop

log = logging.getLogger("smapctl.repro")

# Tokenizer variants: the recipe file each starts from, and the tail-drop schedule it overrides (issue 11).
VARIANT_RECIPES = {"smap": "tokenizer.yaml", "titok": "titok.yaml", "notrunc": "notrunc.yaml"}
NEW_SCHEDULES = ("full_mix", "pow2", "tail_weighted")

# --quick: models and runs so small that the whole pipeline takes seconds (its numbers mean nothing).
QUICK_STEPS = 2
QUICK_TOKENIZER = [
    *("model.enc_width=32", "model.dec_width=32", "model.enc_heads=2", "model.dec_heads=2"),
    *("model.enc_depth=1", "model.dec_depth=1", "train.batch_size=16", "train.warmup_steps=0"),
    *(f"train.max_steps={QUICK_STEPS}", "train.log_every=1", "train.sample_every=2", "train.ckpt_every=2"),
]
QUICK_GENERATOR = [
    *("model.class_dim=32", "model.width=32", "model.depth=1", "model.num_heads=2"),
    *("model.head_depth=1", "model.head_width=32", "train.batch_size=16", "train.warmup_steps=0"),
    *("train.max_steps=2", "train.log_every=1", "train.sample_every=2", "train.ckpt_every=2"),
    "sample.steps=2",
]


@dataclass(frozen=True)
class TokenizerRun:
    """One tokenizer training: a variant ("smap", "titok", "notrunc" or an issue-11 schedule of SMAP),
    a token budget K and a seed."""

    variant: str
    K: int
    seed: int

    @property
    def name(self) -> str:
        return f"tok-{self.variant}-K{self.K}-s{self.seed}"

    def overrides(self) -> list[str]:
        sets = [f"model.num_latent_tokens={self.K}", f"train.seed={self.seed}"]
        if self.variant in NEW_SCHEDULES:
            sets.append(f"model.tail_drop={self.variant}")
        return sets

    @property
    def recipe_file(self) -> str:
        return VARIANT_RECIPES.get(self.variant, VARIANT_RECIPES["smap"])


@dataclass(frozen=True)
class GeneratorRun:
    """One CARD training of figure 5: "recon_only" (TiTok-style tokenizer, own class embedding),
    "independent" (SMAP, own class embedding) or "shared" (SMAP, the tokenizer's class embedding)."""

    setting: str
    K: int
    seed: int

    @property
    def name(self) -> str:
        return f"gen-{self.setting}-K{self.K}-s{self.seed}"

    @property
    def tokenizer(self) -> TokenizerRun:
        return TokenizerRun("titok" if self.setting == "recon_only" else "smap", self.K, self.seed)

    @property
    def class_embed(self) -> str:
        return "shared" if self.setting == "shared" else "independent"


class RunStopped(Exception):
    """A training of the reproduction stopped by a signal (it saved a checkpoint and returned; in its last
    step, a complete one). The reproduction stops too: its report would measure half-trained models, and
    the signal asked it to stop."""

    def __init__(self, name: str, checkpoint: Path, step: int, steps: int):
        super().__init__(f"{name} stopped at step {step} of {steps}")
        self.name, self.checkpoint, self.step, self.steps = name, checkpoint, step, steps


@dataclass
class RunRecord:
    """How a run was obtained (trained now, or reused from the work folder) and how long its training took.

    `wall_s`/`cpu_s` are this invocation's; `trained_s` is the wall time of the training that made the
    checkpoint, read back from the run folder when it is reused (None if it was not recorded)."""

    name: str
    checkpoint: str
    steps: int
    reused: bool
    wall_s: float = 0.0
    cpu_s: float = 0.0
    trained_s: float | None = None
    resumed: bool = False  # trained_s covers only the part after a resume
    trained_steps: int | None = None  # the steps trained in trained_s (after a resume: fewer than steps)

    @property
    def ms_per_step(self) -> float | None:
        steps = self.steps if self.trained_steps is None else self.trained_steps
        return None if self.trained_s is None else 1000 * self.trained_s / max(steps, 1)

    def to_dict(self) -> dict:
        return vars(self) | {"ms_per_step": self.ms_per_step}


TIMING_FILE = "repro_timing.json"  # in each run folder: how long its training took
MODE_FILE = "reproduce_mode.txt"  # in the work folder: "quick" or "full", the runs it holds


class Runs:
    """Trains (or reuses) the runs asked for, logging one progress line per run."""

    def __init__(self, recipes: Path, work: Path, *, quick: bool, fresh: bool, total: int):
        self.recipes, self.work = Path(recipes), Path(work)
        self.quick, self.fresh, self.total = quick, fresh, total
        self.records: dict[str, RunRecord] = {}

    def claim_work_folder(self) -> None:
        """Refuse a work folder that holds the other kind of runs (quick or full): every run there would be
        taken for one of another recipe, deleted and trained again (a --quick run pointed at runs/mini
        replaced hours of training). `fresh` replaces them, as asked."""
        from smapctl.errors import UserError
        from smapctl.io import ensure_dir

        mode = "quick" if self.quick else "full"
        found = self._work_mode()
        if found not in (None, mode) and not self.fresh:
            raise UserError(
                f"--work {self.work}: holds the runs of a {found} reproduction, which this {mode} one would "
                "delete and train again; choose another --work (or pass --fresh to replace them)"
            )
        ensure_dir(self.work, "the work folder")
        write_text_atomic(self.work / MODE_FILE, mode + "\n", "the work folder's mode")

    def _work_mode(self) -> str | None:
        """ "quick" or "full" for a work folder with runs in it (read from MODE_FILE, or, for one made before
        it, from a tokenizer run's step count); None for a new or empty one."""
        try:
            return (self.work / MODE_FILE).read_text().strip()
        except OSError:
            pass
        for run_dir in sorted(self.work.glob("tok-*")) if self.work.is_dir() else []:
            latest = ckpt.latest_checkpoint(run_dir)
            if latest is not None:
                steps = ckpt.load_meta(latest)["recipe"]["train"]["max_steps"]
                return "quick" if steps == QUICK_STEPS else "full"
        return None

    def tokenizer_recipe(self, run: TokenizerRun) -> TokenizerRecipe:
        quick = QUICK_TOKENIZER if self.quick else []
        return load_tokenizer_recipe(self.recipes / run.recipe_file, [*run.overrides(), *quick])

    def generator_recipe(self, run: GeneratorRun) -> GeneratorRecipe:
        sets = [
            f"latents.tokenizer={self.work / run.tokenizer.name}",
            f"class_embed={run.class_embed}",
            f"model.num_tokens={run.K}",
            f"train.seed={run.seed}",
        ]
        quick = QUICK_GENERATOR if self.quick else []
        return load_generator_recipe(self.recipes / "generator.yaml", [*sets, *quick])

    def tokenizer(self, run: TokenizerRun) -> Path:
        """The run's final checkpoint folder, trained now unless the work folder has it."""
        from smapctl.train.tokenizer import train_tokenizer

        return self._obtain(run.name, self.tokenizer_recipe(run), TokenizerRecipe, train_tokenizer)

    def generator(self, run: GeneratorRun) -> Path:
        """The generator's final checkpoint folder (training its tokenizer first if needed)."""
        from smapctl.ops.load import load_tokenizer
        from smapctl.train.generator import train_generator

        tok = load_tokenizer(self.tokenizer(run.tokenizer), "ema")
        recipe = self.generator_recipe(run)
        return self._obtain(run.name, recipe, GeneratorRecipe, train_generator, tok.fingerprint)

    def _obtain(self, name: str, recipe, recipe_cls, train, tokenizer_fingerprint: str | None = None) -> Path:
        if name in self.records:
            return Path(self.records[name].checkpoint)
        run_dir = self.work / name
        steps = recipe.train.max_steps
        latest = self._usable_checkpoint(run_dir, recipe, recipe_cls, tokenizer_fingerprint)
        start = 0 if latest is None else ckpt.load_meta(latest)["step"]
        if start == steps:
            timing = _read_timing(run_dir)
            trained = {"trained_s": timing.get("wall_s"), "trained_steps": timing.get("trained_steps")}
            self._finish(
                RunRecord(name, str(latest), steps, True, resumed=timing.get("resumed", False), **trained)
            )
            return latest
        wall, cpu = time.perf_counter(), time.process_time()
        said = CONTINUE_WITH.set("the same reproduce command")  # not this one run's train-* --resume
        GracefulStop.last_signal = None  # set again by a signal that stops this training
        try:
            final = train(recipe, run_dir, resume=latest is not None)
        finally:
            CONTINUE_WITH.reset(said)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        reached = ckpt.load_meta(final)["step"]
        # Stopped by a signal after a checkpoint: the next run resumes it. One during the last step leaves
        # the run complete, not the reproduction: it stops too, not going on to the next training as if
        # none had come.
        if reached < steps or GracefulStop.last_signal is not None:
            raise RunStopped(name, final, reached, steps)
        record = RunRecord(name, str(final), steps, False, wall, cpu, wall, latest is not None, steps - start)
        timing = {
            "wall_s": wall,
            "cpu_s": cpu,
            "steps": steps,
            "resumed": record.resumed,
            "trained_steps": steps - start,
        }
        timing_text = json.dumps(timing | {"torch_threads": torch.get_num_threads()})
        write_text_atomic(run_dir / TIMING_FILE, timing_text, "the run's timing")
        self._finish(record)
        return final

    def _usable_checkpoint(self, run_dir: Path, recipe, recipe_cls, fingerprint: str | None) -> Path | None:
        """The newest checkpoint of `run_dir` if it belongs to this recipe (and tokenizer); otherwise the
        folder is removed (it holds another experiment's run) and None returned. Looked at again once the
        folder's lock is taken to clear it: another reproduction in the same --work may have trained the
        run meanwhile (a quick one in a fraction of a second, between the look and the lock), and its
        checkpoints were removed under it (it stopped with "ema.safetensors: not found")."""

        def usable() -> Path | None:
            latest = ckpt.latest_checkpoint(run_dir) if run_dir.is_dir() else None
            if latest is None or self.fresh:
                return None
            from smapctl.ops.load import checkpoint_recipe

            meta = ckpt.load_meta(latest)
            # Paths as the recipe has them (a run of an older smapctl recorded them relative).
            same = with_absolute_paths(checkpoint_recipe(recipe_cls, latest, meta)) == recipe
            if fingerprint is not None:
                same = same and (meta.get("tokenizer") or {}).get("fingerprint") == fingerprint
            return latest if same else None

        latest = usable()
        if latest is None and run_dir.is_dir():
            latest = _clear_for_a_new_run(run_dir, " (--fresh)" if self.fresh else "", usable)
        return latest

    def _finish(self, record: RunRecord) -> None:
        self.records[record.name] = record
        n = len(self.records)
        took = (
            "" if record.trained_s is None else f"{record.trained_s:.0f} s ({record.ms_per_step:.0f} ms/step)"
        )
        if record.reused:
            what = "reused" + (f", trained earlier in {took}" if took else "")
        else:
            resumed = f" (resumed at step {record.steps - record.trained_steps})" if record.resumed else ""
            what = f"trained {record.trained_steps} steps in {took}{resumed}"
        log.info("[%d/%d] %s: %s", n, self.total, record.name, what)


def _read_timing(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / TIMING_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _clear_for_a_new_run(
    run_dir: Path, why: str, usable: Callable[[], Path | None] | None = None
) -> Path | None:
    """Empty a run folder of another recipe for this one's training, unless a training holds it (another
    reproduction in the same --work): refused then, with its files untouched. The lock file stays, so
    the folder is never without one for a training to take. `usable()`, asked under the lock: the
    checkpoint of this recipe that another reproduction's training has made since it was looked for,
    returned with the folder left as it is (else None, the folder emptied)."""
    from smapctl.errors import UserError
    from smapctl.train.run_folder import LOCK_FILE, in_use, lock_folder

    handle, holder = lock_folder(run_dir)
    if holder is not None:
        raise UserError(in_use(run_dir, holder))
    try:
        latest = usable() if usable is not None else None
        if latest is not None:
            return latest
        log.info("%s: removing a run of another recipe%s", run_dir, why)
        for p in run_dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.name != LOCK_FILE:
                p.unlink()
    finally:
        if handle is not None:
            handle.close()
    return None
