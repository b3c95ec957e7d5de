"""What both modes of `smapctl evaluate` share: the Inception weights and what torch-fidelity computes
with them (`Fidelity`), the reference classifier of the semantic scores (`choose_semantic`), the result
(`EvalOutput`), the report's blocks that both write (skipped images, semantic and Inception settings) and
the guard that lets a computed report be written (`report_written`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smapctl.data.config import EMBEDDED_DATASETS, DataConfig, embedded_name, refuse_output_in_images
from smapctl.data.embedded import embedded_class_names
from smapctl.data.folder import same_classes, shown_classes
from smapctl.data.images import BadImageError
from smapctl.data.skipped import SKIPPED_FILE, absolute, skip_summary, write_skip_list
from smapctl.errors import UserError
from smapctl.eval.fidelity import (
    INCEPTION_SHA256_PREFIX,
    INCEPTION_WEIGHTS_FILE,
    ISC_SPLITS,
    FidStatistics,
    check_inception_weights,
    check_set_size,
    fidelity_metrics,
    file_sha256,
    find_inception_weights,
    inception_weights_origin,
    streamed_fid_statistics,
)
from smapctl.eval.image_sets import ImageSet, check_sample_classes
from smapctl.eval.report import METRICS_FILE, PLOT_FILE
from smapctl.eval.semantic import (
    CLF_FD_NOTE,
    SemanticReference,
    SemanticTally,
    reference_classifier,
    semantic_source,
)
from smapctl.io import file_identity

logger = logging.getLogger("smapctl.eval")


def _current_gpu(device):
    """torch-fidelity puts Inception and the images on the current GPU (`.cuda()`): make that `device`
    (`cuda:1` from the Python API; the CLI's `cuda` is the first visible one). Nothing on the CPU."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@dataclass
class Fidelity:
    """What torch-fidelity computes, with the Inception weights file (looked up before any other work)."""

    fid: bool
    isc: bool
    weights: Path
    weights_sha256: str  # in metrics.json: which Inception file made the numbers (checked by shape only)

    @classmethod
    def request(
        cls, fid: bool, isc: bool, weights: str | os.PathLike | None, *, spread: bool = False
    ) -> Fidelity | None:
        """None when neither --fid nor --is was asked for; else a UserError unless the weights are found
        and are torch-fidelity's Inception state dict (checked before any other work). With `spread` (the
        joined processes of a launcher, whose main one alone scores) the main process alone reads them
        (other nodes need no copy; each process read 92 MB and built Inception), the others getting its
        `Fidelity`, its error as theirs (`launch.on_the_main_process`)."""
        if spread:
            from smapctl.launch import on_the_main_process

            return on_the_main_process(lambda: cls.request(fid, isc, weights), share=lambda found: found)
        if not (fid or isc):
            if weights is not None:  # it would be ignored without a word, even a file that is not one
                raise UserError("--inception-weights: only with --fid or --is (nothing else uses Inception)")
            return None
        path = find_inception_weights(weights)
        try:
            check_inception_weights(path)
        except UserError as err:  # which setting gave the file (SMAPCTL_INCEPTION_WEIGHTS would go unsaid)
            raise UserError(f"{inception_weights_origin(weights)}: {err}") from None
        made = cls(fid, isc, path, file_sha256(path))
        if not made.published:  # right shapes, other values (an untrained network scores every set alike)
            logger.warning(
                "%s: not the published Inception weights (%s, whose sha256 begins %s): the scores are not"
                " comparable with published ones",
                path, INCEPTION_WEIGHTS_FILE, INCEPTION_SHA256_PREFIX,
            )  # fmt: skip
        return made

    @property
    def published(self) -> bool:
        """Whether the weights are the file torch-fidelity publishes (by its sha256)."""
        return self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX)

    def scores(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | None,
        batch_size: int,
        device,
        reference_cache: Path | None = None,
        reference_stats: FidStatistics | None = None,
    ) -> dict:
        """{"fid", "is_mean", "is_std"} (as requested) of uint8 images (N, 3, H, W) against `reference`,
        or against `reference_stats` when given; `reference_cache` keeps the reference's Inception
        features between calls (`fidelity_metrics`)."""
        if self.fid and reference is None and reference_stats is None:
            raise UserError("--fid needs a reference set: pass --ref DIR_OR_NPZ (or --data DATASET)")
        with _current_gpu(device):
            return fidelity_metrics(
                images,
                reference if self.fid else None,
                self.fid,
                self.isc,
                self.weights,
                batch_size=batch_size,
                cuda=torch.device(device).type == "cuda",
                reference_cache=reference_cache,
                reference_stats=reference_stats if self.fid else None,
            )

    def statistics(self, batches: Iterable[torch.Tensor], device) -> tuple[FidStatistics, int]:
        """The Inception statistics of uint8 image batches (B, 3, H, W) computed as they come, and their
        number (`streamed_fid_statistics`): a reference too large to hold."""
        with _current_gpu(device):
            return streamed_fid_statistics(batches, self.weights, cuda=torch.device(device).type == "cuda")

    def check_count(self, n: int, what: str) -> None:
        """The number of images torch-fidelity needs, checked before they are drawn or reconstructed
        (minutes of work); a warning when the Inception Score of so few means little."""
        check_set_size(n, fid=self.fid, isc=self.isc, what=what)
        if self.isc and n < 50 * ISC_SPLITS:
            logger.warning(
                "Inception Score of %d images: %d per split, and a split's score cannot exceed its size; "
                "published scores use 50,000 images",
                n, n // ISC_SPLITS,
            )  # fmt: skip


@dataclass
class EvalOutput:
    report: dict  # what metrics.json holds
    out_dir: Path
    files: list[Path]  # metrics.json, then the plot when there is one
    skipped: list[BadImageError] = field(default_factory=list)  # unreadable images left out
    # False in the processes of a launcher other than the main one, which drew their share of the samples
    # of `evaluate --generator` and left the scoring to it (nothing else set)
    main: bool = True

    def skip_summary(self) -> str | None:
        """One line: how many images were skipped, the first few, and the list file; None if none."""
        listing = (self.report.get("skipped") or {}).get("list")
        return skip_summary(self.skipped, listing) if self.skipped else None


def choose_semantic(
    spec: str | None,
    recipe_data: DataConfig | None,
    flag: bool | None,
    class_names: list[str] | None,
    scores_spec: bool = False,
    samples: ImageSet | None = None,
    reference: str | os.PathLike | None = None,
) -> SemanticReference | None:
    """The reference classifier that scores this evaluation (see `semantic_source`), or None. `flag` is
    --semantic (True), --no-semantic (False) or neither (None: on for the embedded datasets). Its classes
    must be the model's, and those of `reference` (--ref, whose images the semantic scores take as the
    real ones) when that is a built-in dataset: otherwise an error with --semantic, else a warning and
    no semantic scores. The classes `samples`' file names give (a `smapctl sample` folder) must be its
    own: otherwise an error, before the classifier is trained."""
    if flag is False:
        return None
    source = semantic_source(spec, recipe_data, forced=flag is True, scores_spec=scores_spec)
    if source is None:
        if flag:
            raise UserError("--semantic: name the dataset the images belong to with --data (e.g. digits)")
        return None

    def check(names: list[str], shown: str) -> None:  # before the classifier is trained (minutes)
        if class_names is not None and not same_classes(names, list(class_names)):
            message = (
                f"the reference classifier's classes ({shown}: {shown_classes(names, 5)}) are not the"
                f" model's ({shown_classes(list(class_names), 5)})"
            )
            if flag:
                raise UserError(f"--semantic: {message}")
            raise _OtherClasses(message)
        if samples is not None:
            check_sample_classes(samples, names, shown)
        # A built-in --ref's labels are its own classes' ids: otherwise digit samples with --ref photos:val
        # would have the photos' labels scored by the digits classifier (a meaningless reference_acc, without
        # a word).
        other = None if reference is None else embedded_name(str(reference))
        if other is not None and not same_classes(embedded_class_names(other), names):
            message = (
                f"--ref {reference}: its classes ({shown_classes(embedded_class_names(other), 5)}) are not"
                f" the reference classifier's ({shown}: {shown_classes(names, 5)})"
            )
            if flag:
                raise UserError(f"--semantic: {message}")
            raise _OtherClasses(message)

    try:
        return reference_classifier(source, check=check)
    except _OtherClasses as e:
        logger.warning("%s; no semantic scores", e)
        return None


class _OtherClasses(Exception):
    """`choose_semantic`: the classifier's classes are not the model's (said, and no semantic scores),
    known before it is trained: `evaluate --generator` of digits with --data photos trained the photos
    classifier for minutes first."""


def skip_block(skipped: list[BadImageError], out_dir: Path) -> dict | None:
    """metrics.json's account of the unreadable images left out, written to out_dir/skipped_images.txt
    (a list left there by an earlier evaluation is removed when none were skipped). The images are named
    by their absolute paths, as the inputs are."""
    skipped = absolute(skipped)
    listing = write_skip_list(skipped, out_dir / SKIPPED_FILE)
    if listing is None:
        return None
    # Absolute, as metrics.json records its inputs: the file is read from elsewhere later.
    listing = os.path.abspath(listing)
    return {"count": len(skipped), "list": listing, "first": [str(e) for e in skipped[:3]]}


def semantic_block(tally: SemanticTally, reference: str, reference_images: str | None) -> dict:
    """`reference_images` names the real images `reference_acc` is measured on: a held-out split, or
    (a generator's default reference) the training split, on which the classifier was trained too;
    `num_reference_images` counts them (not always `num_reference`'s: beside a --ref of Inception
    statistics alone they are --data's)."""
    ref = tally.ref
    return {
        "classifier_data": ref.source,
        "classifier_image_size": ref.model.image_size,
        "classifier_classes": len(ref.class_names),
        "reference_acc": tally.accuracy(reference),
        "reference_acc_images": reference_images,
        "num_reference_images": tally.feature_count(reference),
        "clf_fd_note": CLF_FD_NOTE,
    }


def _trained_on(semantic: SemanticReference, source: str) -> bool:
    """Whether the reference classifier was trained on (some of) the images `source` names (`source_name`):
    a generator's default reference, or `--data digits:train`, the training split of its data."""
    name, _, split = source.partition(":")
    if name in EMBEDDED_DATASETS:
        return name == semantic.source and split == "train"
    return Path(source).expanduser().resolve() == Path(semantic.source)


def on_images(semantic: SemanticReference, source: str) -> str:
    """`reference_acc_images`: the images the classifier's accuracy is measured on, saying when it was
    trained on them (then it is a training accuracy)."""
    return source + (
        " (the classifier's training images among them)" if _trained_on(semantic, source) else ""
    )


def inception_block(fidelity: Fidelity | None) -> dict | None:
    if fidelity is None:
        return None
    from smapctl.eval.fidelity import FEATURE_EXTRACTOR

    return {
        "weights": str(fidelity.weights.resolve()),
        "weights_sha256": fidelity.weights_sha256,
        "published_weights": fidelity.published,
        "feature_extractor": FEATURE_EXTRACTOR,
        "is_splits": ISC_SPLITS,
    }


def refuse_out_in_images(out_dir: Path, folders: dict[str, str | None]) -> None:
    """An --out inside an image folder the evaluation reads (option or recipe key -> folder) is refused,
    as a training's run folder is: rate_quality.png, or the samples drawn into OUT/samples, joined its
    images (`--data data/val -o data/val/3/eval`: a plot among the 3s) and changed its image list, which a
    later evaluate and a training's --resume then refuse as a folder changed since."""
    refuse_output_in_images(
        out_dir, folders, "it reads; what evaluate writes would join them: choose another --out"
    )


@contextmanager
def report_written(out_dir: Path, ends_command: bool = False) -> Iterator[None]:
    """The scores are computed: a SIGINT or SIGTERM while the report is made and written (the list of
    skipped images, metrics.json, the plot: a moment) lets it be written, and the evaluation ends as a
    complete one, saying so (not "no scores written" and an exit 130 / 143 with metrics.json on disk).
    As a signal during a sampling's last round lets it finish. A second signal stops at once (SIGTERM
    ends the process), saying whether this evaluation's metrics.json was written. With `ends_command`
    (`smapctl evaluate`) the evaluation stays complete up to the command's end (`signals.CommandEnd`:
    otherwise a signal as its folder is let go would exit 130 with the report written)."""
    from smapctl.train.signals import completing

    metrics = out_dir / METRICS_FILE
    earlier = file_identity(metrics)
    complete = f"the report is written to {out_dir}; the evaluation is complete"
    try:
        with completing(complete if ends_command else None) as stop:
            yield
    except KeyboardInterrupt as e:
        if file_identity(metrics) != earlier:
            left = f"{metrics} holds the scores, without {PLOT_FILE}"
        else:
            left = "no scores written" + (f"; the earlier {metrics} is as it was" if earlier else "")
        # (not `requested`: a KeyboardInterrupt raised otherwise, where signals cannot be caught)
        said = f"{stop.signal_name} again: stopped at once" if stop.requested else "interrupted"
        logger.warning("%s; %s", said, left)
        e.said = True
        raise
    said = stop.unsaid()
    if said is not None:
        logger.warning("%s after the scores were computed: %s", said, complete)
