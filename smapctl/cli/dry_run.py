"""`train-tokenizer --dry-run` and `train-generator --dry-run`: the model built without data (on the meta
device when large) and described, then what the training would stop at, said without starting it: the
data, the run folder, the weights it needs, the checkpoint a `--resume` or `--init-from` would take.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from smapctl.cli.process import console, err_console, not_main_process, say


def _train_line(t) -> str:
    """Steps, batch, lr and precision for a dry run; `auto` with what it chooses on this machine, fp16
    flagged on a machine without a GPU (the training would refuse it; a dry run of a GPU recipe on a
    laptop is fine)."""

    from smapctl.devices import training_device
    from smapctl.precision import bf16_units, precision_name, resolve_train_precision

    precision = precision_name(t.precision)
    device = training_device().type  # a Mac trains on mps: its CPU's bf16 units would be described
    where = {"cuda": "GPU", "cpu": "CPU"}.get(device, f"{device} device")
    if t.precision == "auto":
        chosen = resolve_train_precision("auto", device, announce=False)
        precision = f"auto ({precision_name(chosen)} on this {where})"
    elif t.precision == "fp16" and device == "cpu":
        precision = "fp16 (needs a GPU: training refuses it on this machine)"
    elif t.precision == "bf16" and bf16_units(device) is False:  # the run warns of it: so does its dry run
        precision = (
            f"bf16 (this {where} has no bf16 units: emulated, many times slower; auto gives fp32 here)"
        )
    return f"{t.max_steps} steps, batch {t.batch_size}, lr {t.lr:g}, {precision}"


def _print_summary(recipe: Path, cfg, summary) -> None:
    from rich.table import Table

    from smapctl.errors import one_line

    m = cfg.model
    # The recipe's and the dataset's paths through `one_line`: a name that is not UTF-8 (its bytes held as
    # lone surrogates) stopped the dry run with a UnicodeEncodeError traceback as the table was printed.
    title = one_line(f"{recipe} ({summary.class_name}, built on {summary.device})")
    table = Table(title=title, show_header=False)
    for _ in range(2):  # a word wider than its column (a dataset's path) folds instead of being cut with "…"
        table.add_column(overflow="fold")
    table.add_row("image", f"{m.image_size} px, patch {m.patch_size}, {m.num_patches} patches")
    table.add_row("encoder", f"{m.enc_depth} x {m.enc_width} ({m.enc_heads} heads)")
    table.add_row("decoder", f"{m.dec_depth} x {m.dec_width} ({m.dec_heads} heads)")
    table.add_row("latents", f"{m.num_latent_tokens} tokens x {m.token_dim} ({m.regularizer.kind})")
    table.add_row("class condition", f"{m.class_condition} ({m.num_classes} classes)")
    table.add_row("tail dropping", m.tail_drop + (" per sample" if m.tail_drop_per_sample else " per batch"))
    table.add_row("data", one_line(cfg.data.dataset))
    t = cfg.train
    table.add_row("train", _train_line(t))
    for name, n in summary.parts.items():
        table.add_row(f"  {name}", f"{n:,}")
    console.print(table)
    print(f"parameters: {summary.parameters}")  # for scripts: plain, unwrapped, no separators


def dry_run_tokenizer(
    cfg, recipe: Path, out: Path | None, resume: bool, init_from: str | None, init_weights: str
) -> None:
    """`train-tokenizer --dry-run`: the model's summary, then what would stop the training (the data,
    the perceptual network's weights, the run folder, the checkpoint resumed or started from)."""
    from smapctl.models.smap import SMAP
    from smapctl.summary import summarize
    from smapctl.train.runner import tracker_problem

    if not_main_process():  # under a launcher the summary is printed once
        return
    summary = summarize(lambda: SMAP(cfg.model))
    _print_summary(recipe, cfg, summary)
    from smapctl.data.datasets import class_count_problem, missing_data, training_set_problem
    from smapctl.train.losses import perceptual_weights_problem

    # The images are listed for the training set's checks and again for the resume's.
    with _each_warning_once():
        missing = missing_data(cfg.data)
        classes = class_count_problem(cfg.data, cfg.model.num_classes)  # what training checks first
        listed = None  # the images listed, as training lists them (none read), when the data is there
        if not missing and classes is None:
            listed = training_set_problem(cfg.data, cfg.model.image_size, cfg.train.batch_size)
        folders = {"data.dataset": cfg.data.dataset, "data.val_dataset": cfg.data.val_dataset}
        out_problem = _run_folder_problem(recipe, out, resume, folders)
        problems = (*missing, classes, listed, perceptual_weights_problem(cfg.loss), out_problem)
        problems += (_memory_problem(summary.parameters, cfg.train), tracker_problem(cfg.train.log_with))
        _dry_run_notes(problems=problems)
        if resume:
            _check_the_resume(cfg, "tokenizer", recipe, out)
        if init_from is not None:
            _check_the_init(cfg, "tokenizer", init_from, init_weights, listed=not missing and not classes)


def dry_run_generator(
    cfg, recipe: Path, out: Path | None, resume: bool, init_from: str | None, init_weights: str
) -> None:
    """`train-generator --dry-run`: the model's summary, then what would stop the training (the
    tokenizer, the latents' images, the run folder, the checkpoint resumed or started from)."""
    from smapctl.summary import summarize
    from smapctl.train.generator import build_generator
    from smapctl.train.runner import tracker_problem

    if not_main_process():  # under a launcher the summary is printed once
        return
    summary = summarize(lambda: build_generator(cfg, None))
    if resume:  # on the tokenizer the run was trained on, found as training would find it
        from smapctl.recipe import training_run_dir
        from smapctl.train.generator import tokenizer_of_the_resumed_run

        cfg = tokenizer_of_the_resumed_run(cfg, training_run_dir(recipe, out, resume))
    unchecked, classes = _check_against_its_tokenizer(cfg)
    m = cfg.model
    say(
        f"{recipe}: {summary.class_name} {m.depth} x {m.width} over {m.num_tokens} tokens, "
        f"class embedding {cfg.class_embed}, built on {summary.device}"
    )
    for name, n in summary.parts.items():
        console.print(f"  {name}: {n:,}")
    say(f"train: {_train_line(cfg.train)}")
    print(f"parameters: {summary.parameters}")  # for scripts: plain, unwrapped, no separators
    from smapctl.data.datasets import missing_images

    out_problem = _run_folder_problem(recipe, out, resume, {"latents.dataset": cfg.latents.dataset})
    missing = missing_images("latents.dataset", cfg.latents.dataset)
    memory = _memory_problem(summary.parameters, cfg.train)
    trackers = tracker_problem(cfg.train.log_with)
    _dry_run_notes(problems=(missing, classes, out_problem, memory, trackers), notes=(unchecked,))
    if resume:
        _check_the_resume(cfg, "generator", recipe, out)
    if init_from is not None:
        _check_the_init(cfg, "generator", init_from, init_weights)


def _memory_problem(parameters: int, train) -> str | None:
    """A dry run on a machine without a GPU: what training would warn of a model too large for its memory
    (`runtime.training_memory_problem`)."""
    import torch

    from smapctl.runtime import training_memory_problem

    if torch.cuda.is_available():
        return None
    return training_memory_problem(parameters, train.ema_decay > 0)


def _dry_run_notes(problems=(), notes=()) -> None:
    """A dry run's findings on stderr, one line each (as printed, no markup): `problems` (what training
    would stop at) as warnings (`WARNING ...`, as the log spells them), `notes` as they are; None
    entries are skipped. A path in one that is not UTF-8 is written as its bytes, as errors write it."""
    from smapctl.errors import one_line

    lines = [f"WARNING {p}" for p in problems if p is not None] + [n for n in notes if n is not None]
    for line in lines:
        err_console.print(one_line(line), highlight=False, markup=False, soft_wrap=True)


def _run_folder_problem(recipe: Path, out: Path | None, resume: bool, data: dict) -> str | None:
    """For a dry run of a new run: what the training would refuse of its run folder, which the dry run
    does not make (it passed --out FILE, say): a file or a path under one, a broken symbolic link, a folder
    inside the images it reads (`data`: recipe key -> folder) or inside a run's checkpoints, checkpoints
    there already. (A --resume's folder is `_check_the_resume`'s.)"""
    from smapctl.errors import UserError
    from smapctl.recipe import training_run_dir
    from smapctl.train import checkpoint as ckpt
    from smapctl.train.resume import holds_checkpoints
    from smapctl.train.run_folder import refuse_run_in_data

    if resume:
        return None
    run_dir = training_run_dir(recipe, out, resume)
    try:
        refuse_run_in_data(run_dir, data)
    except UserError as e:
        return str(e)
    for there in (run_dir, *run_dir.parents):  # the nearest path that is there must be a folder
        if os.path.lexists(there):
            if not there.is_dir():
                what = "a file, not a folder" if there.exists() else "a broken symbolic link"
                inside = "" if there == run_dir else f"{run_dir}: "
                return f"{inside}{there} is {what}: the run folder cannot be made there (--out)"
            break
    if run_dir.is_dir() and ckpt.latest_checkpoint(run_dir) is not None:
        return holds_checkpoints(run_dir)
    return None


@contextlib.contextmanager
def _each_warning_once():
    """Within: a log message said before (the same level and text) is left out: work repeated to check
    one more thing (a dry run lists the images twice) would say its warnings twice."""
    first: dict[tuple[int, str], logging.LogRecord] = {}

    def first_time(record: logging.LogRecord) -> bool:  # asked by each handler of the same record
        return first.setdefault((record.levelno, record.getMessage()), record) is record

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(first_time)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(first_time)


def _check_the_resume(cfg, kind: str, recipe: Path, out: Path | None) -> None:
    """`--dry-run --resume`: the checks the resumed run makes of its checkpoint before anything else (its
    model, seed and optimizer settings), without taking the run folder."""
    from smapctl.errors import UserError
    from smapctl.recipe import training_run_dir
    from smapctl.train import checkpoint as ckpt
    from smapctl.train.resume import (
        check_resumable,
        nothing_to_resume,
        past_a_damaged,
        resume_command,
        warn_of_changed_settings,
    )

    run_dir = training_run_dir(recipe, out, resume=True)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise UserError(nothing_to_resume(run_dir))
    with past_a_damaged(latest):
        meta = ckpt.load_meta(latest)
    command = resume_command(kind, run_dir)
    check_resumable(cfg, kind, latest, meta, command)
    warn_of_changed_settings(cfg, meta, command)
    if kind == "tokenizer":  # its data too (a generator's tokens are checked as they are made)
        from smapctl.train.tokenizer import check_resumed_data

        check_resumed_data(cfg, latest)
    say(f"resumes from {latest}")


def _check_the_init(cfg, kind: str, init_from: str, weights: str, listed: bool = True) -> None:
    """`--dry-run --init-from`: the checks of the checkpoint the run would start from (its model; a
    generator's tokenizer; a tokenizer's classes, when its images are there: listed, none read)."""
    from smapctl.train import init

    start = init.open_init(init_from, cfg, kind, weights)
    if kind == "generator":
        from smapctl.ops.load import fingerprint
        from smapctl.train import checkpoint as ckpt

        tokenizer = ckpt.resolve_checkpoint(cfg.latents.tokenizer)
        weights = cfg.latents.tokenizer_weights
        init.check_init_tokenizer(start, tokenizer, fingerprint(tokenizer, weights), weights)
    elif listed:
        import torch

        from smapctl.data.datasets import build_datasets
        from smapctl.models.smap import SMAP

        with torch.device("meta"):
            model = SMAP(cfg.model)
        init.fresh_class_keys(start, model, build_datasets(cfg.data, cfg.model.image_size).class_names)
    say(init.describe(start))


def _check_against_its_tokenizer(cfg) -> tuple[str | None, str | None]:
    """`train-generator --dry-run`: the recipe against its tokenizer when that is trained already (the
    real run's first check, so a dry run finds what training would refuse) -> (a note saying it was not
    checked, or None; what training would refuse of latents.dataset's classes or of the number of images
    to tokenize, or None)."""
    from smapctl.data.datasets import missing_images
    from smapctl.errors import UserError
    from smapctl.train import checkpoint as ckpt

    where = Path(cfg.latents.tokenizer)
    try:  # as training finds it: a run folder, its checkpoints/, or a checkpoint (under any name)
        ckpt.resolve_checkpoint(where)
    except UserError:
        return (
            f"note: latents.tokenizer {where} holds no trained tokenizer yet; the recipe is checked against"
            " it once it does"
        ), None
    from smapctl.ops.load import load_tokenizer
    from smapctl.train.generator import SET_WEIGHTS, check_compatible, check_token_classes, images_to_tokenize

    tok = load_tokenizer(where, cfg.latents.tokenizer_weights, weights_hint=SET_WEIGHTS)
    check_compatible(cfg, tok)  # (its images: warned of)
    if missing_images("latents.dataset", cfg.latents.dataset) is None:  # (a missing one: warned of)
        try:  # other classes than the tokenizer's (`--set latents.dataset=photos`): training's next check
            check_token_classes(cfg.latents.dataset, tok)
        except UserError as e:
            return None, str(e)
    dataset, held_out = images_to_tokenize(cfg, tok)
    if held_out == 0 and missing_images("latents.dataset", dataset) is not None:  # (warned of)
        return None, None
    from smapctl.data.datasets import batch_size_problem
    from smapctl.data.latents import token_images

    # Listed, no image read (the tokenizer's folder less its held-out split: refused if it has changed); a
    # batch larger than the images would be refused by training only once it has tokenized them all.
    listed = token_images(tok, dataset, held_out, contents=False)
    return None, batch_size_problem(cfg.train.batch_size, len(listed.data))
