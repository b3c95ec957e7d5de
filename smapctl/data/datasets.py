"""From a `DataConfig` to datasets and data loaders, with a sample order that a resumed run reproduces."""

from __future__ import annotations

import logging
import os
import signal
import threading
import types
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from smapctl.data.config import EMBEDDED_DATASETS, DataConfig, check_embedded_split, embedded_name
from smapctl.data.embedded import TensorImageDataset, load_embedded
from smapctl.data.folder import ImageFolderDataset, class_folders, split_indices
from smapctl.data.images import SampleKey, eval_frame, eval_transform, train_transform
from smapctl.errors import UserError
from smapctl.train.signals import STOPPING

logger = logging.getLogger("smapctl.data")

# The held-out split of a folder without a validation folder; fixed, so every run evaluates the same images.
SPLIT_SEED = 0


@dataclass
class DatasetBundle:
    """Training and held-out datasets. `train` yields (uint8 (3, S, S), int label), to be converted per
    batch on the training device (`to_signed_float`); `val` yields (float32 (3, S, S) in [-1, 1], int
    label). `val` is empty when there is no validation folder and `val_fraction` is 0."""

    train: Dataset
    val: Dataset
    class_names: list[str]
    # A folder split into training and held-out images: `ImageFolderDataset.listing` of the whole folder
    # and the fraction held out (`held_out`), kept in a tokenizer's checkpoints: the split can be made
    # again only from the same images.
    listing: dict | None = None


def build_datasets(
    cfg: DataConfig, image_size: int, train_augment: bool = True, class_names: Sequence[str] | None = None
) -> DatasetBundle:
    """The datasets a recipe's `data:` section describes. The training split gets the appendix-A
    augmentation when `train_augment` (else the eval framing); the held-out split always the eval one.
    `class_names`: a trained model's classes, which a folder's labels then follow (a class folder
    removed since keeps the ids of the others; one added is refused), as they did in its training."""
    val_tf = eval_transform(image_size)
    train_tf = eval_frame(image_size)
    if train_augment:
        train_tf = train_transform(image_size, cfg.crop_scale, cfg.hflip)
    listing = None
    if cfg.dataset in EMBEDDED_DATASETS:
        data = load_embedded(cfg.dataset, image_size)
        train = TensorImageDataset(data.train_images, data.train_labels, data.class_names, train_tf)
        val = TensorImageDataset(data.val_images, data.val_labels, data.class_names, val_tf)
        class_names = data.class_names
    else:
        full = _open_folder("data.dataset", cfg.dataset, class_names, cfg.on_error)
        class_names = full.class_names
        if cfg.val_dataset is None:
            train_idx, val_idx = split_indices(len(full), cfg.val_fraction, SPLIT_SEED, full.labels)
            if val_idx and not train_idx:  # said as "train.batch_size: 2 is larger than ... (0 images)"
                largest = int(np.bincount(full.labels).max())
                raise UserError(
                    f"data.val_fraction: {cfg.val_fraction:g} of each class, rounded, is every image of"
                    f" {cfg.dataset} (no class has more than {largest}): none is left to train on; lower it,"
                    " or give the held-out images a folder of their own (data.val_dataset)"
                )
            train, val = full.subset(train_idx, train_tf), full.subset(val_idx, val_tf)
            listing = full.listing() | {"held_out": cfg.val_fraction}  # also 0: a resume may not add one
        else:
            train = full
            train.transform = train_tf
    if cfg.val_dataset is not None:
        val = open_val_dataset(cfg, image_size, class_names)
    return DatasetBundle(train=train, val=val, class_names=class_names, listing=listing)


def open_val_dataset(cfg: DataConfig, image_size: int, class_names: Sequence[str]) -> ImageFolderDataset:
    """The recipe's `data.val_dataset` folder alone, labelled with `class_names`, eval transform: what
    `build_datasets` holds out, without listing the training folder."""
    val = _open_folder("data.val_dataset", cfg.val_dataset, class_names, cfg.on_error)
    val.transform = eval_transform(image_size)
    return val


# The key of a tokenizer checkpoint's meta.json that holds `DatasetBundle.listing`.
DATA_LISTING = "data_listing"


def check_split_listing(
    folder: str, now: dict | None, then: dict | None, since: str, remedy: str, fraction_remedy: str = ""
) -> None:
    """A UserError when the images of `folder` (`now`, their `listing`) are not those of `then`: the
    held-out split is a function of the whole listing, so one image added or removed moves others across
    it, and images held out then would be trained on (or the other way round). `then` None: recorded
    by an older smapctl (or a run without a held-out split), not checked. `fraction_remedy`, when given,
    replaces `remedy` where the held-out fraction changed (the images may not have); `{then}` in it is
    the fraction recorded then."""
    if then is None or now == then:
        return
    held_then, held_now = then["held_out"], None if now is None else now["held_out"]
    if held_then == 0 and not held_now:
        return  # nothing was held out then, nor is now: no split to move
    if held_now != held_then:
        now_text = "none (data.val_dataset)" if now is None else f"{held_now:g}"
        what = f"its held-out fraction was {held_then:g} when {since}, it is {now_text} now"
        remedy = fraction_remedy.format(then=repr(held_then)) or remedy  # exact: the split compares it
    elif then["images"] == now["images"]:
        what = f"its images changed since {since} ({now['images']} images then and now, not the same files)"
    else:
        what = f"its images changed since {since} ({then['images']} images then, {now['images']} now)"
    raise UserError(
        f"{folder}: {what}, so the images held out of its training can no longer be told apart; {remedy}"
    )


def build_eval_dataset(
    spec: str,
    image_size: int,
    class_names: Sequence[str] | None = None,
    on_error: Literal["skip", "fail"] = "skip",
) -> Dataset:
    """Images to evaluate on, with the eval transform: "digits" / "photos" (their held-out split),
    "digits:train" etc., or a folder in the ImageNet layout (embedded names win; write ./digits for a folder
    of that name). `class_names` (a model's classes) must match the dataset's, so labels mean the same."""
    if embedded_name(spec):
        split = embedded_split(spec, image_size)
        if class_names is not None and list(class_names) != split.class_names:
            raise UserError(
                f"{spec}: its classes {split.class_names} are not the model's {list(class_names)}"
            )
        return TensorImageDataset(split.images, split.labels, split.class_names, eval_transform(image_size))
    folder = _open_folder("", spec, class_names, on_error)
    folder.transform = eval_transform(image_size)
    return folder


@dataclass
class EmbeddedSplit:
    """One split of an embedded dataset, as `embedded_split` names it."""

    name: str  # "digits", "photos"
    split: str  # "train" or "val"
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,), ids into `class_names`
    class_names: list[str]


def embedded_split(spec: str, image_size: int) -> EmbeddedSplit:
    """The split of an embedded dataset that `spec` names ("digits" and "digits:val": the held-out split;
    "digits:train"), its images at `image_size`: what `build_eval_dataset` evaluates on (and `tokenize`
    encodes), before the eval transform."""
    check_embedded_split(spec)
    name, _, split = spec.partition(":")
    data = load_embedded(name, image_size)
    if split == "train":
        return EmbeddedSplit(name, split, data.train_images, data.train_labels, data.class_names)
    return EmbeddedSplit(name, "val", data.val_images, data.val_labels, data.class_names)


def _no_folder(key: str, spec: str) -> str | None:
    """Why the folder `spec` of recipe key `key` cannot be read as a dataset (it is none), or None."""
    if Path(spec).expanduser().is_dir():
        return None
    prefix = f"{key}: " if key else ""
    embedded = ", ".join(EMBEDDED_DATASETS)
    # The paper recipes set data.val_dataset (imagenet/val): holding out a share of one's own folder
    # needs it unset.
    hint = (
        "; --set data.val_dataset=null holds out data.val_fraction of data.dataset instead"
        if key == "data.val_dataset"
        else ""
    )
    return f"{prefix}'{spec}' is neither an embedded dataset ({embedded}) nor a folder{hint}"


def missing_data(cfg: DataConfig) -> list[str]:
    """What training on `cfg` would stop at because a dataset is not there, each (a `--dry-run` reads no
    image, but says this); empty when both are."""
    problems = (
        missing_images("data.dataset", cfg.dataset),
        missing_images("data.val_dataset", cfg.val_dataset),
    )
    return [p for p in problems if p is not None]


def batch_size_problem(batch_size: int, images: int) -> str | None:
    """Why a training set of `images` cannot give batches of `batch_size` (the loader drops the last
    incomplete batch: there would be none); None when it can."""
    if images >= batch_size:
        return None
    return f"train.batch_size: {batch_size} is larger than the training set ({images} images)"


def training_set_problem(cfg: DataConfig, image_size: int, batch_size: int) -> str | None:
    """For `--dry-run`, once `missing_data` found the data there: what training stops at when it lists
    the images (none is read), a training split smaller than a batch or a folder it cannot use."""
    try:
        train = build_datasets(cfg, image_size, train_augment=False).train
    except UserError as e:
        return str(e)
    return batch_size_problem(batch_size, len(train))


def class_count_problem(cfg: DataConfig, num_classes: int, count: int | None = None) -> str | None:
    """Why a model of `num_classes` classes cannot train on `cfg.dataset`: another number of classes
    (`count`, else listed: an embedded dataset's, or a folder's class sub-folders, no image read), or a
    folder not in the ImageNet layout; None when it can, or when the folder is not there
    (`missing_data` says that)."""
    if count is None:
        name = embedded_name(cfg.dataset)
        if name is not None:
            from smapctl.data.embedded import embedded_class_names

            count = len(embedded_class_names(name))
        elif not Path(cfg.dataset).expanduser().is_dir():
            return None
        else:
            try:
                count = len(class_folders(Path(cfg.dataset).expanduser()))
            except UserError as e:
                return f"data.dataset: {e}"
    if count == num_classes:
        return None
    return (
        f"model.num_classes: the recipe says {num_classes} but {cfg.dataset} has {count} classes; set "
        f"--set model.num_classes={count}"
    )


def missing_images(key: str, spec: str | None) -> str | None:
    """Why the dataset `spec` of recipe key `key` (an embedded one, with or without its split, or a
    folder; None: not set) is not there, or None."""
    return None if spec is None or embedded_name(spec) else _no_folder(key, spec)


def _open_folder(key: str, spec: str, class_names, on_error) -> ImageFolderDataset:
    """An ImageFolderDataset without transform; errors start with the recipe key (e.g. data.dataset)."""
    problem = _no_folder(key, spec)
    if problem is not None:
        raise UserError(problem)
    prefix = f"{key}: " if key else ""
    try:
        return ImageFolderDataset(spec, transform=None, on_error=on_error, class_names=class_names)
    except UserError as e:
        raise UserError(f"{prefix}{e}") from None


# ---------------------------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[SampleKey]):
    """A stream of `SampleKey(index, seed)`: epoch 0's order, then epoch 1's, ... (endless when `epochs` is
    None). Each epoch's order and per-sample augmentation seeds are drawn from a generator seeded with
    (seed, epoch) alone, so the stream is a fixed sequence; `start` begins it that many samples in.

    Resuming: a run that has taken `step` optimizer steps with global batch B (per-process batch x
    processes x accumulation steps) has consumed step x B samples, which its checkpoints record
    (`samples` in state.pt); build the loader with start=that and the next batches, their images and
    their augmentations are the ones the interrupted run would have seen, whatever the number of
    workers. Under accelerate, `prepare` wraps the batch sampler in a BatchSamplerShard that gives
    process p batches p, p+P, p+2P, ... of the per-process size b counted from `start`, so each process
    resumes at its own next batch; a resume with another batch size continues the stream where it
    stopped, neither skipping nor repeating samples. The sampler deliberately has no `set_epoch`
    (accelerate would call it with its own epoch counter, 0 after a restart).
    """

    def __init__(
        self, n: int, seed: int = 0, shuffle: bool = True, start: int = 0, epochs: int | None = None
    ):
        if n <= 0 and epochs is None:
            raise UserError("cannot draw training samples from an empty dataset")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.n, self.seed, self.shuffle, self.start, self.epochs = n, seed, shuffle, start, epochs

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (n,), augmentation seeds (n,)) of one epoch; a pure function of (seed, epoch)."""
        mixed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed))
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return order, seeds

    def __iter__(self) -> Iterator[SampleKey]:
        if self.n == 0:
            return
        epoch, offset = divmod(self.start, self.n)
        while self.epochs is None or epoch < self.epochs:
            order, seeds = self.epoch_order(epoch)
            for index, seed in zip(order[offset:].tolist(), seeds[offset:].tolist(), strict=True):
                yield SampleKey(index, seed)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless ResumableSampler has no length")
        return max(0, self.epochs * self.n - self.start)


def _making_iterators(loader: DataLoader):
    """What `loader.__iter__` calls for each new iterator (its `_get_iterator`), held weakly when it is the
    loader's own method: the replacement the loader holds held the loader in turn, a cycle that kept it
    and its dataset (a training's images in memory) after the call until Python's next full collection."""
    start = loader._get_iterator
    if not (isinstance(start, types.MethodType) and start.__self__ is loader):
        return start  # a replacement already (`deaf_workers`'), which holds no loader
    method = weakref.WeakMethod(start)
    return lambda: method()()


def record_iterators(loader, started: list) -> None:
    """Append every iterator `loader` starts to `started`, so the caller can shut its worker processes
    down itself (`shutdown_iterators`).

    Left to the garbage collector, a loader whose worker raised (a bad image with `data.on_error:
    fail`) is freed inside a reference cycle, after multiprocessing has already closed its queues: the
    workers never receive the stop message, torch falls back to SIGTERM, which training's workers
    ignore (`train.runner._worker_init`), and the process hangs at exit instead of reporting the error."""
    start = _making_iterators(loader)

    def recorded():
        iterator = start()
        started.append(iterator)
        return iterator

    loader._get_iterator = recorded


def deaf_workers(loader: DataLoader) -> DataLoader:
    """`loader`, whose forked worker processes start with SIGINT, SIGTERM and SIGHUP blocked (`STOPPING`),
    and keep them so: the main process decides what a signal does and stops its workers itself
    (`shutdown_iterators`), and they exit on their own once it is gone. Otherwise a SIGTERM to the process
    group of `tokenize --workers` (or of a token cache being made), or the SIGHUP of a terminal closed,
    would kill them, and torch would print a traceback as the command stops. The mask is set in the main
    thread while the workers are forked, which copies it; `spawn` (on Linux) copies it to the new
    interpreter, and under `forkserver` (Python 3.14's default on Linux) a worker has the mask of the fork
    server, which the first workers' start starts (`_resource_tracker_running`). Spawned workers also
    ignore them once they import smapctl.cli (`cli.process.a_spawned_worker`; macOS, Windows).
    Nothing changes where there is no `pthread_sigmask` (Windows).

    A signal meanwhile waits until every worker has started (`_held_signals`), and goes to the command's
    handlers then: a mask set in the main thread alone does not hold a signal to the process off them
    (torch's threads take it), and under `spawn` or `forkserver`, where starting the workers takes
    seconds, a Ctrl-C or SIGTERM would otherwise stop the command half way through starting them, with
    torch's traceback from the half-made iterator and the cut-off worker's ("pickle data was truncated")."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return loader
    start = _making_iterators(loader)  # (and their workers)
    owner = weakref.ref(loader)  # (the loader holds this function: weakly, as `_making_iterators` says)

    def started_deaf():
        _resource_tracker_running(owner())
        iterator, held = None, []
        try:
            with _held_signals() as held:
                before = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPPING))
                try:
                    iterator = start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
        finally:  # also when a start failed (a worker the signal ended as it started): the signal first
            try:
                for signum in held:  # now, to the command's own handlers
                    signal.raise_signal(signum)
            except BaseException:
                shutdown = getattr(iterator, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                raise
        return iterator

    loader._get_iterator = started_deaf
    return loader


def _resource_tracker_running(loader: DataLoader) -> None:
    """Start multiprocessing's resource tracker now if the workers will need it (`spawn`, `forkserver`):
    started by the first worker iterator instead, inside `deaf_workers`' blocked mask, it would unblock
    SIGINT and SIGTERM in the main thread as it returns, so the fork server started next, and every worker
    forked from it, would have neither blocked, and a Ctrl-C or SIGTERM as a worker starts would kill it
    (or raise KeyboardInterrupt in it): torch's traceback from the half-made iterator, and the worker's."""
    import multiprocessing
    from multiprocessing import resource_tracker

    context = loader.multiprocessing_context or multiprocessing.get_context()
    if context.get_start_method() != "fork":
        resource_tracker.ensure_running()


@contextmanager
def _held_signals():
    """SIGINT and SIGTERM noted, not handled, inside the block; yields the list of those that came (each
    once), for the caller to raise once its handlers are back. Outside the main thread (where handlers
    cannot be set) nothing is held."""
    held: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python
                previous[signum] = signal.signal(signum, lambda n, _: n in held or held.append(n))
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def shutdown_iterators(started: list) -> None:
    """Stop the worker processes of the iterators `record_iterators` saw (a no-op without workers, and
    for an iterator already shut down)."""
    for iterator in started:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()
    started.clear()


def data_workers(asked: int) -> int:
    """`data.num_workers`, at most the CPUs this process may run on (torch's own limit: the paper recipes'
    8 workers on a 2-core machine drew its multi-line "excessive worker creation might get DataLoader
    running slow or even freeze" warning at each start, and 8 processes decoding images on 2 cores). Said
    once, in one line. The workers change no sample or augmentation, so a run may resume with either."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if asked <= cpus:
        return asked
    if (asked, cpus) not in _SAID_WORKERS:
        _SAID_WORKERS.add((asked, cpus))
        logger.info(
            "data.num_workers %d: more than the %d CPU%s this process may use; %d workers",
            asked, cpus, "" if cpus == 1 else "s", cpus,
        )  # fmt: skip
    return cpus


_SAID_WORKERS: set[tuple[int, int]] = set()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    start: int = 0,
    endless: bool = False,
) -> DataLoader:
    """A DataLoader over `ResumableSampler(len(dataset), seed, shuffle, start)`: one pass, or an endless
    stream for training (iterate it for max_steps; `len()` is undefined). `start` is in samples, see
    `ResumableSampler` for how a resumed run computes it."""
    sampler = ResumableSampler(len(dataset), seed, shuffle, start, epochs=None if endless else 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
