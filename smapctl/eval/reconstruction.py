"""`smapctl evaluate --checkpoint`: how well a tokenizer reconstructs. Each image is encoded once (eq. 3)
and decoded from every evaluated prefix k of its latents (eq. 4-5; k = 0 is the class embedding alone).
Per k: PSNR and SSIM (`eval/metrics.py`) on the uint8 reconstructions, i.e. on what a saved PNG holds; on
request rFID and IS against the originals, and the semantic scores (class-only and cross-class decoding
classified by the reference classifier).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from smapctl.data.config import EMBEDDED_DATASETS
from smapctl.data.datasets import deaf_workers, shutdown_iterators
from smapctl.data.folder import ImageFolderDataset, empty_split_reason
from smapctl.data.images import BadImageError, load_image, to_signed_float, to_uint8
from smapctl.devices import default_device
from smapctl.errors import UserError, agreed
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
from smapctl.eval.image_sets import OnError, limit_indices, source_name
from smapctl.eval.metrics import SSIM_WINDOW, psnr, ssim
from smapctl.eval.report import write_report
from smapctl.eval.semantic import SemanticTally
from smapctl.io import write_error, writing_into
from smapctl.launch import (
    RoundStops,
    StoppedTogether,
    check_same_checkpoints,
    check_same_images,
    gather_rows,
    launched_processes,
    on_the_main_process,
    process_state,
)
from smapctl.models.smap import SMAPConfig
from smapctl.progress import progress, tracked
from smapctl.train.checkpoint import refuse_output_in_checkpoints, run_of

logger = logging.getLogger("smapctl.eval")


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
    leave out and count, or with on_error="fail" to stop at, naming the file."""

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


@dataclass
class Spread:
    """This process's place among the processes of a launcher that share `reconstruct`'s batches, and
    the image sets the main process keeps of each batch (`image_sets`: its scores need them)."""

    rank: int
    world: int
    sets: list[str]


def image_sets(prefixes: list[int], *, kept: bool, checks: bool, class_condition: bool) -> list[str]:
    """The uint8 image sets `reconstruct` makes of each batch for the scores that need the images: with
    `kept` (rFID/IS, or the classifier's) the originals and each prefix's reconstructions ("k{k}"), with
    `checks` (the classifier's) the class checks: class only ("k0") and cross-class ("cross_k0",
    "cross_kK"; class-conditional tokenizers only)."""
    sets = ["originals", *(f"k{k}" for k in prefixes)] if kept else []
    if checks:
        sets += [] if 0 in prefixes else ["k0"]
        sets += ["cross_k0", "cross_kK"] if class_condition else []
    return sets


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
    spread: Spread | None = None,
) -> Reconstruction:
    """Encode each image once and decode it from every prefix k in `prefixes`; one row per k with the
    mean PSNR and SSIM (None below 11 px). Feeds `tally` (the classifier's view: originals, "k{k}",
    class only and cross-reconstructions) and `store` (originals and "k{k}" for torch-fidelity).
    Unreadable files (see `EvalImages`) are left out and returned in `skipped`, or stop it (on_error
    "fail").

    `spread` (under a launcher): batches are made as one process makes them, and process p reconstructs
    batches p, p + P, ..., in rounds of one batch per process; each round is gathered, and every process
    counts the images and PSNR and SSIM sums in batch order, as one process does; the main one alone
    (with `tally` and `store`) keeps the image sets. A signal stops every process after the same round."""
    from accelerate.utils import gather_object

    model = tok.model
    with_ssim = model.cfg.image_size >= SSIM_WINDOW
    if spread is None:
        kept, cc = tally is not None or store is not None, model.cfg.class_condition
        sets = image_sets(prefixes, kept=kept, checks=tally is not None, class_condition=cc)
        spread = Spread(0, 1, sets)
    rank, world, sets = spread.rank, spread.world, spread.sets
    batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
    # The main process takes a signal and stops the workers itself (`deaf_workers`): otherwise a Ctrl-C as
    # they start (seconds under `spawn` or `forkserver`) would stop it with torch's traceback.
    loader = iter(
        deaf_workers(DataLoader(dataset, batch_sampler=batches[rank::world], num_workers=dataset.workers))
    )
    counted = _Counted(prefixes)
    none = _no_rows(len(prefixes), model.cfg.image_size, len(sets), device)
    try:
        with (
            progress(len(batches), "reconstructing", "batches", enabled=rank == 0) as bar,
            RoundStops(world, device) as rounds,  # a signal stops every process after the same round
        ):
            for first in range(0, len(batches), world):
                unread, rows = _batch_rows(model, next(loader, None), none, prefixes, sets, device, with_ssim)
                unreadable = [unread] if world == 1 else gather_object([unread])  # in process order
                scores = gather_rows(rows[:3], batch_size, world)
                images = _gathered_sets(rows[3:], batch_size, world, keep=rank == 0)
                for unread_p, scores_p, images_p in zip(unreadable, scores, images, strict=True):
                    if unread_p and dataset.on_error == "fail":
                        raise _stopped_at(*unread_p[0], world)
                    counted.skipped += [BadImageError(p, r) for p, r in unread_p]
                    if len(y_p := scores_p[0]):
                        counted.add(*scores_p)
                        _keep(sets, images_p, y_p, prefixes, model.cfg, tally, store)
                bar.update(len(batches[first : first + world]))
                rounds.round_done(last=first + world >= len(batches))
        if rounds.signal_name is not None:  # in the last round: the scores (minutes) are not computed
            raise StoppedTogether(int(signal.Signals[rounds.signal_name]))
    except KeyboardInterrupt as e:
        if rank != 0:  # (the main process says it)
            e.said = True
        raise
    finally:
        # Its worker processes end now, not with the traceback that holds the iterator: a process's
        # batches read to their last one but not past it (every image of a folder unreadable) would leave
        # them waiting for more, and a launched process, collecting that traceback as it exits, would wait
        # for them for ever (they take no SIGTERM: `deaf_workers`).
        shutdown_iterators([loader])
    return counted.reconstruction(with_ssim, len(dataset), world)


class _Counted:
    """The images `reconstruct` has scored and skipped so far, and the PSNR and SSIM sums of each prefix,
    added in batch order as one process adds them."""

    def __init__(self, prefixes: list[int]):
        self.prefixes = prefixes
        self.sums = {k: [0.0, 0.0] for k in prefixes}
        self.n = 0
        self.skipped: list[BadImageError] = []

    def add(self, y: torch.Tensor, psnr: torch.Tensor, ssim: torch.Tensor) -> None:
        """A batch's labels (B,) and PSNR and SSIM (B, P) of each prefix."""
        for j, k in enumerate(self.prefixes):  # (each column alone: summed as one process sums it)
            self.sums[k][0] += psnr[:, j].contiguous().sum().item()
            self.sums[k][1] += ssim[:, j].contiguous().sum().item()
        self.n += len(y)

    def reconstruction(self, with_ssim: bool, total: int, world: int) -> Reconstruction:
        """The rows, one per prefix k with the mean PSNR and SSIM (None `with_ssim` False), of the `total`
        images; none of them readable is an error (under a launcher, every process's alike)."""
        n, skipped = self.n, self.skipped
        if n == 0:
            example = f" (e.g. {skipped[0]})" if skipped else ""
            error = UserError(f"no images to evaluate: none of the {total} could be read{example}")
            raise error if world == 1 else agreed(error)
        rows = [
            {"k": k, "psnr": p / n, "ssim": s / n if with_ssim else None} for k, (p, s) in self.sums.items()
        ]
        return Reconstruction(rows, n, skipped)


def _no_rows(prefixes: int, size: int, sets: int, device) -> tuple[torch.Tensor, ...]:
    """What a process sends of a round without a batch, or without a readable image in it: `_reconstructed`'s
    rows, none of them."""
    scores = torch.zeros(0, prefixes, dtype=torch.float64, device=device)
    images = (torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device) for _ in range(sets))
    return torch.zeros(0, dtype=torch.long, device=device), scores, scores, *images


def _batch_rows(model, batch, none: tuple, prefixes, sets, device, with_ssim) -> tuple[list, tuple]:
    """A batch of `EvalImages` (or None: no batch this round) -> (its unreadable files as (path, reason),
    the rows of `_reconstructed` of its readable images, or `none`)."""
    if batch is None:
        return [], none
    x, y, paths, reasons = batch
    unread = [(p, r) for p, r in zip(paths, reasons, strict=True) if r]
    if unread:
        readable = torch.tensor([not r for r in reasons])
        x, y = x[readable], y[readable]
    if not len(y):
        return unread, none
    return unread, _reconstructed(model, x, y, prefixes, sets, device, with_ssim)


def _gathered_sets(sets: tuple, batch_size: int, world: int, keep: bool) -> list[list[torch.Tensor]]:
    """Each process's image sets of a round (uint8 (B, 3, S, S) each), in process order: gathered one set
    at a time and, under a launcher, kept in the main process's memory (`keep`), not on its device, so a
    device holds the processes' copies of one set at a time (of a batch of 64 at 256 px: 12 MB each); the
    other processes keep none (empty lists)."""
    if world == 1:
        return [list(sets)]
    kept = [[] for _ in range(world)]
    for images in sets:
        for p, (t,) in enumerate(gather_rows((images,), batch_size, world)):
            if keep:
                kept[p].append(t.cpu())
    return kept


def _stopped_at(path: str, reason: str, world: int) -> BadImageError:
    """The error at the first unreadable image (on_error "fail"); under a launcher every process raises
    it after the same round, and the main process prints it."""
    error = BadImageError(path, reason)
    if world > 1:
        error.same_in_every_process = True
        agreed(error)
    return error


def _reconstructed(model, x: torch.Tensor, y: torch.Tensor, prefixes, sets, device, with_ssim) -> tuple:
    """A batch's readable images (float (B, 3, S, S) in [-1, 1]) and labels (B,) -> (labels, PSNR (B, P)
    and SSIM (B, P) of each prefix (zeros without SSIM), *the uint8 image sets `sets`), on `device`."""
    originals = to_uint8(x)  # (B, 3, H, W)
    x, y = to_signed_float(originals).to(device), y.to(device)
    z = model.encode(x, y).z  # (B, K, C)
    images = {"originals": originals.to(device)}
    psnrs, ssims = [], []
    for k in prefixes:
        rec = to_uint8(model.decode(z[:, :k], y))  # (B, 3, H, W); uint8 as a saved PNG
        rec_f = to_signed_float(rec)
        psnrs.append(psnr(rec_f, x, eight_bit=True))
        ssims.append(ssim(rec_f, x) if with_ssim else torch.zeros_like(psnrs[-1]))
        images[f"k{k}"] = rec
    # The class checks: class only (k = 0) against the true class, and cross-reconstructions, every image
    # decoded with the class c = (y + 1) mod C from k = 0 and from all K tokens, to be classified as c.
    c = (y + 1) % model.cfg.num_classes
    checks = {"k0": (0, y), "cross_k0": (0, c), "cross_kK": (z.shape[1], c)}
    for name in sets:
        if name not in images:
            k, classes = checks[name]
            images[name] = to_uint8(model.decode(z[:, :k], classes))
    return y, torch.stack(psnrs, 1), torch.stack(ssims, 1), *(images[name] for name in sets)


def _keep(sets, images, y, prefixes, cfg: SMAPConfig, tally, store) -> None:
    """A batch's image sets (`image_sets`) to the classifier's `tally` (each scored against its target
    class: the cross-class ones against c = (y + 1) mod C; the features of the originals and of each
    prefix kept for clf-FD) and to the `store` of torch-fidelity (the originals and each prefix's)."""
    if tally is None and store is None:  # (another process of a launcher: the main one keeps them)
        return
    c = (y + 1) % cfg.num_classes if cfg.class_condition else None
    for name, batch in zip(sets, images, strict=True):
        scored = name == "originals" or (name.startswith("k") and int(name[1:]) in prefixes)
        if tally is not None:
            tally.add(name, batch, c if name.startswith("cross_") else y, keep_features=scored)
        if store is not None and scored:
            store.append(name, batch)


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
    out and listed in `out`/skipped_images.txt (on_error="skip"), or stop the evaluation ("fail").
    Started by a launcher (and `device` None), the processes share the reconstruction (`reconstruct`), and
    the others return an `EvalOutput` with `main` False: the main one alone holds `out`, trains the
    reference classifier, reads the Inception weights and scores."""
    from smapctl.ops.load import load_tokenizer

    # Joined first: a problem one process meets alone (its node's copy of the tokenizer missing) left the
    # others waiting for it to join, up to the process group's timeout (as `evaluate_generation` says).
    spread = device is None and launched_processes() > 1
    if spread:
        device = process_state().device
    # A missing weights file fails before any work (under a launcher, the main process's alone).
    fidelity = Fidelity.request(fid, isc, inception_weights, spread=spread)
    device = torch.device(device) if device is not None else default_device()
    tok = load_tokenizer(
        checkpoint,
        weights,
        device,
        other_kind=f"; to score its samples: smapctl evaluate --generator {checkpoint}",
    )
    if spread:  # (each node's copy of it must be the same)
        check_same_checkpoints({"tokenizer": (tok.path, tok.fingerprint)})
    out_dir = Path(out) if out is not None else (run_of(tok.path) or tok.path) / "eval"
    refuse_output_in_checkpoints(out_dir)
    read = tok.recipe.data  # (without --data, its held-out images)
    refuse_out_in_images(
        out_dir,
        {"--data": data} if data else {"data.dataset": read.dataset, "data.val_dataset": read.val_dataset},
    )
    images = functools.partial(_eval_images, tok, prefix, data, limit, on_error)
    with contextlib.ExitStack() as held:

        def prepare() -> _Prepared:
            # Made (or refused) before the data and the reference classifier cost minutes, held while the
            # evaluation writes it (another command at once is refused), removed again if it fails before
            # writing.
            held.enter_context(writing_into(out_dir))
            prefixes, dataset, data_label = images()
            if fidelity is not None:
                fidelity.check_count(len(dataset), "the data has")
            return _Prepared(prefixes, dataset, data_label, *_semantic_tally(tok, data, semantic, device))

        at = dict(batch_size=batch_size, device=device)
        if not spread:
            ready = prepare()
            recon = _reconstructions_scored(
                tok, ready.dataset, ready.prefixes, out_dir, ready.tally, fidelity, **at
            )
        elif (scored := _scored_together(tok, prepare, images, out_dir, fidelity, **at)) is not None:
            ready, recon = scored
        else:  # another process of a launcher: it reconstructed its share
            return EvalOutput({}, out_dir, [], main=False)
        # The scores are computed: a signal now lets the report be written.
        with report_written(out_dir, ends_command):
            report = _reconstruction_report(
                tok, recon, ready, weights=weights, limit=limit, fidelity=fidelity, out_dir=out_dir,
                batch_size=batch_size, device=device,
            )  # fmt: skip
            title = f"{Path(tok.path).name} on {ready.data_label} ({recon.num_images} images)"
            files = write_report(report, out_dir, title)
        return EvalOutput(report, out_dir, files, recon.skipped)


@dataclass
class _Prepared:
    """What the main process readies before `evaluate_tokenizer` reconstructs: the prefixes, the images
    and their name, and the reference classifier of the semantic scores with the tally of its answers
    (None, None without them)."""

    prefixes: list[int]
    dataset: EvalImages
    data_label: str
    ref: object | None
    tally: SemanticTally | None


def _eval_images(
    tok, prefix: str | None, data: str | None, limit, on_error
) -> tuple[list[int], EvalImages, str]:
    """--prefix and --data of `evaluate_tokenizer` -> (the prefixes, the images, their name)."""
    return parse_prefixes(prefix, tok.num_tokens), *reconstruction_data(tok, data, limit, on_error)


def _scored_together(
    tok, prepare, images, out_dir, fidelity, *, batch_size, device
) -> tuple[_Prepared, Reconstruction] | None:
    """`evaluate_tokenizer` under a launcher: the main process alone runs `prepare` (its refusal is every
    process's), then every process reconstructs its share of the batches (`reconstruct`) -> in the main
    process the `_Prepared` and the `Reconstruction`, in the others None. `images`: the prefixes and
    images, which the others read themselves."""

    def wanted(p: _Prepared) -> tuple[bool, bool]:
        """The image sets the main process keeps, which the others learn (`image_sets`'s kept: rFID/IS or
        the classifier's; checks: the classifier's)."""
        return fidelity is not None or p.tally is not None, p.tally is not None

    state = process_state()
    prepared = on_the_main_process(prepare, share=wanted)
    if state.is_main_process:
        (kept, checks), prefixes, dataset = wanted(prepared), prepared.prefixes, prepared.dataset
    else:
        (kept, checks), (prefixes, dataset, _) = prepared, images()
    check_same_images(dataset.base, "images")
    sets = image_sets(prefixes, kept=kept, checks=checks, class_condition=tok.model.cfg.class_condition)
    share = Spread(state.process_index, state.num_processes, sets)
    if not state.is_main_process:
        reconstruct(tok, dataset, prefixes, batch_size=batch_size, device=device, spread=share)
        return None
    recon = _reconstructions_scored(
        tok, dataset, prefixes, out_dir, prepared.tally, fidelity, batch_size=batch_size, device=device,
        spread=share,
    )  # fmt: skip
    return prepared, recon


def _semantic_tally(tok, data: str | None, semantic: bool | None, device) -> tuple:
    """(the reference classifier of the semantic scores, the tally of its answers), or (None, None)."""
    ref = choose_semantic(data, tok.recipe.data, semantic, tok.class_names, scores_spec=True)
    tally = SemanticTally(ref, device) if ref is not None else None
    if ref is not None:
        ref.model.to(device)
    return ref, tally


def _reconstructions_scored(
    tok, dataset, prefixes, out_dir: Path, tally, fidelity, *, batch_size, device, spread=None
):
    """`reconstruct` at each prefix (`spread`: with the other processes of a launcher), each row with its
    prefix's scores added; rFID/IS read the reconstructions back from a scratch folder inside `out_dir`,
    removed afterwards."""
    with _scratch(out_dir) as tmp:
        store = ImageStore(tmp, len(dataset)) if fidelity is not None else None
        recon = reconstruct(
            tok, dataset, prefixes, batch_size=batch_size, device=device, tally=tally, store=store,
            spread=spread,
        )  # fmt: skip
        rows = recon.rows
        # Inception at 299 px is the long part: minutes per prefix for a few thousand images on a CPU.
        for row in tracked(rows, len(rows), "Inception (rFID/IS)", "prefixes", enabled=fidelity is not None):
            row.update(_prefix_scores(row["k"], tally, fidelity, store, batch_size, device))
    return recon


def _reconstruction_report(
    tok, recon, ready: _Prepared, *, weights, limit, fidelity, out_dir: Path, batch_size, device
) -> dict:
    """metrics.json of `evaluate_tokenizer`: what was evaluated on what, and the scores of each prefix."""
    from smapctl.train import checkpoint as ckpt

    tally = ready.tally

    return {
        "task": "reconstruction",
        "checkpoint": str(Path(tok.path).resolve()),
        "step": ckpt.load_meta(tok.path).get("step"),
        "weights": weights,
        "data": ready.data_label,
        "limit": limit,  # a fixed random subset of the data (seed 0), when given
        "num_images": recon.num_images,
        "skipped": skip_block(recon.skipped, out_dir),
        "image_size": tok.model.cfg.image_size,
        "num_tokens": tok.num_tokens,
        "prefixes": ready.prefixes,
        # Decoding in other batches, or on the CPU with other threads, rounds floats otherwise (README).
        "batch_size": batch_size,
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),
        "rows": recon.rows,
        "semantic": (
            None
            if tally is None
            else semantic_block(tally, "originals", on_images(ready.ref, ready.data_label))
            | _class_scores(tally, tok.model.cfg.class_condition)
        ),
        "inception": inception_block(fidelity),
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
