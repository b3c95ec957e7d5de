"""`smapctl evaluate`: how well a tokenizer reconstructs, and how good a generator's samples are.

Reconstruction (a tokenizer checkpoint): each image is encoded once (eq. 3) and decoded from every
evaluated prefix k of its latents (eq. 4-5; k = 0 is the class embedding alone). Per k: PSNR and SSIM
(`eval/metrics.py`) on the uint8 reconstructions, i.e. on what a saved PNG holds, and on request rFID and
IS with torch-fidelity's Inception v3 against the originals. Generation (a folder or `.npz` of samples, or
a generator sampled now): gFID against a reference set, and IS.

Semantic scores answer section 4.2's question, does the class meaning survive tokenization, with a small
reference classifier that smapctl trains on the dataset's training split (`eval/semantic.py`): accuracy of
the intended class at every prefix, for class-only decoding and for cross-reconstructions (image a decoded
with another class c = (label + 1) mod C: is the output classified as c?), accuracy of samples against the
class they were drawn for, and clf-FD, a Frechet distance in that classifier's feature space, which is not
comparable with Inception FID.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from smapctl.data.config import EMBEDDED_DATASETS, DataConfig, embedded_name, refuse_output_in_images
from smapctl.data.datasets import deaf_workers
from smapctl.data.embedded import embedded_class_names
from smapctl.data.folder import ImageFolderDataset, empty_split_reason, same_classes, shown_classes
from smapctl.data.images import BadImageError, load_image, to_uint8
from smapctl.data.skipped import SKIPPED_FILE, absolute, skip_summary, write_skip_list
from smapctl.devices import default_device
from smapctl.errors import UserError
from smapctl.eval.classifier import to_float_images
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
from smapctl.eval.image_sets import (
    FolderImages,
    ImageSet,
    NotHeld,
    OnError,
    check_labels_in_range,
    check_sample_classes,
    labelled_by_folder,
    limit_indices,
    read_image_set,
    source_name,
)
from smapctl.eval.metrics import SSIM_WINDOW, psnr, ssim
from smapctl.eval.report import METRICS_FILE, PLOT_FILE, write_report
from smapctl.eval.semantic import (
    CLF_FD_NOTE,
    SemanticReference,
    SemanticTally,
    reference_classifier,
    semantic_source,
)
from smapctl.io import file_identity, loads_json, write_error, writing_into
from smapctl.ops.sample import GRID_FILE, NPZ_FILE, SAMPLE_NAME, SETTINGS_FILE, safe_name
from smapctl.progress import progress, tracked
from smapctl.train.checkpoint import refuse_output_in_checkpoints
from smapctl.train.signals import stop_if_unheard

logger = logging.getLogger("smapctl.eval")


DEFAULT_NUM_SAMPLES = 1000


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
    def request(cls, fid: bool, isc: bool, weights: str | os.PathLike | None) -> Fidelity | None:
        """None when neither --fid nor --is was asked for; else a UserError unless the weights are found
        and are torch-fidelity's Inception state dict (checked before any other work)."""
        if not (fid or isc):
            if weights is not None:  # ignored without a word, even a file that is not one
                raise UserError("--inception-weights: only with --fid or --is (nothing else uses Inception)")
            return None
        path = find_inception_weights(weights)
        try:
            check_inception_weights(path)
        except UserError as err:  # which setting gave the file (SMAPCTL_INCEPTION_WEIGHTS went unsaid)
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

    def skip_summary(self) -> str | None:
        """One line: how many images were skipped, the first few, and the list file; None if none."""
        listing = (self.report.get("skipped") or {}).get("list")
        return skip_summary(self.skipped, listing) if self.skipped else None


# ------------------------------------------------------------------------------------------- choosing


def parse_prefixes(spec: str | None, num_tokens: int) -> list[int]:
    """--prefix: comma-separated k, or "all" (every k in 0..K); None: 0, 1, 2, 4, ..., K (as figure 1)."""
    from smapctl.train.tokenizer import preview_prefixes

    if spec is None:
        return preview_prefixes(num_tokens)
    if spec.strip().lower() == "all":
        return list(range(num_tokens + 1))
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts or not all(s.isascii() and s.isdigit() for s in parts):  # int() would take "1_0" and "+1"
        raise UserError(f"--prefix: expected comma-separated integers or 'all', got {spec!r}")
    ks = {int(s) for s in parts}
    bad = sorted(k for k in ks if not 0 <= k <= num_tokens)
    if bad:
        said = ", ".join(map(str, bad))
        raise UserError(
            f"--prefix {said}: out of range; the tokenizer has {num_tokens} tokens (use 0..{num_tokens})"
        )
    return sorted(ks)


def run_folder(checkpoint: Path) -> Path:
    """The run folder of a checkpoint (`<run>/checkpoints/step_N` -> `<run>`); else the folder itself."""
    from smapctl.train.checkpoint import CHECKPOINTS

    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint


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
        # A built-in --ref's labels are its own classes' ids: digit samples with --ref photos:val had the
        # photos' labels scored by the digits classifier (a meaningless reference_acc, without a word).
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


# ------------------------------------------------ image sets too large to hold (the rest: image_sets.py)


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
                    if not fits:  # (a header that said another size than the image)
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


# ------------------------------------------------------------------------------------- reconstruction


class ImageStore:
    """Image sets of a known count N kept in memory-mapped uint8 .npy files under `folder`, so that rFID
    over many prefixes of a large set does not need them all in RAM."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = Path(folder), n
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}

    def append(self, name: str, images: torch.Tensor) -> None:
        """Append uint8 images (B, 3, H, W) to the set `name`."""
        if name not in self.arrays:
            self.arrays[name] = self._allocate(self.folder / f"{name}.npy", (self.n, *images.shape[1:]))
            self.filled[name] = 0
        i = self.filled[name]
        self.arrays[name][i : i + len(images)] = images.cpu().numpy()
        self.filled[name] = i + len(images)

    def tensor(self, name: str) -> torch.Tensor:
        """The set `name` as a uint8 tensor (N, 3, H, W) backed by its file."""
        return torch.from_numpy(self.arrays[name][: self.filled[name]])

    @staticmethod
    def _allocate(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 memory-mapped .npy whose blocks are reserved on the disk now: writing into a mapped
        file on a full disk kills the process with SIGBUS, a full disk here is a one-line error."""
        from smapctl.io import reserve, write_error

        try:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
            with open(path, "r+b") as f:
                reserve(f.fileno(), os.fstat(f.fileno()).st_size, start=array.offset)
        except OSError as e:
            raise write_error(path.parent.parent, e, "the images kept for rFID/IS", kept="") from e
        return array


class EvalImages(Dataset):
    """The images to reconstruct -> (image (3, S, S) in [-1, 1], label, file path or "", why the file is
    unreadable or "").

    Files of an image folder are read here rather than by `ImageFolderDataset`, which puts the next
    readable image in place of an unreadable one (right for training, but an evaluation would count that
    image twice): an unreadable file comes back as a zero image with its reason, for `reconstruct` to
    leave out and count; with on_error="fail" it is an error naming the file."""

    def __init__(self, dataset: Dataset, image_size: int, on_error: OnError = "skip"):
        subset = isinstance(dataset, Subset)
        self.base = dataset.dataset if subset else dataset
        self.indices = list(dataset.indices) if subset else None
        self.size, self.on_error = image_size, on_error

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, j: int):
        i = j if self.indices is None else self.indices[j]
        if not isinstance(self.base, ImageFolderDataset):
            x, y = self.base[i]
            return x, y, "", ""
        path, y = self.base.path(i), int(self.base.labels[i])
        try:
            image = load_image(path)
        except BadImageError as e:
            if self.on_error == "fail":
                raise
            return torch.zeros(3, self.size, self.size), y, str(path), e.reason
        return self.base.transform(image), y, str(path), ""

    @property
    def workers(self) -> int:
        """Image files are decoded in two worker processes; in-memory (embedded) images need none."""
        return min(2, os.cpu_count() or 1) if isinstance(self.base, ImageFolderDataset) else 0


@dataclass
class Reconstruction:
    rows: list[dict]  # one per prefix k: {"k", "psnr", "ssim"}
    num_images: int  # the images evaluated
    skipped: list[BadImageError]  # unreadable files left out


@torch.inference_mode()
def reconstruct(
    tok,
    dataset: EvalImages,
    prefixes: list[int],
    *,
    batch_size: int,
    device: torch.device,
    tally: SemanticTally | None = None,
    store: ImageStore | None = None,
) -> Reconstruction:
    """Encode each image once and decode it from every prefix k in `prefixes`; one row per k with the
    mean PSNR and SSIM (None below 11 px). Feeds `tally` (the classifier's view: originals, "k{k}",
    class only and cross-reconstructions) and `store` (originals and "k{k}" for torch-fidelity).
    Unreadable files (see `EvalImages`) are left out and returned in `skipped`."""
    model = tok.model
    sums = {k: [0.0, 0.0] for k in prefixes}
    with_ssim = model.cfg.image_size >= SSIM_WINDOW
    n, skipped = 0, []
    # The main process takes a signal and stops the workers itself (`deaf_workers`): a Ctrl-C as they
    # started (seconds under `spawn` or `forkserver`) stopped it with torch's traceback.
    loader = deaf_workers(DataLoader(dataset, batch_size=batch_size, num_workers=dataset.workers))
    for i, (x, y, paths, reasons) in enumerate(tracked(loader, len(loader), "reconstructing", "batches")):
        if i:  # after the first batch: a SIGTERM lost as the command started stops it here
            stop_if_unheard()
        if any(reasons):
            skipped += [BadImageError(p, r) for p, r in zip(paths, reasons, strict=True) if r]
            readable = torch.tensor([not r for r in reasons])
            x, y = x[readable], y[readable]
            if not len(y):
                continue
        originals = to_uint8(x)  # (B, 3, H, W)
        x, y = to_float_images(originals).to(device), y.to(device)
        z = model.encode(x, y).z  # (B, K, C)
        _keep("originals", originals, y, tally, store)
        for k in prefixes:
            rec = to_uint8(model.decode(z[:, :k], y))  # (B, 3, H, W); uint8 as a saved PNG
            rec_f = to_float_images(rec)
            sums[k][0] += psnr(rec_f, x, eight_bit=True).sum().item()
            sums[k][1] += ssim(rec_f, x).sum().item() if with_ssim else 0.0
            _keep(f"k{k}", rec, y, tally, store)
        if tally is not None:
            _class_checks(model, z, y, tally, prefixes)
        n += len(y)
    if n == 0:
        example = f" (e.g. {skipped[0]})" if skipped else ""
        raise UserError(f"no images to evaluate: none of the {len(dataset)} could be read{example}")
    rows = [{"k": k, "psnr": p / n, "ssim": s / n if with_ssim else None} for k, (p, s) in sums.items()]
    return Reconstruction(rows, n, skipped)


def _keep(name: str, images: torch.Tensor, labels: torch.Tensor, tally, store) -> None:
    if tally is not None:
        tally.add(name, images, labels)
    if store is not None:
        store.append(name, images)


def _class_checks(model, z: torch.Tensor, y: torch.Tensor, tally: SemanticTally, prefixes: list[int]) -> None:
    """Class only (k = 0) against the true class, and cross-reconstructions: every image decoded with the
    class c = (y + 1) mod C from k = 0 and from all K tokens, scored against c (class-conditional only)."""
    if 0 not in prefixes:
        tally.add("k0", to_uint8(model.decode(z[:, :0], y)), y, keep_features=False)
    if not model.cfg.class_condition:
        return
    c = (y + 1) % model.cfg.num_classes
    for name, k in (("cross_k0", 0), ("cross_kK", z.shape[1])):
        tally.add(name, to_uint8(model.decode(z[:, :k], c)), c, keep_features=False)


def reconstruction_data(
    tok, spec: str | None, limit: int | None, on_error: OnError = "skip"
) -> tuple[EvalImages, str]:
    """The images to reconstruct (`EvalImages`) and how to name them: --data, or the checkpoint's own
    validation data (data.val_dataset, the embedded held-out split, or the held-out split of its training
    folder)."""
    from smapctl.data.datasets import (
        DATA_LISTING,
        build_datasets,
        build_eval_dataset,
        check_split_listing,
        open_val_dataset,
    )
    from smapctl.train import checkpoint as ckpt

    size = tok.model.cfg.image_size
    if spec is not None:
        dataset, label = build_eval_dataset(spec, size, tok.class_names), source_name(spec)
    elif tok.recipe.data.val_dataset is not None:
        # Only the held-out folder: listing the training folder (ImageNet's 1.28M files) served nothing.
        dataset = open_val_dataset(tok.recipe.data, size, tok.class_names)
        label = source_name(tok.recipe.data.val_dataset)
    else:
        cfg = tok.recipe.data
        # Labelled with the tokenizer's classes, not those of the folder as it is now.
        bundle = build_datasets(cfg, size, train_augment=False, class_names=tok.class_names)
        check_split_listing(
            cfg.dataset,
            bundle.listing,
            ckpt.load_meta(tok.path).get(DATA_LISTING),
            f"{tok.path} was trained",
            "pass --data with images it has not seen",
        )
        dataset = bundle.val
        label = source_name(cfg.dataset)  # an embedded dataset's held-out split
        if cfg.dataset not in EMBEDDED_DATASETS:
            label = f"{cfg.dataset} (held-out {cfg.val_fraction:g})"
        if len(dataset) == 0:
            why = "data.val_fraction is 0" if cfg.val_fraction == 0 else empty_split_reason(cfg.val_fraction)
            raise UserError(f"{tok.path}: its recipe holds out no images ({why}); pass --data")
    picked = limit_indices(len(dataset), limit)
    return EvalImages(dataset if picked is None else Subset(dataset, picked), size, on_error), label


def evaluate_tokenizer(
    checkpoint: str | os.PathLike | None = None,
    *,
    data: str | None = None,
    prefix: str | None = None,
    weights: str = "ema",
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
    """Reconstruction metrics of a tokenizer at each prefix; writes metrics.json and, for two or more
    prefixes, rate_quality.png into `out` (default: <run folder>/eval). Unreadable image files are left
    out and listed in `out`/skipped_images.txt (on_error="skip"), or stop the evaluation ("fail")."""
    from smapctl.ops.load import load_tokenizer

    fidelity = Fidelity.request(fid, isc, inception_weights)  # a missing weights file fails before any work
    device = torch.device(device) if device is not None else default_device()
    tok = load_tokenizer(
        checkpoint,
        weights,
        device,
        other_kind=f"; to score its samples: smapctl evaluate --generator {checkpoint}",
    )
    out_dir = Path(out) if out is not None else run_folder(tok.path) / "eval"
    refuse_output_in_checkpoints(out_dir)
    read = tok.recipe.data  # (without --data, its held-out images)
    _refuse_out_in_images(
        out_dir,
        {"--data": data} if data else {"data.dataset": read.dataset, "data.val_dataset": read.val_dataset},
    )
    # Made (or refused) before the data and the reference classifier cost minutes, held while the
    # evaluation writes it (another command at once is refused), removed again if it fails before writing.
    with writing_into(out_dir):
        prefixes = parse_prefixes(prefix, tok.num_tokens)
        dataset, data_label = reconstruction_data(tok, data, limit, on_error)
        if fidelity is not None:
            fidelity.check_count(len(dataset), "the data has")
        ref, tally = _semantic_tally(tok, data, semantic, device)
        recon = _reconstructions_scored(
            tok, dataset, prefixes, out_dir, tally, fidelity, batch_size=batch_size, device=device
        )
        # The scores are computed: a signal now lets the report be written.
        with _report_written(out_dir, ends_command):
            report = _reconstruction_report(
                tok, recon, prefixes, weights=weights, data_label=data_label, limit=limit, tally=tally,
                ref=ref, fidelity=fidelity, out_dir=out_dir, batch_size=batch_size, device=device,
            )  # fmt: skip
            title = f"{Path(tok.path).name} on {data_label} ({recon.num_images} images)"
            files = write_report(report, out_dir, title)
        return EvalOutput(report, out_dir, files, recon.skipped)


def _semantic_tally(tok, data: str | None, semantic: bool | None, device) -> tuple:
    """(the reference classifier of the semantic scores, the tally of its answers), or (None, None)."""
    ref = choose_semantic(data, tok.recipe.data, semantic, tok.class_names, scores_spec=True)
    tally = SemanticTally(ref, device) if ref is not None else None
    if ref is not None:
        ref.model.to(device)
    return ref, tally


def _reconstructions_scored(tok, dataset, prefixes, out_dir: Path, tally, fidelity, *, batch_size, device):
    """`reconstruct` at each prefix, each row with its prefix's scores added; rFID/IS read the
    reconstructions back from a scratch folder inside `out_dir`, removed afterwards."""
    with _scratch(out_dir) as tmp:
        store = ImageStore(tmp, len(dataset)) if fidelity is not None else None
        recon = reconstruct(
            tok, dataset, prefixes, batch_size=batch_size, device=device, tally=tally, store=store
        )
        rows = recon.rows
        # Inception at 299 px is the long part: minutes per prefix for a few thousand images on a CPU.
        for row in tracked(rows, len(rows), "Inception (rFID/IS)", "prefixes", enabled=fidelity is not None):
            row.update(_prefix_scores(row["k"], tally, fidelity, store, batch_size, device))
    return recon


def _reconstruction_report(
    tok,
    recon,
    prefixes,
    *,
    weights,
    data_label,
    limit,
    tally,
    ref,
    fidelity,
    out_dir: Path,
    batch_size,
    device,
) -> dict:
    """metrics.json of `evaluate_tokenizer`: what was evaluated on what, and the scores of each prefix."""
    from smapctl.train import checkpoint as ckpt

    return {
        "task": "reconstruction",
        "checkpoint": str(Path(tok.path).resolve()),
        "step": ckpt.load_meta(tok.path).get("step"),
        "weights": weights,
        "data": data_label,
        "limit": limit,  # a fixed random subset of the data (seed 0), when given
        "num_images": recon.num_images,
        "skipped": _skip_block(recon.skipped, out_dir),
        "image_size": tok.model.cfg.image_size,
        "num_tokens": tok.num_tokens,
        "prefixes": prefixes,
        # Decoding in other batches, or on the CPU with other threads, rounds floats otherwise (README).
        "batch_size": batch_size,
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),
        "rows": recon.rows,
        "semantic": (
            None
            if tally is None
            else _semantic_block(tally, "originals", _on_images(ref, data_label))
            | _class_scores(tally, tok.model.cfg.class_condition)
        ),
        "inception": _inception_block(fidelity),
    }


@contextmanager
def _scratch(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside `out_dir` for the image sets of rFID/IS, removed afterwards."""
    try:
        scratch = tempfile.TemporaryDirectory(dir=out_dir, prefix=".images-")
    except OSError as e:
        raise write_error(out_dir, e, "a temporary folder", kept="") from e
    with scratch as tmp:
        yield Path(tmp)


def _skip_block(skipped: list[BadImageError], out_dir: Path) -> dict | None:
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


def _prefix_scores(k: int, tally, fidelity, store, batch_size: int, device) -> dict:
    """The scores of prefix k that need the whole set: class accuracy and clf-FD, rFID and IS."""
    scores = {}
    if tally is not None:
        scores["class_acc"] = tally.accuracy(f"k{k}")
        scores["clf_fd"] = tally.frechet(f"k{k}", "originals")
    if fidelity is not None:
        # Inception runs on the originals once for all prefixes: their features are kept in the scratch.
        cache = store.folder / "inception-originals"
        inception = fidelity.scores(
            store.tensor(f"k{k}"), store.tensor("originals"), batch_size, device, reference_cache=cache
        )
        scores |= {("rfid" if key == "fid" else key): v for key, v in inception.items()}
    return scores


def _semantic_block(tally: SemanticTally, reference: str, reference_images: str | None) -> dict:
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


def _on_images(semantic: SemanticReference, source: str) -> str:
    """`reference_acc_images`: the images the classifier's accuracy is measured on, saying when it was
    trained on them (then it is a training accuracy)."""
    return source + (
        " (the classifier's training images among them)" if _trained_on(semantic, source) else ""
    )


def _class_scores(tally: SemanticTally, class_condition: bool) -> dict:
    """The class checks of a class-conditional tokenizer (None without a class: its k = 0 decodes
    nothing)."""
    if not class_condition:
        return {"class_only_acc": None, "cross_class_acc": None}
    cross = None
    if "cross_k0" in tally.count:
        cross = {"k0": tally.accuracy("cross_k0"), "kK": tally.accuracy("cross_kK")}
    return {
        "class_only_acc": tally.accuracy("k0"),
        "cross_class_acc": cross,
        "cross_class_rule": "image of class y decoded with c = (y + 1) mod num_classes; acc = P(pred == c)",
    }


def _inception_block(fidelity: Fidelity | None) -> dict | None:
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


# ------------------------------------------------------------------------------------------ generation


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
        shown = None if real is None or real.source is None else _on_images(semantic, real.source)
        block = _semantic_block(tally, "reference", shown)
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
        # An .npz of statistics alone: no images of it were used (the 0 read as the semantic scores' count,
        # which took --data's images; the semantic block counts those).
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
    images (`_references`)."""
    fidelity = Fidelity.request(fid, isc, inception_weights)
    device = torch.device(device) if device is not None else default_device()
    plan = _GenerationPlan.of(samples, generator, cfg_scale, out, data, tokenizer)
    out_dir, data, drawn = plan.out_dir, plan.data, plan.path is not None
    # Known before any sample is read or drawn; after the generator is known to be one (a tokenizer run
    # given as --generator was told "nothing to score" with --no-semantic, the real error without).
    if semantic is False and fidelity is None:
        raise UserError("nothing to score: with --no-semantic, ask for --fid and/or --is")
    refuse_output_in_checkpoints(out_dir)
    if drawn:  # (read samples add metrics.json alone)
        _refuse_out_in_images(out_dir, {"--data": data, "--ref": None if ref is None else str(ref)})
    # Made (or refused) before samples are drawn or read and scored, held while the evaluation writes it
    # (another command at once is refused), removed again if it fails before writing into it.
    with writing_into(out_dir):
        if not drawn:  # read first: quick, and a wrong --samples is said before a classifier is trained
            sample_set, source, data = _read_samples(samples, data, fidelity, limit, on_error)
        # Known before any sample is drawn (minutes).
        sem = choose_semantic(
            data,
            plan.recipe_data,
            semantic,
            plan.class_names,
            samples=None if drawn else sample_set,
            reference=ref,
        )
        if sem is None and fidelity is None:
            raise UserError(f"nothing to score: ask for --fid and/or --is; {_data_hint(data)}")
        if drawn:
            sample_set, source = _draw_now(
                plan, num, cfg_scale, seed, save_npz, batch_size, device, tokenizer, fidelity
            )
        h, w = sample_set.images.shape[-2:]
        reference, semantic_reference = _reference_sets(
            ref, data, sem, fidelity, (h, w), limit, on_error, batch_size=batch_size, device=device
        )
        metrics, block = score_samples(
            sample_set, reference, semantic=sem, fidelity=fidelity, batch_size=batch_size, device=device,
            semantic_reference=semantic_reference,
        )  # fmt: skip
        skipped = _all_skipped(sample_set, reference, semantic_reference)
        with _report_written(
            out_dir, ends_command
        ):  # the scores are computed: a signal now lets it be written
            report = {
                "task": "generation",
                **source,
                "data": None if data is None else source_name(data),
                **_reference_block(reference, "gfid" in metrics),
                "limit": limit,  # a fixed random subset of the samples and of the reference (seed 0), or None
                "image_size": int(h) if h == w else [int(h), int(w)],
                "metrics": metrics,
                "semantic": block,
                "inception": _inception_block(fidelity),
                "skipped": _skip_block(skipped, out_dir),
            }
            files = write_report(report, out_dir)
        return EvalOutput(report, out_dir, files, skipped)


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
) -> tuple[ImageSet, dict]:
    """`evaluate --generator`'s samples, drawn into <out>/samples once their count (`num` rounded up to
    whole classes, said when it is) is known to suit the scores asked for."""
    num_classes = len(plan.class_names)
    count = _drawn_count(num, num_classes)
    if count != (num or DEFAULT_NUM_SAMPLES):  # said in --help alone, the 1000 became 1010 unsaid
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
        plan.path, plan.out_dir, num, num_classes, cfg_scale, seed, save_npz, batch_size, device, tokenizer
    )


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
            out_dir = Path(out) if out is not None else run_folder(path) / "eval"
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
            # Read as images, a run folder gave "nothing to score" (or its preview grids as samples).
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
    refused as before."""
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
    except UserError as e:  # said: it was left at "nothing to score ... name the dataset with --data"
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


def _refuse_out_in_images(out_dir: Path, folders: dict[str, str | None]) -> None:
    """An --out inside an image folder the evaluation reads (option or recipe key -> folder) is refused,
    as a training's run folder is: rate_quality.png, or the samples drawn into OUT/samples, joined its
    images (`--data data/val -o data/val/3/eval`: a plot among the 3s) and changed its image list, which a
    later evaluate and a training's --resume then refuse as a folder changed since."""
    refuse_output_in_images(
        out_dir, folders, "it reads; what evaluate writes would join them: choose another --out"
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


def _draw_samples(path, out_dir, num, num_classes, cfg_scale, seed, save_npz, batch_size, device, tokenizer):
    """`smapctl sample` into <out_dir>/samples: ceil(num / classes) images of every class."""
    from smapctl.ops.sample import sample_images

    per_class = _drawn_count(num, num_classes) // num_classes
    result = sample_images(
        path,
        out_dir / "samples",
        per_class=per_class,
        seed=seed,
        batch_size=batch_size,
        npz=save_npz,
        device=str(device),
        overwrite=True,  # the samples of an earlier run of this evaluation are replaced
        describing=(out_dir / METRICS_FILE,),  # its scores go with them
        again="run the same command again",
        tokenizer=tokenizer,
        ends_command=False,  # the images are scored next: a signal stops the evaluation at once
        cfg_scale=cfg_scale,
    )
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


# ------------------------------------------------------------------------------------------- dispatch


def evaluate_images(
    *,
    checkpoint=None,
    prefix: str | None = None,
    weights: str = "ema",
    samples=None,
    generator=None,
    tokenizer=None,
    num: int | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    save_npz: bool = False,
    ref=None,
    **common,
) -> EvalOutput:
    """`smapctl evaluate`: generation metrics with `samples` or `generator`, else reconstruction metrics
    of the tokenizer `checkpoint`. Options of the other mode are refused (one line each); `common` are the
    keyword arguments of both modes (data, fid, isc, inception_weights, semantic, limit, batch_size, out)."""
    if samples is not None or generator is not None:
        # --weights picks a tokenizer's weights; a generator is sampled with its EMA weights (it was ignored).
        given = {
            "--checkpoint": checkpoint,
            "--prefix": prefix,
            "--weights": None if weights == "ema" else weights,
        }
        if samples is not None:
            given |= {
                "--generator": generator,
                "--tokenizer": tokenizer,
                "--num": num,
                "--cfg": cfg_scale,
                "--seed": seed,
                "--save-npz": save_npz or None,
            }
        clash = next((opt for opt, value in given.items() if value is not None), None)
        if clash is not None:
            mode = "--samples" if samples is not None else "--generator"
            raise UserError(f"{clash}: not with {mode}")
        with _said_if_interrupted(samples is not None):  # drawing samples, `sample_images` says its own
            return evaluate_generation(
                samples,
                generator=generator,
                tokenizer=tokenizer,
                num=num,
                cfg_scale=cfg_scale,
                seed=0 if seed is None else seed,
                save_npz=save_npz,
                ref=ref,
                **common,
            )
    if ref is not None:
        raise UserError("--ref: only with --samples or --generator (generated images)")
    given = {
        "--tokenizer": tokenizer,
        "--num": num,
        "--cfg": cfg_scale,
        "--seed": seed,
        "--save-npz": save_npz or None,
    }
    clash = next((opt for opt, value in given.items() if value is not None), None)
    if clash is not None:  # --samples refuses them too: they are about drawing samples
        # `--tokenizer RUN` alone reads as "evaluate this tokenizer": say which option that is.
        alone = clash == "--tokenizer" and checkpoint is None
        hint = f"; to score a tokenizer's reconstructions: --checkpoint {tokenizer}" if alone else ""
        raise UserError(f"{clash}: only with --generator (samples drawn now){hint}")
    with _said_if_interrupted():
        return evaluate_tokenizer(checkpoint, prefix=prefix, weights=weights, **common)


@contextmanager
def _said_if_interrupted(say: bool = True) -> Iterator[None]:
    """Ctrl-C ended an evaluation without a word: with `say`, one line that no scores were written (unless
    `_report_written` said what it left)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if say and not getattr(e, "said", False):
            logger.warning("interrupted: no scores written (metrics.json is written once all are computed)")
        raise


@contextmanager
def _report_written(out_dir: Path, ends_command: bool = False) -> Iterator[None]:
    """The scores are computed: a SIGINT or SIGTERM while the report is made and written (the list of
    skipped images, metrics.json, the plot: a moment) lets it be written, and the evaluation ends as a
    complete one, saying so (it said "no scores written" and exited 130 / 143 with metrics.json on disk).
    As a signal during a sampling's last round lets it finish. A second signal stops at once (SIGTERM
    ends the process), saying whether this evaluation's metrics.json was written. With `ends_command`
    (`smapctl evaluate`) the evaluation stays complete up to the command's end (`signals.CommandEnd`: a
    signal as its folder was let go exited 130 with the report written)."""
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
