"""Class-conditional sampling from a trained generator: PNG files, a grid, and the ADM `.npz`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from smapctl.data.folder import class_ids, class_key, shown_classes
from smapctl.errors import UserError, agreed
from smapctl.io import loads_json, missing_folders, open_file_only, remove_empty_folders, writing_into
from smapctl.ops.load import LoadedGenerator
from smapctl.progress import progress

logger = logging.getLogger("smapctl")

# The overview grid shows at most this many classes (rows) x images per class (columns).
GRID_CLASSES, GRID_PER_CLASS = 16, 8
# Sample files are named {label:04d}_{class}_{i:05d}.png (`evaluate` reads the label back from the name).
SAMPLE_NAME = re.compile(r"^(\d{4,})_(.*)_(\d{5,})\.png$")  # label, class name (`safe_name`), index
GRID_FILE, NPZ_FILE = "grid.png", "samples.npz"
# What drew the images (generator checkpoint, seed, batch size, device, sampling settings): `evaluate
# --samples` records it beside its scores.
SETTINGS_FILE = "sampling.json"


@dataclass
class SampleResult:
    out_dir: Path
    files: list[Path]
    grid: Path
    npz: Path | None
    images: torch.Tensor  # (N, 3, H, W) uint8 (in the main process of a multi-process run; else empty)
    labels: torch.Tensor  # (N,)
    main: bool = True  # False in the other processes of a launcher: the main one reports
    settings: dict | None = None  # the sampling settings used: the recipe's, with the overrides applied
    # Without `ends_command`: the signal a process of a launch received in the last round, which let the
    # drawing finish (every image written); the caller stops at it, and says so
    stopped: str | None = None


def parse_classes(spec: str, class_names: list[str]) -> list[int]:
    """`all`, or comma-separated class names or ids -> distinct class ids (unknown ones: one-line error).
    A whole spec that is one class's name is that class (a folder's class may be named `a,b`); a class
    named `all` or with a comma in a list is given by its id."""
    if spec.strip() == "all":
        return list(range(len(class_names)))
    named = class_ids(class_names)  # names compared in one Unicode form (`class_key`)
    if class_key(spec.strip()) in named:
        return [named[class_key(spec.strip())]]
    ids = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:  # `cat,` or `1,,2`: said so, not "unknown class ''"
            raise UserError(
                f"--classes {spec!r}: an empty name between commas (names or ids, comma-separated)"
            )
        if class_key(item) in named:
            ids.append(named[class_key(item)])
        elif item.isascii() and item.removeprefix("-").isdigit():  # -1: out of range, as in the Python API
            if not 0 <= int(item) < len(class_names):
                raise UserError(
                    f"--classes: class id {item} is out of range: the generator has {len(class_names)} "
                    f"classes, ids 0 to {len(class_names) - 1}"
                )
            ids.append(int(item))
        else:
            commas = [i for i, name in enumerate(class_names) if "," in name]
            hint = (
                f" (a name with a comma is given alone, or by its id: {', '.join(map(str, commas[:5]))})"
                if commas
                else ""
            )
            shown = shown_classes(class_names)
            raise UserError(f"--classes: unknown class {item!r}; the generator's classes are: {shown}{hint}")
    return list(dict.fromkeys(ids))  # a class named twice is sampled once


def sampling_settings(recipe, overrides: dict, option=None) -> dict:
    """The generator recipe's sampling settings with `overrides` (options given, None left out), or a
    one-line UserError for one the generator does not use, more MaskGIT steps than tokens, or guidance
    on a generator trained without class dropout. `evaluate --generator` checks them before its
    classifier trains (minutes), `sample_images` before it draws. `option` names a setting in a message
    (default: its `smapctl sample` option, `cfg_scale` -> `--cfg`)."""
    from smapctl.recipe import too_many_steps, untrained_guidance

    option = option or _option
    check_sampling_options(recipe.model.kind, overrides, option)
    settings = {**vars(recipe.sample), **overrides}
    too_many = too_many_steps(recipe.model.kind, settings["steps"], recipe.model.num_tokens)
    if too_many is not None:
        if "steps" in overrides:
            raise UserError(f"{option('steps')} {settings['steps']}: {too_many}")
        # `evaluate --generator` has no --steps: say where one is (the API: its keyword).
        where = (
            "(`smapctl sample --steps`; `smapctl evaluate --samples` scores its folder)"
            if option is _option
            else f"(pass {option('steps')}=)"
        )
        raise UserError(f"the recipe's sample.steps {settings['steps']}: {too_many} {where}")
    untrained = untrained_guidance(recipe.model.class_dropout, settings["cfg_scale"])
    if untrained is not None:
        said = option("cfg_scale") if "cfg_scale" in overrides else "the recipe's sample.cfg_scale"
        raise UserError(f"{said}: {untrained} in this generator; sample with {option('cfg_scale')} 1")
    return settings


def sample_images(
    checkpoint,
    out_dir: Path,
    *,
    classes: str = "all",
    per_class: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    npz: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    describing: tuple[Path, ...] = (),
    again: str = "run again with --overwrite",
    tokenizer=None,
    ends_command: bool = True,
    out_named: str | None = None,
    **overrides,
) -> SampleResult:
    """Sample `per_class` images of each class; `overrides` are SamplingConfig fields (cfg_scale, ...).

    Writes `CCCC_<class>_IIIII.png` per image as each batch is done, `sampling.json` (what drew them;
    with the first image, `"finished": false`, then `true` once all are written), `grid.png` (at most
    `GRID_CLASSES` classes x `GRID_PER_CLASS` images, one class per row; last) and with `npz` the ADM
    `samples.npz`. `tokenizer`: the place of the generator's tokenizer when it moved (--tokenizer).
    Deterministic for a seed, given the same classes, `per_class` and `batch_size`: batch b draws from
    a generator seeded with (seed, b), so the images do not depend on anything else in the process.
    Every file is written atomically: a full disk stops with a one-line UserError naming the file, the
    images finished before it stay, and an earlier file of the same name is never left half-written.

    A folder already holding an earlier run's files (sample PNGs, grid.png, samples.npz) is refused, as
    `evaluate` would score the old images with the new ones. With `overwrite` the new files replace
    them, and those the new run did not rewrite are deleted once all its images are written (so a run
    that fails half-way loses no image; the folder is then refused again until a run completes). The
    earlier run's grid.png and samples.npz, and the files in `describing` (an evaluation's metrics of
    the earlier images), go as the first new image is written (under a launcher, before any is drawn):
    they would describe a folder whose images this run is replacing. `again` is the advice of the
    message of an interrupted run. `out_named`: the output folder as the user gave it, for the messages
    that name the option (default `-o OUT_DIR`; `evaluate --generator` draws into its -o's samples/).
    With `ends_command` (the sampling is all the command does) a SIGINT or SIGTERM once every image is
    drawn lets grid.png and samples.npz be written, and the run ends as a complete one, saying so (run by
    `smapctl sample`, up to the command's end: `signals.CommandEnd`); `evaluate --generator`, which goes
    on to score the images, stops at once.
    A folder holding any other image file (at any depth: a dataset's class folders, say) is refused,
    with or without `overwrite`. The arguments are checked first, the folder after them.

    Started by `accelerate launch` / `torchrun` (and `device` None), the processes share the batches:
    process p draws batches p, p + P, ... on its own device, so the images are those of one process;
    the main one then writes grid.png and samples.npz from the PNGs of all.
    """
    from smapctl.train.signals import completing

    device, rank, world, state = _processes(device)
    plan = _load_plan(checkpoint, classes, per_class, overrides, device=device, tokenizer=tokenizer)
    if world > 1:
        _check_same_checkpoints(plan)
    # The output folder is checked once the arguments are known to be good (so that a wrong --checkpoint
    # is reported before the earlier samples in the folder), and held by the main process while the
    # run writes it (`writing_into`) before it is looked into.
    _refuse_out(out_dir)
    _refuse_out_in_training_images(out_dir, plan)
    main = rank == 0
    with writing_into(out_dir) if main else contextlib.nullcontext():
        earlier, folder, images = _prepare_folder(
            out_dir, plan, overwrite, describing, main, world, state, seed=seed, batch_size=batch_size,
            device=device, out_named=out_named or f"-o {out_dir}",
        )  # fmt: skip
        labels = plan.labels
        # sampling.json comes with the main process's first image: written before the wait, it would be
        # taken for an earlier run's by another process; right after it, an interrupt before any image would
        # leave it describing the earlier run's images (or alone in the folder, which the next run refuses).
        batches = list(enumerate(range(0, len(labels), batch_size)))
        taken = _draw_batches(
            plan, folder, images, batches, seed=seed, batch_size=batch_size, rank=rank, world=world,
            device=device, npz=npz, again=again,
        )  # fmt: skip
        # Every image is written: a signal now lets the run finish, as one during a launch's last round
        # (otherwise it would say nothing, and exit 130 with every image and grid.png written, samples.npz
        # not), and
        # until the command has ended (its final print).
        written = f"{len(labels)} images{f', {GRID_FILE} and {NPZ_FILE}' if npz else f' and {GRID_FILE}'}"
        complete = f"the {written} are written to {out_dir}; the sampling is complete"
        try:
            with completing(complete) if ends_command else contextlib.nullcontext() as stop:
                if world > 1:
                    state.wait_for_everyone()
                files = [out_dir / n for n in folder.names]
                if not main:
                    grid, stopped = out_dir / GRID_FILE, None if ends_command else taken
                    return SampleResult(
                        out_dir, files, grid, None, images, labels, main=False, settings=plan.used,
                        stopped=stopped,
                    )  # fmt: skip
                _read_other_processes_images(images, files, batches, world=world, batch_size=batch_size)
                result = _finish(plan, folder, images, files, earlier, npz=npz)
        except KeyboardInterrupt as e:  # a second signal (or, from `evaluate`, the first) stops at once
            if main:
                folder.report_interrupt(npz, again)
                e.said = True  # (`evaluate --generator` says nothing more)
            raise
        own = stop.unsaid() if stop is not None else None  # (said once: after the last round's, not again)
        return _stopped_after_all(result, taken or own, bool(taken), ends_command, complete)


def _check_same_checkpoints(plan: _Plan) -> None:
    """Under a launcher: every node's copies of the generator and its tokenizer are the same."""
    from smapctl.launch import check_same_checkpoints
    from smapctl.ops.load import fingerprint

    generator = (plan.generator_path, fingerprint(plan.generator_path, "ema"))  # (it samples with EMA)
    check_same_checkpoints({"generator": generator, "tokenizer": (plan.tok.path, plan.tok.fingerprint)})


def _stopped_after_all(result, said: str | None, in_round: bool, ends_command: bool, complete: str):
    """A sampling whose every image was written, though a signal (`said`) came during the last round
    (`in_round`) or after it: without `ends_command` the caller (`evaluate --generator`) stops at it and
    says so; else it is said here, with what is `complete`."""
    from smapctl.train.signals import say_late_signal

    if not ends_command:
        result.stopped = said
    else:
        say_late_signal(said, in_round, "drawn", complete)
    return result


def _load_plan(checkpoint, classes: str, per_class: int, overrides: dict, *, device, tokenizer) -> _Plan:
    """The generator loaded and what the run draws, checked before the output folder is looked at."""
    from smapctl.train.generator import load_generator

    loaded = load_generator(checkpoint, device, tokenizer=tokenizer)
    return make_plan(loaded, parse_classes(classes, loaded.tokenizer.class_names), per_class, overrides)


def _prepare_folder(
    out_dir: Path,
    plan: _Plan,
    overwrite: bool,
    describing,
    main: bool,
    world: int,
    state,
    *,
    seed,
    batch_size,
    device,
    out_named: str,
) -> tuple[list[Path], _Folder, torch.Tensor]:
    """(the earlier run's files, the opened folder, the image buffer): the folder checked and opened and,
    under a launcher, the earlier run's stale files gone before any process writes an image."""
    earlier = _check_out(out_dir, overwrite)
    # The folders this process makes (the main one's are `writing_into`'s to remove), taken back by
    # `_check_shared` where its node does not share them.
    made = [] if main else missing_folders(out_dir)
    folder = _Folder.open(
        out_dir, plan, earlier, describing, main, seed=seed, batch_size=batch_size, device=device
    )
    size = plan.tok.model.cfg.image_size
    # Filled batch by batch; the other processes of a launcher keep no copy (the main one reads theirs).
    images = torch.empty(len(plan.labels) if main else 0, 3, size, size, dtype=torch.uint8)
    if world > 1:  # every process has looked for earlier files before any writes its own
        folder.clear_stale()  # now: another process may write the first new image
        _check_shared(out_dir, main, made, out_named)
        state.wait_for_everyone()
    return earlier, folder, images


def _check_shared(out_dir: Path, main: bool, made: list[Path], out_named: str) -> None:
    """Under a launcher every process writes its images into `out_dir` and the main one reads them all
    for grid.png: every process must see the one folder. Nodes that each have their own (nothing shared)
    all stop here, before any image, in one line naming the folder as `out_named`, rather than drawing
    every image and stopping at the first the main process cannot read. The main process leaves a
    marker that every process looks for. A process that does not see it removes the folders `made` for
    it (`missing_folders`, still empty): otherwise its node would keep an empty folder of the failed
    command's."""
    import uuid

    import torch.distributed as dist
    from accelerate.utils import gather_object

    if not (dist.is_available() and dist.is_initialized()):  # (nothing joined: one process's view)
        return
    marker = out_dir / f".smapctl-shared-{uuid.uuid4().hex[:12]}"
    if main:
        marker.touch()
    try:
        name = gather_object([marker.name if main else None])[0]
        # A new name is looked up on the file server itself (no cached entry for it on this node).
        mine = not (out_dir / name).exists()
        blind = gather_object([mine])  # by process index
    finally:
        if main:
            marker.unlink(missing_ok=True)
    if any(blind):
        if mine:  # (only what this command made, and only if empty: never a folder that was there)
            remove_empty_folders(made)
        raise agreed(
            UserError(
                f"{out_named}: process {blind.index(True)} of the launch does not see the files the main "
                "process writes there (each node has a folder of its own?); every process writes its images "
                "into it and the main one reads them all: put it on storage every process shares"
            )
        )


def _read_other_processes_images(images: torch.Tensor, files: list[Path], batches, *, world, batch_size):
    """Into the main process's `images`, the batches other processes of a launcher drew, from their PNGs."""
    for b, start in batches:
        if b % world:  # drawn by another process
            for i in range(start, min(start + batch_size, len(images))):
                images[i] = _read_png(files[i])


def _finish(plan: _Plan, folder: _Folder, images, files, earlier, *, npz: bool) -> SampleResult:
    """Every image written: the earlier run's leftovers go, then grid.png and (with `npz`) samples.npz."""
    from smapctl.data.images import save_png
    from smapctl.eval.npz import write_npz

    out_dir, labels = folder.path, plan.labels
    folder.finish(npz)
    grid = save_png(_grid(images, len(plan.ids), plan.per_class), out_dir / GRID_FILE)
    npz_path = None
    if npz:  # the images as `arr_0` and their classes as `arr_1`
        npz_path = write_npz(
            out_dir / NPZ_FILE,
            images.permute(0, 2, 3, 1).numpy(),
            labels.numpy(),
            kept=f"this run's images and {GRID_FILE} are written" if earlier else None,
        )
    return SampleResult(out_dir, files, grid, npz_path, images, labels, settings=plan.used)


def _processes(device: str | None):
    """(device, rank, world, state): alone on `device`, or (None) this process's place under a launcher."""
    if device is not None:
        return device, 0, 1, None
    from smapctl.launch import check_joined, launcher_precision, process_state

    state = process_state()
    check_joined(state.num_processes, "each would draw every image into the same folder")
    asked = launcher_precision()
    if asked is not None and state.is_main_process:  # (it would be dropped without a word)
        logger.warning("accelerate's mixed precision %s is not used: sample draws and decodes in fp32", asked)
    return state.device, state.process_index, state.num_processes, state


def _draw_batches(plan, folder, images, batches, *, seed, batch_size, rank, world, device, npz, again):
    """Draw and write this process's batches (b % world == rank); the main one keeps them in `images`.
    Returns the name of the signal a process of a launch received during the last round, which they
    let finish (else None)."""
    from smapctl.data.images import save_png
    from smapctl.launch import RoundStops

    labels, main = plan.labels, rank == 0
    # The main process shows the progress of all (the others draw as many batches, give or take one).
    bar = progress(len(labels), "sampling", "images", enabled=main)
    # Under a launcher a signal stops every process after the same round (one batch each), as a training
    # stops after the same step (`RoundStops`). One process alone stops at once.
    try:
        with RoundStops(world, device) as rounds:
            for first in range(0, len(batches), world):  # a round: the same count of them in every process
                for b, start in batches[first : first + world]:
                    if b % world != rank:
                        continue
                    y = labels[start : start + batch_size]
                    batch = draw(plan, y.to(device), batch_rng(seed, b, device))
                    for i, image in enumerate(batch, start):
                        # The folder is fsynced once, by sampling.json's write as the run finishes (a
                        # folder fsync after every PNG takes as long as the PNG's own on a busy disk).
                        save_png(image, folder.path / folder.names[i], sync_folder=False)
                        folder.started()
                    if main:
                        images[start : start + len(y)] = batch
                    bar.update(min(len(y) * world, len(labels) - bar.done))
                # After the last round every image is written: the run finishes (a stop there would throw a
                # complete run away, grid and all, and say to run it again), the main process saying so
                # whichever process received the signal.
                rounds.round_done(last=first + world >= len(batches))
        return rounds.signal_name
    except UserError as e:
        # A write of this process's own images (a full disk it alone sees, a folder in the place of one
        # of its files): under a launcher its own message, not one the main process prints for all (the
        # others would only say that another process stopped).
        e.same_in_every_process = world == 1
        raise
    except KeyboardInterrupt as e:
        bar.close()
        if main:  # one report, of every process's images: the PNGs this run wrote
            folder.report_interrupt(npz, again)
            e.said = True  # (`evaluate --generator` says nothing more)
        raise
    finally:
        bar.close()


@dataclass
class _Plan:
    """What a sampling run draws, known (and checked) before its output folder is looked at."""

    model: torch.nn.Module
    recipe: object  # GeneratorRecipe
    tok: object  # the LoadedTokenizer that decodes the tokens
    stats: object  # the latent statistics the generator was trained with
    generator_path: Path
    ids: list[int]  # the classes, in the order given
    per_class: int
    labels: torch.Tensor  # (N,) each class `per_class` times
    names: list[str]  # the file of each image
    overrides: dict  # the sampling options given (None left out)
    settings: dict  # the recipe's sampling settings with `overrides`
    used: dict  # those of `settings` the generator uses
    option: object  # names a setting in a message (`sampling_settings`)


def make_plan(loaded: LoadedGenerator, ids: list[int], per_class: int, overrides: dict, option=None) -> _Plan:
    """`per_class` images of each class of `ids` from `loaded` (`load_generator`'s), checked: `per_class`,
    the memory the images take and the sampling settings (one-line UserErrors). `overrides`:
    SamplingConfig fields (None: the recipe's); `option` as in `sampling_settings`."""
    from smapctl.recipe import unused_sampling_settings

    option = option or _option
    recipe, tok = loaded.recipe, loaded.tokenizer
    if per_class < 1:
        raise UserError(f"{option('per_class')}: must be at least 1")
    _check_memory(len(ids) * per_class, tok.model.cfg.image_size)
    labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(per_class)
    names = [
        f"{label:04d}_{safe_name(tok.class_names[label])}_{i % per_class:05d}.png"
        for i, label in enumerate(labels.tolist())
    ]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = sampling_settings(recipe, overrides, option)
    unused = unused_sampling_settings(recipe.model.kind, settings)
    used = {k: v for k, v in settings.items() if k not in unused}
    return _Plan(
        model=loaded.model, recipe=recipe, tok=tok, stats=loaded.stats, generator_path=loaded.path, ids=ids,
        per_class=per_class, labels=labels, names=names, overrides=overrides, settings=settings, used=used,
        option=option,
    )  # fmt: skip


def batch_rng(seed: int, batch: int, device) -> torch.Generator:
    """The random generator batch number `batch` of a run with `seed` draws from: the images of a batch
    depend on the seed, the batch number and its classes alone (not on the process that draws it)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)


def draw(plan: _Plan, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images of classes `y` (B,) as uint8 (B, 3, H, W) on the CPU; a UserError for values that are not
    finite (they would be written as black images)."""
    return draw_images(plan, draw_tokens(plan, y, generator), y)


def draw_tokens(plan: _Plan, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The generator's tokens for classes `y` (B,): indices (B, K), or latents (B, K, C) normalised as
    it models them (`plan.stats`)."""
    from smapctl.train.generator import NotFiniteSamples, generate

    try:
        return generate(plan.model, plan.recipe, y, generator=generator, **plan.overrides)
    except NotFiniteSamples as e:
        # The settings that scale what is sampled, where they do (1 leaves it as it is): otherwise a --cfg of
        # 1 would be said to be too large for the values a --temperature 1e308 overflows.
        causes = []
        for name, problem in (
            ("cfg_scale", "may be too large (the guided values overflow)"),
            ("temperature", "may be too far from 1 (the values it scales overflow)"),
        ):
            if plan.settings[name] != 1:
                said = plan.option(name) if name in plan.overrides else f"the recipe's sample.{name}"
                causes.append(f"{said} {plan.settings[name]:g} {problem}")
        causes.append("the generator's weights are not finite")
        raise UserError(f"{plan.generator_path}: {e}: {', or '.join(causes)}") from None


def draw_images(plan: _Plan, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`draw_tokens`' tokens decoded: uint8 (B, 3, H, W) on the CPU."""
    from smapctl.data.images import to_uint8
    from smapctl.train.generator import decode_samples

    decoded = decode_samples(plan.tok, tokens, y, plan.stats)
    if not bool(torch.isfinite(decoded).all()):
        raise UserError(
            f"{plan.tok.path}: its decoder gave values that are not finite (are its weights?) for the "
            f"tokens of {plan.generator_path}"
        )
    return to_uint8(decoded).cpu()


def _refuse_out(out_dir: Path) -> None:
    """A run folder, or a folder inside a run's checkpoints, is refused as an output folder (before it is
    made)."""
    from smapctl.train import checkpoint as ckpt

    ckpt.refuse_output_in_checkpoints(out_dir)
    if ckpt.is_run_or_checkpoint(out_dir):  # (its preview grids read as images of another kind)
        raise UserError(
            f"{out_dir}: a training run's folder; samples go to a folder of their own: choose another --out"
        )


def _refuse_out_in_training_images(out_dir: Path, plan: _Plan) -> None:
    """An output folder inside the image folders the generator and its tokenizer learned from (or the
    tokenizer was validated on) is refused (`-o data/train/samples`): an empty new folder passes
    `_check_out`, and the samples would become a class `samples` of the dataset for the next training on it.
    The folders as the recipes name them, as trainings refuse a run folder inside them (relative ones read
    from here); the message says whose images each holds (the tokenizer's are the generator's only when
    latents.dataset is null)."""
    from smapctl.data.config import refuse_output_in_images

    data = plan.tok.recipe.data
    folders = {
        "latents.dataset": (plan.recipe.latents.dataset, "the generator learned from"),
        "the tokenizer's data.dataset": (data.dataset, "the tokenizer learned from"),
        "the tokenizer's data.val_dataset": (data.val_dataset, "the tokenizer was validated on"),
    }
    for key, (folder, whose) in folders.items():
        then = f"{whose}, and the samples would join them: choose another --out"
        refuse_output_in_images(out_dir, {key: folder}, then)


def _check_out(out_dir: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier run in `out_dir` (refused without `overwrite`); a folder of other images
    is refused."""
    other = foreign_image(out_dir)
    if other is not None:
        raise UserError(
            f"{out_dir}: holds images that `smapctl sample` did not write ({other}); a dataset folder would"
            " get the generated images mixed into it: choose another --out"
        )
    earlier = earlier_samples(out_dir)
    if earlier and not overwrite:
        # Its images counted apart from its other files: "129 files" read as one image too many.
        others = [p.name for p in earlier if not SAMPLE_NAME.match(p.name)]
        n = len(earlier) - len(others)
        files = ", ".join([f"{n} image{'' if n == 1 else 's'}"] * (n > 0) + others)
        raise UserError(
            f"{out_dir}: holds an earlier sampling run ({files}), whose images `evaluate` would count"
            " with the new ones; pass --overwrite to replace them, or choose another --out"
        )
    return earlier


@dataclass
class _Folder:
    """The output folder as one run fills it: the earlier run's files it replaces, and `sampling.json`,
    written as the first image is (`"finished": false`) and again once all are (`true`), so that
    `evaluate --samples` of an interrupted run's folder still knows what drew its images."""

    path: Path
    names: list[str]  # this run's image files
    earlier: list[Path]  # an earlier run's files (replaced with --overwrite)
    before: dict[str, tuple[int, int]]  # the identities of the earlier run's files of this run's names
    stale: list[Path]  # the earlier run's files that go as the first new image is written
    drew: dict  # what draws the images: the contents of sampling.json
    described: bool  # sampling.json written (or not this process's to write)

    @classmethod
    def open(
        cls,
        out_dir: Path,
        plan: _Plan,
        earlier,
        describing,
        main: bool,
        *,
        seed: int,
        batch_size: int,
        device,
    ) -> _Folder:
        """Only the main process of a launcher changes the folder's own files; the others write their
        images."""
        from smapctl.io import ensure_dir

        ensure_dir(out_dir, "the output folder")
        stale = (
            [
                out_dir / GRID_FILE,
                out_dir / NPZ_FILE,
                out_dir / SETTINGS_FILE,
                *describing,
                *_scores_of(out_dir),
            ]
            if main and earlier
            else []
        )
        drew = {
            "generator": str(Path(plan.generator_path).resolve()),
            "tokenizer": str(Path(plan.tok.path).resolve()),  # what decoded them (it may have moved)
            "seed": seed,
            # The noise is drawn per batch (seed, batch number): another batch size draws other images.
            "batch_size": batch_size,
            "device": torch.device(device).type,
            "threads": torch.get_num_threads(),  # on the CPU, float rounding follows it (README)
            "classes": plan.ids,
            "per_class": plan.per_class,
            "settings": plan.used,
            "class_names": list(plan.tok.class_names),  # by label: `evaluate` checks an .npz's arr_1
        }
        before = _file_ids(out_dir, plan.names) if main and earlier else {}
        return cls(out_dir, plan.names, earlier, before, stale, drew, described=not main)

    def describe(self, finished: bool) -> None:
        from smapctl.io import write_text_atomic

        text = json.dumps(self.drew | {"finished": finished}, indent=2) + "\n"
        # The first write comes after the earlier run's sampling.json went (`clear_stale`).
        replaced = not finished and any(path.name == SETTINGS_FILE for path in self.earlier)
        kept = f"the earlier run's {SETTINGS_FILE} is removed" if replaced else None
        write_text_atomic(self.path / SETTINGS_FILE, text, "the sampling settings", kept=kept)

    def clear_stale(self) -> None:
        """The earlier run's grid.png, samples.npz, sampling.json and scores go: they would describe a mix
        of its images and this run's."""
        while self.stale:
            self.stale.pop().unlink(missing_ok=True)

    def started(self) -> None:
        """After this process's first image: `clear_stale`, and (the main process) this run's
        sampling.json is written."""
        self.clear_stale()
        if not self.described:
            self.describe(finished=False)
            self.described = True

    def report_interrupt(self, npz: bool, again: str) -> None:
        """How far an interrupted run got, counted on disk (the main process reports for all processes)."""
        now = _file_ids(self.path, self.names)
        mine = {name for name in now if now[name] != self.before.get(name)}
        older = sum(
            p.name not in mine and bool(SAMPLE_NAME.match(p.name)) for p in earlier_samples(self.path)
        )
        if self.earlier and not mine and (self.path / GRID_FILE).exists():  # nothing changed yet
            logger.warning(
                "interrupted before its first image: %s holds the earlier run as it was", self.path
            )
        elif not mine and not older:  # not "run again with --overwrite", which is not needed
            logger.warning("interrupted before its first image: nothing written to %s", self.path)
        else:
            # What is there, as found: a run stopped once every image is written (as samples.npz was, say)
            # has grid.png. Once this run wrote an image an earlier run's grid.png and samples.npz are gone
            # (`clear_stale`): one found is this run's.
            last = [GRID_FILE, *([NPZ_FILE] if npz else [])]
            written = [name for name in last if mine and (self.path / name).exists()]
            missing = [name for name in last if name not in written]
            said = ", ".join(
                [f"with {' and '.join(written)}"] * bool(written)
                + [f"without {' or '.join(missing)}"] * bool(missing)
            )
            logger.warning(
                "interrupted: %d of %d images written to %s, %s%s; %s",
                len(mine), len(self.names), self.path, said,
                f" (and {older} images of the earlier run)" if older else "", again,
            )  # fmt: skip

    def finish(self, npz: bool) -> None:
        """Every image written: the earlier run's images this one did not replace go, and sampling.json
        says the run finished (grid.png and samples.npz follow)."""
        written = {*self.names, GRID_FILE, SETTINGS_FILE, *([NPZ_FILE] if npz else [])}
        for path in self.earlier:
            if path.name not in written:
                path.unlink(missing_ok=True)
        self.describe(finished=True)


def _file_ids(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of those of `names` that exist in `folder`. A PNG is written to a new
    file and renamed into place, so one this run wrote (over an earlier one with --overwrite, too) has
    another identity than before it."""
    ids = {}
    for name in names:
        try:
            st = (folder / name).stat()
        except OSError:
            continue
        ids[name] = (st.st_ino, st.st_mtime_ns)
    return ids


def _read_png(path: Path) -> torch.Tensor:
    """A sample PNG back as (3, H, W) uint8 (lossless: the very pixels written)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def check_sampling_options(kind: str, overrides: dict, option=None) -> None:
    """A sampling option this generator family does not use is a one-line error naming the option and
    the ones it has (otherwise `--steps` would be silently ignored by a LlamaGen generator). `option` as in
    `sampling_settings`."""
    from smapctl.recipe import SAMPLING_SETTINGS, unused_sampling_settings

    option = option or _option
    unused = unused_sampling_settings(kind, overrides)
    if unused:
        own = ", ".join(option(name) for name in SAMPLING_SETTINGS[kind])
        common = ", ".join(option(name) for name in ("cfg_scale", "cfg_schedule", "temperature"))
        raise UserError(
            f"{option(unused[0])}: a {kind} generator does not use it; its own sampling options are {own}"
            f" (and {common})"
        )


def _scores_of(out_dir: Path) -> list[Path]:
    """An `evaluate --samples OUT --out OUT` report in the folder, scoring its images (which this run is
    replacing), or nothing: [metrics.json] when its "samples" is this folder or its samples.npz. Read as
    a regular file only (`open_file_only`): a named pipe of that name would hang `sample --overwrite`."""
    report = out_dir / "metrics.json"
    try:
        with os.fdopen(open_file_only(report, os.O_RDONLY), "rb") as f:
            scored = loads_json(f.read()).get("samples")
    except (OSError, ValueError, AttributeError):
        return []
    ours = {str(out_dir.resolve()), str((out_dir / NPZ_FILE).resolve())}
    return [report] if scored in ours else []


def _check_memory(count: int, size: int) -> None:
    """The images of a run are kept in memory (for grid.png, samples.npz and `evaluate`): more than half
    of the machine's memory is refused before any is drawn (otherwise `--per-class 100000000` would fill
    15 GB and go on without a word)."""
    from smapctl.runtime import images_fit_in_memory

    too_many = images_fit_in_memory(count, (3, size, size))
    if too_many is not None:
        raise UserError(f"{too_many}: draw them in several runs (another --seed each)")


def _option(name: str) -> str:
    """The `smapctl sample` option of a SamplingConfig field."""
    return "--cfg" if name == "cfg_scale" else "--" + name.replace("_", "-")


def earlier_samples(out_dir: Path) -> list[Path]:
    """The files of an earlier `sample_images` run in `out_dir` (none if it does not exist)."""
    if not out_dir.is_dir():
        return []
    ours = (GRID_FILE, NPZ_FILE, SETTINGS_FILE)
    return sorted(
        p for p in out_dir.iterdir() if p.is_file() and (p.name in ours or SAMPLE_NAME.match(p.name))
    )


def foreign_image(out_dir: Path) -> Path | None:
    """An image file below `out_dir` (at any depth) that is not a `sample_images` file, or None. Links to
    class folders are followed, as `evaluate` reads a folder (a dataset made of links is one too)."""
    from smapctl.data.images import first_other_image

    def ours(folder: Path, name: str) -> bool:
        return folder == Path(".") and (name == GRID_FILE or bool(SAMPLE_NAME.match(name)))

    return first_other_image(out_dir, ours)


def _grid(images: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """A (3, H', W') overview: the first `GRID_PER_CLASS` images of the first `GRID_CLASSES` classes, a
    row per class (a 50,000-image evaluation run would otherwise make a multi-gigabyte PNG)."""
    from smapctl.data.images import make_grid

    rows, cols = min(num_classes, GRID_CLASSES), min(per_class, GRID_PER_CLASS)
    kept = images.unflatten(0, (num_classes, per_class))[:rows, :cols].flatten(0, 1)  # (rows cols, 3, H, W)
    return make_grid(kept, nrow=cols if cols > 1 else None)


def safe_name(name: str) -> str:
    """A class name as sample file names hold it (in one Unicode form, `class_key`)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in class_key(name))[:40]
