"""`smapctl evaluate --samples / --generator`: how good a generator's samples are, read from a folder or an
`.npz` or drawn now: gFID against a reference set (a folder, a built-in dataset, an ADM `.npz` and its
statistics, or a reference folder too large to hold, streamed through Inception), IS, and the samples'
class accuracy and clf-FD.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from smapctl.data.config import EMBEDDED_DATASETS, DataConfig, embedded_name
from smapctl.data.datasets import deaf_workers
from smapctl.data.images import BadImageError
from smapctl.devices import default_device
from smapctl.errors import UserError
from smapctl.eval.common import (
    EvalOutput,
    Fidelity,
    choose_semantic,
    inception_block,
    on_images,
    refuse_out_in_images,
    report_written,
    semantic_block,
    skip_block,
)
from smapctl.eval.image_sets import (
    FolderImages,
    ImageSet,
    NotHeld,
    OnError,
    check_labels_in_range,
    labelled_by_folder,
    read_image_set,
    source_name,
)
from smapctl.eval.report import METRICS_FILE, PLOT_FILE, write_report
from smapctl.eval.semantic import SemanticReference, SemanticTally
from smapctl.io import loads_json, writing_into
from smapctl.launch import launched_processes, on_the_main_process, process_state
from smapctl.ops.sample import GRID_FILE, NPZ_FILE, SAMPLE_NAME, SETTINGS_FILE, safe_name
from smapctl.progress import progress
from smapctl.train.checkpoint import refuse_output_in_checkpoints, run_of
from smapctl.train.signals import stop_if_unheard

logger = logging.getLogger("smapctl.eval")

DEFAULT_NUM_SAMPLES = 1000


def _streamed_statistics(
    images: FolderImages, *, fidelity: Fidelity, batch_size: int, device, on_error: OnError
) -> ImageSet:
    """A gFID reference folder too large to hold -> its Inception statistics, computed batch by batch as
    its images are read (`Fidelity.statistics`): an ImageSet without images, as an .npz of statistics
    alone, with `fid_stats`, the number of images in `fid_count` and the unreadable files left out in
    `skipped` (or an error at the first, on_error="fail")."""
    device = torch.device(device)
    loader = deaf_workers(  # the main process takes a signal and stops them itself
        DataLoader(
            images,
            batch_size=batch_size,
            num_workers=0 if device.type == "cpu" else min(4, os.cpu_count() or 1),  # Inception is the work
            pin_memory=device.type == "cuda",
        )
    )
    skipped: list[BadImageError] = []
    if images.size is None:
        other = images.first_of_another_size()
        if other is not None:
            raise images.size_error(*other)

    def readable() -> Iterator[torch.Tensor]:  # uint8 (B, 3, H, W), the unreadable files left out
        with progress(len(images), f"Inception statistics of {images.folder.name}", "images") as bar:
            for b, (batch, index, reasons, same) in enumerate(loader):
                if b:  # after the first batch: a SIGTERM lost as the command started stops it here
                    stop_if_unheard()
                for i, reason, fits in zip(index.tolist(), reasons, same.tolist(), strict=True):
                    if not fits:  # (a header that says another size than the image)
                        raise images.size_error(images.path(i), reason)
                    if reason and on_error == "fail":
                        raise BadImageError(images.path(i), reason)
                    if reason:
                        skipped.append(BadImageError(images.path(i), reason))
                if any(reasons):
                    batch = batch[torch.tensor([not r for r in reasons])]
                if len(batch):
                    yield batch
                bar.update(len(index))

    stats, count = fidelity.statistics(readable(), device)
    empty = torch.empty(0, *images.shape, dtype=torch.uint8)
    return ImageSet(empty, None, source_name(images.folder), skipped, fid_stats=stats, fid_count=count)


def score_samples(
    samples: ImageSet,
    reference: ImageSet | None,
    *,
    semantic: SemanticReference | None,
    fidelity: Fidelity | None,
    batch_size: int,
    device: torch.device,
    semantic_reference: ImageSet | None = None,
) -> tuple[dict, dict | None]:
    """Generation metrics of a sample set -> (metrics {"num_samples", "gfid", "is_mean", "is_std",
    "class_acc", "clf_fd"} as available, the semantic block or None). `reference` is for gFID, and for the
    semantic scores unless `semantic_reference` is given (the reference is Inception statistics alone)."""
    metrics: dict = {"num_samples": len(samples.images)}
    block = None
    if semantic is not None:
        samples = labelled_by_folder(samples, semantic.class_names)
        real = reference if semantic_reference is None else semantic_reference
        real = None if real is None else labelled_by_folder(real, semantic.class_names)
        semantic.model.to(device)
        tally = SemanticTally(semantic, device)
        check_labels_in_range(samples, len(semantic.class_names), semantic.source)
        for name, s in (("samples", samples), ("reference", real)):
            for i in range(0, 0 if s is None else len(s.images), batch_size):
                labels = None if s.labels is None else s.labels[i : i + batch_size]
                tally.add(name, s.images[i : i + batch_size], labels)
        accuracy = tally.accuracy("samples")
        if accuracy is not None:  # samples without classes (an .npz without arr_1): only their clf-FD
            metrics["class_acc"] = accuracy
        metrics["clf_fd"] = tally.frechet("samples", "reference")
        shown = None if real is None or real.source is None else on_images(semantic, real.source)
        block = semantic_block(tally, "reference", shown)
    if fidelity is not None:
        ref_images, ref_stats = (None, None) if reference is None else (reference.images, reference.fid_stats)
        scores = fidelity.scores(samples.images, ref_images, batch_size, device, reference_stats=ref_stats)
        metrics.update({("gfid" if key == "fid" else key): v for key, v in scores.items()})
    return metrics, block


def _reference_block(reference: ImageSet | None, gfid: bool) -> dict:
    """metrics.json's account of the reference set: its source, its number of images and what gFID (if
    scored) was computed against: the reference images, an ADM reference batch's own statistics of the
    whole dataset (its `mu` and `sigma`) when it has them, or those of a folder too large to hold."""
    if reference is None:
        return {"reference": None, "num_reference": None, "gfid_against": None}
    against = None
    if gfid:
        against = "images" if reference.fid_stats is None else "mu and sigma of the .npz"
        if reference.fid_count is not None:
            against = "mu and sigma of its images, computed as they were read"
    num = len(reference.images)
    if reference.fid_count is not None:
        num = reference.fid_count  # the images a folder's statistics were computed from
    elif num == 0:
        # An .npz of statistics alone: no images of it are used (the 0 would read as the semantic scores'
        # count, which take --data's images; the semantic block counts those).
        num = None
    return {"reference": reference.source, "num_reference": num, "gfid_against": against}


def evaluate_generation(
    samples: str | os.PathLike | None = None,
    *,
    generator: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    num: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    save_npz: bool = False,
    ref: str | os.PathLike | None = None,
    data: str | None = None,
    fid: bool = False,
    isc: bool = False,
    inception_weights: str | os.PathLike | None = None,
    semantic: bool | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    out: str | os.PathLike | None = None,
    on_error: OnError = "skip",
    device: str | torch.device | None = None,
    ends_command: bool = False,
) -> EvalOutput:
    """gFID / IS / semantic scores of `samples` (a folder from `smapctl sample` or an ADM .npz), or of
    `num` samples drawn now from `generator` (written to <out>/samples; `tokenizer`: where the tokenizer it
    was trained on is now, if it moved, as `smapctl sample --tokenizer`). The reference set is `ref`, else
    `data` (with a generator: by default its tokenizer's training data, e.g. digits:train). Writes
    metrics.json into `out` (default: <generator run>/eval, or ./eval for `samples`). Unreadable files in
    the sample or reference folders are left out and listed in `out`/skipped_images.txt
    (on_error="skip"), or stop the evaluation ("fail"). A reference folder too large for memory gives
    gFID its Inception statistics, computed as it is read, when the semantic scores do not need its
    images (`_references`). Started by a launcher with a `generator` (and `device` None), the processes
    share the drawing, and the others return an `EvalOutput` with `main` False: the main one scores."""
    # Under a launcher (`device` not given) the processes share the drawing as `smapctl sample`'s do; the
    # main one alone holds the folder, trains the classifier and scores. They join first: a problem only
    # one meets before (another node's copy of the generator missing) left the others waiting for it to
    # join, up to the process group's timeout (60 minutes).
    spread = generator is not None and device is None and launched_processes() > 1
    if spread:
        device = process_state().device
    fidelity = Fidelity.request(fid, isc, inception_weights, spread=spread)  # (the main process's)
    plan = _GenerationPlan.of(samples, generator, cfg_scale, out, data, tokenizer)
    out_dir, data, drawn = plan.out_dir, plan.data, plan.path is not None
    # Known before any sample is read or drawn; after the generator is known to be one (otherwise a
    # tokenizer run given as --generator would be told "nothing to score" with --no-semantic, the real error
    # without).
    if semantic is False and fidelity is None:
        raise UserError("nothing to score: with --no-semantic, ask for --fid and/or --is")
    refuse_output_in_checkpoints(out_dir)
    if drawn:  # (read samples add metrics.json alone)
        refuse_out_in_images(out_dir, {"--data": data, "--ref": None if ref is None else str(ref)})
    main = not spread or process_state().is_main_process
    device = torch.device(device) if device is not None else default_device()
    # The output folder is made (or refused) before samples are drawn or read and scored, held while the
    # evaluation writes it (another command at once is refused), removed again if it fails before writing.
    with contextlib.ExitStack() as held:
        if drawn:

            def prepare() -> SemanticReference | None:
                held.enter_context(writing_into(out_dir))
                return _scores_asked(data, plan, semantic, ref, fidelity)

            # (said by every process when they share the drawing; the others get None)
            sem = on_the_main_process(prepare) if spread else prepare()
            sample_set, source = _draw_now(
                plan, num, cfg_scale, seed, save_npz, batch_size, device, tokenizer, fidelity, spread
            )
            if not main:  # another process of a launcher: the main one scores
                return EvalOutput({}, out_dir, [], main=False)
            held.enter_context(_kept_if_interrupted(sample_set))
        else:
            held.enter_context(writing_into(out_dir))
            # Read first: quick, and a wrong --samples is said before a classifier is trained.
            sample_set, source, data = _read_samples(samples, data, fidelity, limit, on_error)
            sem = _scores_asked(data, plan, semantic, ref, fidelity, sample_set)
        h, w = sample_set.images.shape[-2:]
        reference, semantic_reference = _reference_sets(
            ref, data, sem, fidelity, (h, w), limit, on_error, batch_size=batch_size, device=device
        )
        metrics, block = score_samples(
            sample_set, reference, semantic=sem, fidelity=fidelity, batch_size=batch_size, device=device,
            semantic_reference=semantic_reference,
        )  # fmt: skip
        skipped = _all_skipped(sample_set, reference, semantic_reference)
        # The scores are computed: a signal now lets the report be written.
        with report_written(out_dir, ends_command):
            report = _generation_report(
                source, data, reference, metrics, block, limit=limit, size=(h, w), fidelity=fidelity,
                skipped=skipped, out_dir=out_dir,
            )  # fmt: skip
            files = write_report(report, out_dir)
        return EvalOutput(report, out_dir, files, skipped)


def _generation_report(
    source: dict, data, reference, metrics: dict, block, *, limit, size, fidelity, skipped, out_dir
) -> dict:
    """metrics.json of `evaluate_generation`: what was scored against what (`source`: the samples; `data`
    and `reference`: the references), the scores and the semantic `block`."""
    h, w = size
    return {
        "task": "generation",
        **source,
        "data": None if data is None else source_name(data),
        **_reference_block(reference, "gfid" in metrics),
        "limit": limit,  # a fixed random subset of the samples and of the reference (seed 0), or None
        "image_size": int(h) if h == w else [int(h), int(w)],
        "metrics": metrics,
        "semantic": block,
        "inception": inception_block(fidelity),
        "skipped": skip_block(skipped, out_dir),
    }


@contextlib.contextmanager
def _kept_if_interrupted(drawn: ImageSet) -> Iterator[None]:
    """Ctrl-C as `evaluate --generator` scores its samples (minutes) would say nothing: one line that no
    scores are written and where the samples drawn are, complete (unless `report_written` said what it
    left)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not getattr(e, "said", False):
            _say_kept(len(drawn.images), drawn.source)
            e.said = True
        raise


def _say_kept(count: int, folder) -> None:
    logger.warning(
        "interrupted: no scores written; the %d samples drawn are in %s (`smapctl evaluate --samples"
        " %s` scores them)", count, folder, folder,
    )  # fmt: skip


def _scores_asked(data, plan, semantic, ref, fidelity, samples: ImageSet | None = None):
    """The semantic scores' reference (`choose_semantic`: its classifier trained or read), before any
    sample is drawn (minutes); a UserError when nothing at all is asked for."""
    sem = choose_semantic(data, plan.recipe_data, semantic, plan.class_names, samples=samples, reference=ref)
    if sem is None and fidelity is None:
        raise UserError(f"nothing to score: ask for --fid and/or --is; {_data_hint(data)}")
    return sem


def _draw_now(
    plan: _GenerationPlan,
    num,
    cfg_scale,
    seed,
    save_npz,
    batch_size,
    device,
    tokenizer,
    fidelity,
    spread: bool,
) -> tuple[ImageSet, dict]:
    """`evaluate --generator`'s samples, drawn into <out>/samples once their count (`num` rounded up to
    whole classes, said when it is) is known to suit the scores asked for; with `spread`, by the processes
    of a launcher together (the others get no images)."""
    num_classes = len(plan.class_names)
    count = _drawn_count(num, num_classes)
    if count != (num or DEFAULT_NUM_SAMPLES):  # said in --help alone, the 1000 would become 1010 unsaid
        logger.info(
            "drawing %d samples, not %d: %d of each of the %d classes (--num is rounded up to whole classes)",
            count,
            num or DEFAULT_NUM_SAMPLES,
            count // num_classes,
            num_classes,
        )
    if fidelity is not None:
        fidelity.check_count(count, "--num gives")
    return _draw_samples(
        plan.path, plan.out_dir, num, num_classes, cfg_scale, seed, save_npz, batch_size, device, tokenizer,
        spread,
    )  # fmt: skip


def _reference_sets(
    ref, data, sem, fidelity: Fidelity | None, shape, limit, on_error, *, batch_size, device
) -> tuple[ImageSet | None, ImageSet | None]:
    """(the gFID reference, the semantic scores' reference) as `_references` reads them, or (None, None)
    when neither gFID nor the semantic scores are asked for."""
    if not (sem is not None or (fidelity is not None and fidelity.fid)):
        return None, None
    streamed = None  # a reference folder too large to hold gives gFID its Inception statistics
    if fidelity is not None and fidelity.fid:
        streamed = partial(
            _streamed_statistics, fidelity=fidelity, batch_size=batch_size, device=device,
            on_error=on_error,
        )  # fmt: skip
    return _references(ref, data, sem is not None, shape, limit, on_error, streamed)


def _all_skipped(sample_set: ImageSet, *references: ImageSet | None) -> list:
    """The unreadable files of the samples and of the references (one set read for both counted once)."""
    skipped = list(sample_set.skipped)
    for read in {id(r): r for r in references if r is not None}.values():
        skipped += read.skipped
    return skipped


@dataclass
class _GenerationPlan:
    """Where `evaluate_generation`'s samples come from and where its report goes, checked before any
    sample is read or drawn."""

    path: Path | None  # the generator checkpoint that draws the samples; None: samples given
    class_names: list[str] | None  # the generator's classes
    recipe_data: DataConfig | None  # the generator's tokenizer's data section
    out_dir: Path
    data: str | None  # the reference data: given, else (drawing) the tokenizer's training data

    @classmethod
    def of(cls, samples, generator, cfg_scale, out, data, tokenizer=None) -> _GenerationPlan:
        if generator is not None or samples is None:
            path, class_names, recipe_data, token_images = _generator_info(generator, tokenizer)
            _check_sampling(path, cfg_scale)  # before the reference classifier trains (minutes)
            out_dir = Path(out) if out is not None else (run_of(path) or path) / "eval"
            _refuse_run_folder(out_dir)
            _check_generation_out(out_dir)
            return cls(
                path,
                class_names,
                recipe_data,
                out_dir,
                data or _training_data_spec(recipe_data, token_images),
            )
        if embedded_name(str(samples)):
            raise UserError(
                f"--samples {samples}: a built-in dataset has no image size of its own to score it at; "
                "give a folder of images or an .npz (`smapctl sample` writes both)"
            )
        from smapctl.train import checkpoint as ckpt

        if ckpt.is_run_or_checkpoint(Path(samples)):
            # Read as images, a run folder would give "nothing to score" (or its preview grids as samples).
            raise UserError(
                f"--samples {samples}: a training run or checkpoint folder, not sampled images; "
                f"--generator {samples} draws a generator's samples and scores them, `smapctl sample` "
                "writes a folder of them"
            )
        return cls(None, None, None, Path(out) if out is not None else Path("eval"), data)


def _read_samples(
    samples, data: str | None, fidelity: Fidelity | None, limit: int | None, on_error: OnError
) -> tuple[ImageSet, dict, str | None]:
    """`--samples` read -> (the images, metrics.json's record of them, `data`: as given, else the images
    the generator named by their sampling.json imitates, as `evaluate --generator` takes them)."""
    _warn_if_unfinished(Path(samples))
    sample_set = read_image_set(samples, limit=limit, on_error=on_error)
    if len(sample_set.images) == 0:  # an .npz with statistics but no images
        raise UserError(f"--samples {samples}: no images to score")
    if fidelity is not None:
        fidelity.check_count(len(sample_set.images), "the samples are")
    drew = _sampled_with(Path(samples)) or {}
    _name_npz_classes(sample_set, drew)
    # Not its 1000 class names, nor "finished" unless false (scores of an interrupted run's images).
    sampled_with = {k: v for k, v in drew.items() if k != "class_names" and (k, v) != ("finished", True)}
    source = {"samples": source_name(samples), "sampled_with": sampled_with or None}
    if data is None and isinstance(drew.get("generator"), str):  # (--ref: the gFID reference only)
        data = _generator_data(drew["generator"], drew.get("tokenizer"))
        if data is not None:
            logger.info(
                "--data %s: what %s was trained on (from its %s)", data, drew["generator"], SETTINGS_FILE
            )
    return sample_set, source, data


def _data_hint(data: str | None) -> str:
    """What to ask for when `data` gives no semantic scores (and no --fid or --is is asked for)."""
    if data is None:
        return "or name the samples' dataset with --data"
    if embedded_name(str(data)):
        return f"--data {data} gives no semantic scores (one with the model's classes does)"
    return (
        f"--data {data} gives semantic scores with --semantic, which trains a classifier on that folder"
        " (minutes on a CPU)"
    )


def _references(
    ref,
    data: str | None,
    semantic: bool,
    shape: tuple[int, int],
    limit: int | None,
    on_error: OnError,
    too_large: Callable[[FolderImages], ImageSet] | None = None,
) -> tuple[ImageSet | None, ImageSet | None]:
    """(the gFID reference, the semantic scores' reference): `ref`, else `data`, for both; an .npz of
    Inception statistics alone as `ref` leaves the semantic scores `data`'s images. `too_large` takes a
    folder too large to hold (`read_image_set`) when the semantic scores do not need its images (they
    are off, or take `data`'s: the statistics it gives leave them `data`'s, read first); else it is
    refused, as without `too_large`."""
    spec = ref or data
    if spec is None:
        return None, None
    elsewhere = semantic and ref is not None and data is not None  # `data` is there if `ref` has no images
    held: dict[str, ImageSet | None] = {}

    def data_images() -> ImageSet:
        """`data`'s images for the semantic scores; none (an ImageSet of no images and no source, and a
        warning) when they cannot be held (`NotHeld`): gFID need not fail for them."""
        if "data" not in held:
            try:
                held["data"] = _read_reference(data, "--data", shape, limit, on_error)
            except NotHeld as e:
                logger.warning("%s; the semantic scores have no reference images", e)
                held["data"] = ImageSet(torch.empty(0, 3, *shape, dtype=torch.uint8), None, None)
        return held["data"]

    def data_first(images: FolderImages, statistics=too_large) -> ImageSet:
        data_images()  # read (or given up) now, not after hours of Inception
        return statistics(images)

    streamed = too_large
    if too_large is not None and semantic:
        streamed = data_first if elsewhere else None  # else the semantic scores need its images
    try:
        reference = _read_reference(spec, "--ref" if ref else "--data", shape, limit, on_error, streamed)
    except NotHeld as e:
        if too_large is None or streamed is not None:
            raise
        # Held only for the semantic scores: without them it would be streamed.
        raise NotHeld(
            f"{e}; or score --no-semantic (its Inception statistics are then computed as it is read)"
        ) from None
    if elsewhere and len(reference.images) == 0:
        semantic_reference = data_images()
        if semantic_reference.source is not None:
            how = (
                "holds Inception statistics alone" if reference.fid_count is None else "is too large to hold"
            )
            logger.info("--ref %s %s: the semantic scores' reference images are --data %s", ref, how, data)
        return reference, semantic_reference
    return reference, reference


def _read_reference(
    spec: str | os.PathLike,
    option: str,
    shape: tuple[int, int],
    limit: int | None,
    on_error: OnError,
    too_large: Callable[[FolderImages], ImageSet] | None = None,
) -> ImageSet:
    """The reference images (or an .npz's Inception statistics alone) `option` names, for samples of
    `shape` (h, w): resized to their size when square, else of their own size. `too_large`: as in
    `read_image_set`, once the folder's first image has the samples' size."""
    h, w = shape
    if h != w and embedded_name(str(spec)):
        raise NotHeld(
            f"{option} {spec}: a built-in dataset is read at one square size, and the samples are {w}x{h} "
            f"pixels; give a folder or .npz of {w}x{h} images with --ref"
        )

    def checked(images: FolderImages) -> ImageSet:  # before the folder is read through
        _check_reference_size(option, spec, images.shape[-2:], shape)
        return too_large(images)

    reference = read_image_set(
        spec, size=h if h == w else None, limit=limit, on_error=on_error, statistics_alone=True,
        too_large=None if too_large is None else checked,
    )  # fmt: skip
    if len(reference.images):
        _check_reference_size(option, spec, reference.images.shape[-2:], shape)
    return reference


def _check_reference_size(option: str, spec, size: tuple[int, int], shape: tuple[int, int]) -> None:
    """Samples of `shape` (h, w) that are not square are compared with reference images of their own
    `size` (h, w)."""
    (rh, rw), (h, w) = size, shape
    if h != w and (rh, rw) != (h, w):
        raise UserError(
            f"{option} {spec}: its images are {rw}x{rh} pixels and the samples {w}x{h}; samples that are not"
            " square are compared with images of their own size"
        )


def _generator_data(spec: str, tokenizer=None) -> str | None:
    """The images the generator `spec` imitates (`_training_data_spec`), or None when it cannot be
    opened any more (moved, deleted, or its tokenizer gone). `tokenizer`: the one that decoded the
    samples (their sampling.json's), taken when it is still there (the generator's may have moved)."""
    from smapctl.train import checkpoint as ckpt

    if not isinstance(tokenizer, str) or not ckpt.is_complete(tokenizer):
        tokenizer = None
    try:
        _, _, recipe_data, token_images = _generator_info(
            spec, tokenizer, f"the tokenizer of its {SETTINGS_FILE}"
        )
    except UserError as e:  # said, not left at "nothing to score ... name the dataset with --data"
        logger.warning("the samples' generator cannot be opened, so nor can the images it imitates: %s", e)
        return None
    return _training_data_spec(recipe_data, token_images)


def _check_sampling(path: Path, cfg_scale: float | None) -> None:
    """The sampling settings `_draw_samples` will use (the recipe's, `cfg_scale` given), checked as
    `smapctl sample` checks them (`sampling_settings`)."""
    from smapctl.ops.load import checkpoint_recipe
    from smapctl.ops.sample import sampling_settings
    from smapctl.recipe import GeneratorRecipe
    from smapctl.train import checkpoint as ckpt

    recipe = checkpoint_recipe(GeneratorRecipe, path, ckpt.load_meta(path))
    sampling_settings(recipe, {} if cfg_scale is None else {"cfg_scale": cfg_scale})


def _generator_info(
    spec, tokenizer=None, option: str = "--tokenizer"
) -> tuple[Path, list[str], DataConfig, str | None]:
    """A generator checkpoint -> (its folder, class names, its tokenizer's recipe data section, the
    images it was trained on when its recipe named them: latents.dataset); `tokenizer` as
    `its_tokenizer` takes it (given by `option`)."""
    from smapctl.ops.load import checkpoint_recipe, open_checkpoint
    from smapctl.recipe import TokenizerRecipe
    from smapctl.train.generator import its_tokenizer

    path, meta = open_checkpoint(spec, "generator", "--generator")
    tok_path, tok_meta = its_tokenizer(path, meta["tokenizer"], tokenizer, option)
    tok_recipe = checkpoint_recipe(TokenizerRecipe, tok_path, tok_meta)
    latents = (meta.get("recipe") or {}).get("latents") or {}
    return path, list(meta["class_names"]), tok_recipe.data, latents.get("dataset")


def _training_data_spec(cfg: DataConfig, token_images: str | None = None) -> str:
    """The real images a generator imitates: its latents.dataset when its recipe named one, else its
    tokenizer's training data; an embedded dataset's training split (a name alone is its train split
    for the tokens, its held-out split for `read_image_set`), or the folder."""
    spec = token_images or cfg.dataset
    name, _, split = spec.partition(":")
    return f"{name}:{split or 'train'}" if name in EMBEDDED_DATASETS else spec


def _drawn_count(num: int | None, num_classes: int) -> int:
    """How many images `_draw_samples` draws: ceil(num / classes) of every class."""
    return math.ceil((num or DEFAULT_NUM_SAMPLES) / num_classes) * num_classes


def _name_npz_classes(samples: ImageSet, drew: dict) -> None:
    """An .npz's labels (`arr_1`) take their class names from the sampling.json beside it (`smapctl
    sample --npz`), as a folder's file names give them, so that scoring them with another dataset's
    classifier is refused as it is for the folder."""
    names = drew.get("class_names")
    if samples.labels is None or samples.named_classes or not isinstance(names, list):
        return
    for label in torch.unique(samples.labels).tolist():
        if 0 <= label < len(names) and isinstance(names[label], str):
            samples.named_classes[label] = safe_name(names[label])
    samples.named_by = f"the class names in its {SETTINGS_FILE}"


def _sampled_with(samples: Path) -> dict | None:
    """What drew a `smapctl sample` folder's images (or its samples.npz's): its sampling.json (generator,
    seed, batch size, device, guidance and the other settings), or None for other image sets."""
    folder = samples if samples.is_dir() else samples.parent if samples.name == NPZ_FILE else None
    if folder is None or not (folder / SETTINGS_FILE).is_file():
        return None
    try:
        return loads_json((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as e:
        logger.warning(
            "%s: unreadable (%s); metrics.json will not say what drew the samples", folder / SETTINGS_FILE, e
        )
        return None


def _warn_if_unfinished(samples: Path) -> None:
    """A folder of `smapctl sample`'s images without the grid.png it writes last is an interrupted (or
    failed) run's: some classes may be missing, or hold the images of an earlier run."""
    if not samples.is_dir() or (samples / GRID_FILE).exists():
        return
    if any(SAMPLE_NAME.match(p.name) for p in samples.iterdir()):
        logger.warning(
            "%s: holds `smapctl sample` images but no %s, which it writes last: an interrupted run's? "
            "Some classes may be missing, or hold an earlier run's images beside this one's (an interrupted "
            "--overwrite); run that `smapctl sample` (with --overwrite) or `smapctl evaluate "
            "--generator` again",
            samples,
            GRID_FILE,
        )


def _refuse_run_folder(out_dir: Path) -> None:
    """A training run's (or checkpoint's) folder as `evaluate --generator`'s --out is refused before
    anything is written: --out RUN (the generator's own, say) drew into RUN/samples, training's preview
    folder, and left the samples and metrics.json among the run's files (refused only when previews
    happened to be there, as "images that `smapctl evaluate` did not write")."""
    from smapctl.train import checkpoint as ckpt

    if ckpt.is_run_or_checkpoint(out_dir):
        raise UserError(
            f"--out {out_dir}: a training run's folder; the samples `evaluate --generator` draws go into"
            " OUT/samples, where training writes its previews: choose another --out (default: <run>/eval)"
        )


def _check_generation_out(out_dir: Path) -> None:
    """`evaluate --generator` draws into <out_dir>/samples: an --out holding other images is refused (a
    dataset's folder would get a class folder of generated images; a `smapctl sample` folder would hold
    two sampling runs, read together as one). Its own samples/ folder is `sample_images`'s to check."""
    from smapctl.data.images import first_other_image

    def ours(folder: Path, name: str) -> bool:
        if folder == Path("."):  # a tokenizer evaluation's plot, in the same --out
            return name == PLOT_FILE
        return folder == Path("samples") and (name == GRID_FILE or bool(SAMPLE_NAME.match(name)))

    other = first_other_image(out_dir, ours)
    if other is not None:
        raise UserError(
            f"{out_dir}: holds images that `smapctl evaluate` did not write ({other}); the samples it"
            " draws would go into its samples/ folder among them: choose another --out"
        )


def _draw_samples(
    path, out_dir, num, num_classes, cfg_scale, seed, save_npz, batch_size, device, tokenizer, spread
):
    """`smapctl sample` into <out_dir>/samples: ceil(num / classes) images of every class, on `device`
    or (`spread`) shared by the processes of a launcher, this one's on `device`."""
    from smapctl.ops.sample import sample_images

    per_class = _drawn_count(num, num_classes) // num_classes
    result = sample_images(
        path,
        out_dir / "samples",
        per_class=per_class,
        seed=seed,
        batch_size=batch_size,
        npz=save_npz,
        device=None if spread else str(device),  # (None: `sample_images` joins the processes)
        overwrite=True,  # the samples of an earlier run of this evaluation are replaced
        describing=(out_dir / METRICS_FILE,),  # its scores go with them
        again="run the same command again",
        tokenizer=tokenizer,
        ends_command=False,  # the images are scored next: a signal stops the evaluation at once
        cfg_scale=cfg_scale,
        out_named=f"-o {out_dir}",  # (the samples go into its samples/)
    )
    if result.stopped is not None:  # a signal in a launch's last round: every image is written, none scored
        from smapctl.launch import StoppedTogether

        stop = StoppedTogether(int(signal.Signals[result.stopped]))
        if result.main:
            _say_kept(len(result.images), result.out_dir)
        stop.said = True
        raise stop
    source = {
        "generator": str(Path(path).resolve()),
        "samples": str(result.out_dir.resolve()),
        "npz": None if result.npz is None else str(result.npz.resolve()),
        "seed": seed,
        # The noise is drawn per batch (seed and batch number): other batch sizes draw other images.
        "batch_size": batch_size,
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),  # on the CPU, float rounding follows it (README)
        "cfg_scale": result.settings["cfg_scale"],  # the recipe's unless --cfg was given
        "sampling": result.settings,
    }
    return ImageSet(result.images, result.labels, str(result.out_dir)), source
