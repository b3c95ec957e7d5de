"""Tokens of a dataset under one tokenizer, computed once and cached (generator training input).

Appendix A trains the generators on SMAP's tokens; like MAR we tokenize the training images once at the
evaluation crop, plus their horizontal flips (MAR's augmentation; appendix A names flips for the tokenizer),
and cache the result keyed by the tokenizer's fingerprint, so a cache made by another tokenizer is never
reused. SMAP-KL's tokens are its posterior means (the tokenizer in eval mode, as `tokenize` writes them);
MAR caches its posterior and samples it at each step (recipes/README.md). Continuous latents are normalised
per channel with statistics of the cache; the statistics travel in the generator checkpoint, so sampling
undoes exactly this normalisation. A cache's rows are made in its file itself, through a memory map
(`_CacheFile`), and its batches are kept beside it as it is built (`cache_parts`,
`smapctl.ops.token_parts.PartFolder`), so a run stopped half-way goes on from them.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, default_collate

from smapctl.data.config import EMBEDDED_DATASETS, embedded_name
from smapctl.data.images import unpack_key
from smapctl.errors import UserError, agreed, describe, escape_surrogates
from smapctl.io import ensure_dir, remove_orphans, utf8_path
from smapctl.launch import gather_rows
from smapctl.ops.token_parts import PartFolder

logger = logging.getLogger("smapctl.data")

CACHE_VERSION = 2  # 2: the dataset is part of the name and the metadata


@dataclass
class LatentCache:
    tokens: torch.Tensor  # (N, K, C) float32 latents, or (N, K) int64 indices for VQ
    labels: torch.Tensor  # (N,) int64
    fingerprint: str  # the tokenizer's
    dataset: str = ""  # `dataset_key` of the images: an embedded split or a folder (and its split)
    images: str = ""  # a folder's: the sha256 of `ImageFolderDataset.listing(contents=True)`

    @property
    def discrete(self) -> bool:
        return not self.tokens.is_floating_point()


@dataclass
class LatentStats:
    """Per-channel mean and std of continuous latents: x_norm = (x - mean) / std."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    @classmethod
    def of(cls, tokens: torch.Tensor, chunk: int = 1 << 20) -> LatentStats:
        """Statistics of tokens (..., C), accumulated in float64 over chunks of rows: an ImageNet cache
        (2.6M x 128 x 16) would need 40 GB as one float64 copy."""
        flat = tokens.reshape(-1, tokens.shape[-1])  # (N, C)
        n = flat.shape[0]
        mean = sum(part.double().sum(0) for part in flat.split(chunk)) / n
        var = sum((part.double() - mean).square().sum(0) for part in flat.split(chunk)) / max(n - 1, 1)
        return cls(mean.float(), var.sqrt().clamp_min(1e-6).float())

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., C) -> per channel zero mean, unit std (what the generator models)."""
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """`normalize`'s inverse: the generator's tokens (..., C) -> the tokenizer's latents."""
        return z * self.std.to(z) + self.mean.to(z)

    def to_meta(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_meta(cls, d: dict) -> LatentStats:
        return cls(torch.tensor(d["mean"]), torch.tensor(d["std"]))


class LatentDataset(Dataset):
    """(tokens[i], labels[i]) pairs, continuous tokens normalised with `stats` item by item (no second
    copy of the cache); accepts the `SampleKey`s of the training sampler."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, stats: LatentStats | None = None):
        self.tokens, self.labels, self.stats = tokens, labels, stats

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, _ = unpack_key(key)
        tokens = self.tokens[index]
        return (tokens if self.stats is None else self.stats.normalize(tokens)), self.labels[index]


def dataset_key(dataset: str, held_out: float = 0.0) -> str:
    """What a cache is the tokens of: an embedded split (`digits:train`; the train split by default, as
    generators train on it) or a folder's absolute path (so that `data/train` means one folder whatever
    the working directory), followed by the fraction left out when it is the training split of a
    tokenizer's folder (`held_out`, its data.val_fraction: see `tokenizer_training_data`)."""
    name, _, split = dataset.partition(":")
    if name in EMBEDDED_DATASETS:
        return f"{name}:{split or 'train'}"
    folder = str(Path(dataset).expanduser().resolve())
    return f"{folder} without its held-out {held_out:g}" if held_out > 0 else folder


def tokenizer_training_data(data_cfg) -> tuple[str, float]:
    """The images a tokenizer trained on, as (dataset, held_out) for `load_or_build_latents`: a folder
    without a data.val_dataset gave its held-out fraction to validation (`build_datasets`), so the
    generator's tokens must leave those images out too, or its samples are scored against images the
    pipeline has trained on."""
    folder_split = data_cfg.val_dataset is None and data_cfg.dataset not in EMBEDDED_DATASETS
    return data_cfg.dataset, data_cfg.val_fraction if folder_split else 0.0


def cache_path(fingerprint: str, dataset: str, hflip: bool, held_out: float = 0.0) -> Path:
    """cache/latents/<tokenizer fingerprint>-<readable tail of the dataset>-<its hash>-<flip>.safetensors"""
    from smapctl.data.embedded import cache_dir

    key = dataset_key(dataset, held_out)
    safe = "".join(c if c.isalnum() else "_" for c in key)[-40:]
    # (a folder's name that is not UTF-8: hashed as its own bytes, which `surrogateescape` gives back)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    flip = "flip" if hflip else "noflip"
    return cache_dir() / "latents" / f"{fingerprint}-{safe}-{digest}-{flip}.safetensors"


def load_or_build_latents(
    tokenizer,
    dataset: str,
    hflip: bool,
    batch_size: int,
    device,
    held_out: float = 0.0,
    resumed_images: str | None = None,
    processes=None,
) -> LatentCache:
    """The cached tokens of `dataset` (an embedded name or a folder, without its held-out fraction
    `held_out`) under `tokenizer` (`LoadedTokenizer`); built when absent. A cache written by another
    tokenizer, or of other images, is refused. A folder's cache is made again when its images have
    changed (added, removed, renamed or rewritten: a `stat` of each file tells), with a warning.
    `resumed_images`: the digest of the images a resumed run was trained on ("" when it recorded none);
    a cache of other images is then made again only when the folder holds those images (another run's
    cache of a changed folder, the folder since restored), else the change is a UserError (a resumed run
    must go on with its tokens).

    `processes`: the Accelerator of a launched run. Each node's main process checks its cache; when one
    must be made, every process encodes its share of the batches and the node's main process writes
    them all (the others read the file); of nodes whose cache folder is one shared file system, the first
    node's alone (`_first_to_write_its_folder`). All processes stay in step batch by batch, so none waits
    at a barrier while another tokenizes a whole dataset (longer than a process group's timeout)."""
    path = cache_path(tokenizer.fingerprint, dataset, hflip, held_out)
    skipped = path.with_name(f"{path.name}.skipped.txt")
    checks = processes is None or processes.is_local_main_process
    alone = processes is None or processes.num_processes == 1
    cache, source, problem = None, None, None
    if checks:
        cache, source, problem = _checked_cache(path, tokenizer, dataset, held_out, resumed_images, alone)
    writes = checks and cache is None and problem is None
    needed = writes if alone else _agreed_need(writes, problem)
    if alone:
        processes = None
    elif needed:
        writes = _first_to_write_its_folder(path, writes, processes)
    if needed:
        _build_cache(
            path, writes, tokenizer, dataset, hflip, batch_size, device, skipped, held_out, source, processes
        )
    if not alone:
        processes.wait_for_everyone()
    return cache if cache is not None else read_latents(path)


def _checked_cache(path: Path, tokenizer, dataset: str, held_out: float, resumed_images, alone: bool):
    """(the usable cache or None, the images to tokenize when listed on the way, the problem found or
    None): a problem is raised at once by a process alone, else said by every process once gathered."""
    cache, source = None, None
    try:
        # Made first: the list of skipped images goes beside the cache (appended to as images are
        # met, before the cache is written), and would be lost in a cache folder that does not exist yet.
        try:
            ensure_dir(path.parent, "the token cache folder")
        except UserError as e:  # (a home folder not writable: the default cache is under it)
            raise UserError(f"{e}; SMAPCTL_CACHE sets where the caches go") from None
        cache, source = _usable_cache(path, tokenizer, dataset, held_out, resumed_images)
        if cache is not None:
            _drop_stale_parts(path)
            # A run killed while it made the cache and started again once another run of its sweep has
            # made it only reads the cache: its temp file (the cache's size; 21 GB for ImageNet) would
            # otherwise stay for good, no write into the folder coming to remove it.
            remove_orphans(path.parent)
    except UserError as e:
        if alone:
            raise
        return cache, source, str(e)  # said by every process below: the others would wait at the gather
    return cache, source, None


def _agreed_need(writes: bool, problem: str | None) -> bool:
    """Whether any process of a launch must write its node's cache (then all of them encode); a problem
    any process found is raised in every one of them."""
    from accelerate.utils import gather_object

    told = gather_object([(writes, problem)])  # every process's, on every process
    problems = [p for _, p in told if p is not None]
    if problems:
        raise agreed(UserError(problems[0]))
    return any(w for w, _ in told)


def _first_to_write_its_folder(path: Path, writes: bool, processes) -> bool:
    """Whether this process writes the cache at `path` (and keeps its parts), of those of a launch that
    would (`writes`: a node's main process without a usable cache). Nodes that see one cache folder (a
    file system they share) leave it to the first of them: otherwise every node's main process would write
    the one cache, and the second to claim its parts would keep none, so every node would go on from batch
    0 (the parts kept encoded again). Each would-be writer leaves a marker in the folder and looks for those
    of the processes before it; where nothing is shared each node writes its own."""
    import uuid

    from accelerate.utils import gather_object

    marker = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.node") if writes else None
    try:
        if marker is not None:
            marker.touch()
    except OSError:  # (the folder cannot be written: the cache's own write says so)
        marker = None
    names = gather_object([None if marker is None else marker.name])  # by process index
    # A new name is looked up on the file server itself (no cached entry for it on this node).
    seen = any(
        name is not None and (path.parent / name).exists() for name in names[: processes.process_index]
    )
    processes.wait_for_everyone()  # every writer has looked before any marker goes
    if marker is not None:
        marker.unlink(missing_ok=True)
    return writes and not seen


def _build_cache(
    path: Path,
    writes: bool,
    tokenizer,
    dataset,
    hflip,
    batch_size,
    device,
    skipped,
    held_out,
    source,
    processes,
) -> None:
    """Encode the images (every process its share), and (`writes`) write the cache at `path`, its rows
    straight into its file (`_CacheFile`), keeping the work in parts beside it as it goes. The encoded
    copy is let go on return: the cache is read back, mapped from the file."""
    if source is None:
        source = token_images(tokenizer, dataset, held_out, contents=writes)
    meta = _cache_meta(tokenizer.fingerprint, dataset_key(dataset, held_out), source.images)
    out = _CacheFile(path, meta) if writes else None
    # Its work is kept beside the cache as it goes; the list of the images it skips is cleared when it
    # starts afresh (`_agreed_start`, before any process starts appending to it).
    parts = cache_parts(path, source.images, batch_size) if writes else None
    claimed = parts is None or _claimed(parts)
    if claimed is False:  # two runs of a sweep building one cache at once
        logger.info("%s: another process is making this cache too; this one keeps no parts", path)
    if not claimed:
        parts = None
    try:
        what = (tokenizer, dataset, hflip, batch_size, device, skipped, held_out, source, processes)
        made = encode_dataset(*what, fresh=False, parts=parts, keeps=writes, out=out)
        if out is not None:
            out.write(made, parts)
    finally:
        if out is not None:
            out.close()
        if parts is not None:
            parts.release()


def _usable_cache(
    path: Path, tokenizer, dataset: str, held_out: float, resumed_images: str | None
) -> tuple[LatentCache | None, TokenImages | None]:
    """(the cache at `path`, None) when it can be used as it is, else (None, the images to tokenize when
    they were listed on the way)."""
    key = dataset_key(dataset, held_out)
    if not path.is_file():
        return None, None
    try:
        cache = read_latents(path)
    except UnusableCache as e:  # a cache: it was the user's to delete, for the same tokens again
        logger.warning("%s: tokenizing the images again", e.why)
        return None, None
    if cache.fingerprint != tokenizer.fingerprint:
        raise UserError(f"{path}: made by another tokenizer ({cache.fingerprint}); delete it to rebuild")
    if cache.dataset != escape_surrogates(key):
        raise UserError(f"{path}: the tokens of {cache.dataset}, not {key}; delete it")
    if embedded_name(dataset):
        return cache, None
    if not cache.images:  # reused as it was then: rebuilding an ImageNet cache takes hours
        token_images(tokenizer, dataset, held_out, contents=False)  # the split still checked
        logger.warning(
            "%s: made before token caches recorded their images, so a change to %s since then goes"
            " unnoticed; delete it to tokenize them again",
            path,
            key,
        )
        return cache, None
    source = token_images(tokenizer, dataset, held_out)
    if cache.images == source.images:
        return cache, None
    if resumed_images is not None and source.images != resumed_images:
        raise UserError(
            f"--resume: the images of {key} changed since the run's tokens were cached, and the run"
            " must go on with the tokens it started on; restore them (with their modification times,"
            " as `cp -p` copies them: the check reads each file's size and time), or start a new run"
            " with another --out"
        )
    logger.warning("the images of %s changed since their tokens were cached: tokenizing them again", key)
    return None, source


@torch.no_grad()
def encode_dataset(
    tokenizer,
    dataset: str,
    hflip: bool,
    batch_size: int,
    device,
    skip_list: Path | None = None,
    held_out: float = 0.0,
    source: TokenImages | None = None,
    processes=None,
    fresh: bool = True,
    parts: PartFolder | None = None,
    keeps: bool | None = None,
    out: _CacheFile | None = None,
) -> LatentCache | None:
    """Tokenize the training split of `dataset` (and its mirror images) with the tokenizer in eval mode:
    an embedded dataset's train split (unless named), or a folder without the fraction `held_out` that
    `build_datasets` holds out of it (the same images, as both split with `split_indices`).

    Tokens are in loader order, batch by batch: [batch 0, its mirror images, batch 1, ...]. An unreadable
    file of a folder is replaced by the next readable one (as in training), listed in `skip_list` (a
    `fresh` one: an earlier list is cleared first) and counted in one warning at the end (with the
    tokenizer's data.on_error: fail, it stops there instead). `source`: the `token_images`, when already
    listed. `processes` (an Accelerator): process p encodes batches p, p + P, ...; they are gathered
    after each round, and every node's main process returns all of them in the same order as one process
    would (the others return None); `keeps` False: this process returns None too (it writes no cache).
    `parts` (`cache_parts`, on a process that writes the cache): the work is kept there about once a
    minute and when the run stops, and a run with the same plan goes on from the batches the parts of
    every process that keeps the rows hold. `out` (`_CacheFile`, with `keeps`): where the rows are made
    (else in memory)."""
    from smapctl.data.skipped import attach_skip_log

    key = dataset_key(dataset, held_out)
    source = source or token_images(tokenizer, dataset, held_out)
    data = source.data
    skips = attach_skip_log([data], skip_list, fresh=fresh) if skip_list is not None else None
    if keeps is None:
        keeps = processes is None or processes.is_local_main_process
    if processes is not None and processes.num_processes > 1:
        from smapctl.launch import check_same_checkpoints, check_same_images

        check_same_checkpoints({"tokenizer": (tokenizer.path, tokenizer.fingerprint)})
        check_same_images(data, f"images to cache the tokens of in {key}")
    batches, first = _plan_batches(len(data), batch_size, hflip, parts, keeps, skips, processes)
    what = (tokenizer, data, batches, first, hflip, batch_size, device, parts, keeps, processes, out)
    rows = _encode_rounds(*what)
    if not keeps:
        return None
    return _finish_cache(rows, skips, tokenizer, key, source)


def _plan_batches(n: int, batch_size: int, hflip: bool, parts, keeps: bool, skips, processes):
    """(the batches of `n` images, the first to encode: those before it are read back from the parts)."""
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    views = 2 if hflip else 1

    def rows_of(start: int, end: int) -> int:
        return sum(map(len, batches[start:end])) * views

    first = _agreed_start(parts, keeps, skips, processes, rows_of)  # done before: read back from the parts
    return batches, first


def _encode_rounds(
    tokenizer, data, batches, first: int, hflip: bool, batch_size: int, device, parts, keeps, processes, out
) -> _CacheRows:
    """This process encodes its batches from `first` on (p, p + P, ...), a round of one batch per process
    at a time; the processes that keep the rows gather every round's into them."""
    from smapctl.data.datasets import data_workers, deaf_workers, shutdown_iterators
    from smapctl.launch import RoundStops
    from smapctl.progress import progress

    P, rank = (processes.num_processes, processes.process_index) if processes is not None else (1, 0)
    views = 2 if hflip else 1
    mine = batches[first:][rank::P]
    # Decoding a folder of JPEGs is the slow part: use the workers the tokenizer's recipe asks for.
    workers = data_workers(tokenizer.recipe.data.num_workers)
    loader = iter(deaf_workers(DataLoader(data, batch_sampler=mine, num_workers=workers)))  # (signals: ours)
    model = tokenizer.model.to(device)

    def encode(images: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, views, K[, C]) of the images and their mirror images, labels (B,)."""
        images, y = images.to(device), y.to(device)
        outs = [model.encode(view, y) for view in ([images, images.flip(-1)] if hflip else [images])]
        return torch.stack([o.indices if o.indices is not None else o.z.float() for o in outs], 1), y

    rows = _CacheRows(len(data) * views, parts, first, out)
    blank = None
    initial = sum(map(len, batches[:first]))
    try:
        with (
            progress(len(data), "caching the tokens", "images", enabled=keeps, initial=initial) as bar,
            RoundStops(P, device) as rounds,
        ):
            for r in range(-(-(len(batches) - first) // P)):  # rounds of one batch per process
                batch = next(loader, None)
                if batch is not None:
                    t, y = encode(*batch)
                    blank = t[:0], y[:0]
                else:  # its batches are done: it sends none (shapes from one image if it had none)
                    blank = blank or tuple(x[:0] for x in encode(*default_collate([data[0]])))
                    t, y = blank
                for t_p, y_p in gather_rows((t, y), batch_size, P):
                    if keeps:
                        rows.add(t_p, y_p)
                        bar.update(len(t_p))
                rows.round_done(min(first + (r + 1) * P, len(batches)))
                # A signal stops every process after the same round, the last one too: the training it
                # was asked to stop would start next (the parts hold every round; a resume writes them).
                rounds.round_done(last=False)
    except BaseException as e:
        rows.stopped(e, len(batches))
        # An error a data worker met (a bad image with the tokenizer's on_error: fail) is re-raised by torch
        # from a frame that keeps it in a local: a cycle that held the tokenizer and these frames until
        # Python's next full collection. The finished frames below this one let go of their locals.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:  # its worker processes end now, not with the traceback that holds it (a notebook keeps it)
        shutdown_iterators([loader])
    return rows


def _finish_cache(rows: _CacheRows, skips, tokenizer, key: str, source: TokenImages) -> LatentCache:
    """Every row filled (checked), the skipped images said in one warning, and the rows as the cache."""
    from smapctl.data.skipped import skip_summary

    if rows.tokens is None:
        raise UserError(f"caching the tokens of {key}: no images to encode")
    if rows.at != rows.n:  # every batch is filled (an unreadable image gives way to the next)
        raise RuntimeError(f"caching the tokens of {key}: {rows.at} of {rows.n} rows filled")
    # One line per image: a resumed build meets again the images skipped in the batches it encodes anew.
    errors = skips.read_and_tidy() if skips is not None else []
    if errors:
        logger.warning("caching the tokens of %s: %s", key, skip_summary(errors, skips.path))
    return LatentCache(rows.tokens, rows.labels, tokenizer.fingerprint, key, source.images)


class _CacheRows:
    """`encode_dataset`'s rows (every image and its mirror image), filled in place as the rounds come in
    (a list of batches and a final torch.cat held the tokens twice: 21 GB more for ImageNet's 1.28M
    images and their mirror images at 128 x 16 latents), and kept in `parts` about once a minute: the
    rows of whole rounds only, so that a part ends at a batch boundary every process agrees on. With
    `out` (`_CacheFile`) the rows are the cache file's own, filled in place."""

    def __init__(self, n: int, parts: PartFolder | None, first: int, out: _CacheFile | None = None):
        self.n, self.parts, self.out = n, parts, out
        self.tokens: torch.Tensor | None = None  # (n, K[, C])
        self.labels: torch.Tensor | None = None  # (n,)
        # rows filled, rows of whole rounds (batches `done_batches`), rows kept in parts
        self.at = self.done = self.saved = (
            _read_parts(parts, first, self.allocate) if parts is not None else 0
        )
        self.done_batches = first

    def allocate(self, shape, dtype, label_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        mapped = None
        if self.out is not None:
            held = self.parts is not None and bool(self.parts.parts())
            mapped = self.out.allocate(self.n, shape, dtype, label_dtype, held)
        if mapped is not None:
            self.tokens, self.labels = mapped
        else:
            self.tokens = torch.empty((self.n, *shape), dtype=dtype)
            self.labels = torch.empty(self.n, dtype=label_dtype)
        return self.tokens, self.labels

    def add(self, t: torch.Tensor, y: torch.Tensor) -> None:
        """One process's batch: tokens (B, views, K[, C]), labels (B,) -> rows [view 0 of each, view 1...]."""
        if self.tokens is None:
            self.allocate(t.shape[2:], t.dtype, y.dtype)
        for v in range(t.shape[1]):
            self.tokens[self.at : self.at + len(t)] = t[:, v]
            self.labels[self.at : self.at + len(t)] = y
            self.at += len(t)

    def round_done(self, batches: int) -> None:
        """A whole round is in: the first `batches` batches are done; a part when one is due."""
        self.done, self.done_batches = self.at, batches
        if self.parts is not None and self.parts.due():
            self.keep_part()

    def keep_part(self) -> None:
        """The rows since the last part: those of the batches up to done_batches. One that cannot be
        written is said once, and no more are tried (they save work; the cache is what the run needs)."""
        if self.parts is None or self.tokens is None or self.done_batches <= self.parts.saved:
            return
        rows = slice(self.saved, self.done)
        try:
            self.parts.write(
                self.done_batches, {"tokens": self.tokens[rows], "labels": self.labels[rows]}, {}
            )
            self.saved = self.done
        except Exception as e:  # noqa: BLE001 (a full disk: the run goes on, or stops for its own reason)
            logger.warning("the token cache's parts could not be kept (%s); it is made without them", e)
            self.parts = None

    def stopped(self, e: BaseException, batches: int) -> None:
        """The build stops (`e`): what the rounds so far made is kept for the next run, and said."""
        self.keep_part()
        if self.parts is not None and self.parts.saved:
            logger.warning(
                "%s: %d of %d batches of the token cache are kept in %s; the same command goes on from them",
                "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped",
                self.parts.saved,
                batches,
                self.parts.folder,
            )


class _CacheFile:
    """Where the rows of a cache `_build_cache` writes are made: in the cache's file itself, filled in
    place through a memory map (`MappedSafetensors`). An ImageNet cache with its mirror images (21 GB)
    is then built in the page cache, which the kernel writes back and can drop, instead of in the
    process's memory (benchmarks/cache_memory.py, benchmarks/README.md), and not copied once more into
    a file at the end. A disk without room for the file when the rows are first made is said then, not
    once they are all made; when the parts of an earlier run may be what fills it, in a warning: the
    rows are then made in memory and written at the end by `_write_cache` (it removes the
    parts if the cache fits only without them). So they are on a big-endian machine, where the file
    cannot be filled in place (`MappedSafetensors`)."""

    def __init__(self, path: Path, meta: dict[str, str]):
        self.path, self.meta = path, meta
        self.file = None

    def allocate(
        self, n: int, shape, dtype, label_dtype, parts_held: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens (n, *shape), labels (n,)) to fill, views of the file; None: no room for it beside the
        parts the build holds (`parts_held`), which may make room when they go, or a big-endian machine."""
        from smapctl.io import is_disk_full
        from smapctl.safetensors_io import MappedSafetensors

        specs = {"tokens": ((n, *shape), dtype), "labels": ((n,), label_dtype)}
        try:
            self.file = MappedSafetensors(self.path, specs, self.meta, "the token cache")
        except NotImplementedError:  # big-endian: its rows would be written byte-swapped
            return None
        except UserError as e:
            cause = e.__cause__
            if not parts_held or not isinstance(cause, OSError) or not is_disk_full(cause):
                raise
            logger.warning(
                "%s: no room for the token cache on its disk now (%s); its rows are made in memory and"
                " written when they are all made",
                self.path,
                cause.strerror or cause,
            )
            return None
        return self.file.tensors["tokens"], self.file.tensors["labels"]

    def write(self, made: LatentCache, parts: PartFolder | None) -> None:
        """The cache of rows `made` (this file's own, or made in memory) at its path; its parts go."""
        if self.file is None:
            _write_cache(self.path, made, parts)
            return
        self.file.commit()
        if parts is not None:
            parts.remove()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write_cache(path: Path, made: LatentCache, parts: PartFolder | None) -> None:
    """`write_latents`, and the parts go. A disk with room for the cache but not beside its parts: the
    parts go first (the rows are in memory) and the cache is written again."""
    from smapctl.io import as_os_error, is_disk_full

    try:
        write_latents(path, made)
    except UserError as e:
        cause = as_os_error(e.__cause__) if e.__cause__ is not None else None
        if parts is None or not parts.folder.exists() or cause is None or not is_disk_full(cause):
            raise
        logger.warning("%s: no room beside its parts; they are removed and the cache written again", path)
        parts.remove()
        write_latents(path, made)
    if parts is not None:
        parts.remove()


def _drop_stale_parts(path: Path) -> None:
    """The parts of a build of the cache at `path` stopped while another one finished it: gone, when no
    process is building it now."""
    stale = cache_parts(path, "", 0)  # (its plan is not read)
    if stale.folder.is_dir() and _claimed(stale, quiet=True):
        try:
            stale.remove()
            logger.info("%s: removed the parts of an earlier build (the cache is made)", stale.folder)
        finally:
            stale.release()


def _claimed(parts: PartFolder, quiet: bool = False) -> bool | None:
    """`parts.claim()`; a lock file that cannot be made is said (unless `quiet`) and the cache is made
    without parts (None), as when a part cannot be written: it does not stop the run."""
    try:
        return parts.claim()
    except UserError as e:
        if not quiet:
            logger.warning("%s; this run keeps no parts of the cache", e)
        return None


def cache_parts(path: Path, images: str, batch_size: int) -> PartFolder:
    """Where building the cache at `path` keeps its work (`<cache>.partial/`); the plan names the cache
    (its name: tokenizer, dataset, mirror images), the images (their listing's digest) and the batch size
    (the rows of each part's batches)."""
    plan = {"cache": path.name, "images": images, "batch_size": batch_size}
    return PartFolder(path.with_name(f"{path.name}.partial"), plan, "the token cache")


def _agreed_start(parts: PartFolder | None, keeps: bool, skips, processes, rows_of) -> int:
    """The batches to read back from the parts instead of encoding: those the parts of every process that
    keeps the rows hold from batch 0, when their plan is this run's (a folder of another plan is
    removed, and the list `skips` of skipped images cleared). Under a launcher each node's main process
    that writes a cache keeps the rows (`_first_to_write_its_folder`): all start from the last batch
    boundary every one of them holds; from 0 when one of them has no parts. `rows_of(start, end)`: the
    rows batches start..end-1 make."""
    ends = None
    if parts is not None:
        if parts.plan_then() == parts.plan:
            parts.has_plan, ends = True, []
            for start, end, path in parts.following_on():
                if not _readable_part(path, rows_of(start, end)):  # damaged: it and the rest done again
                    path.unlink(missing_ok=True)
                    parts.following_on()
                    break
                ends.append(end)
        else:
            _say_discarded(parts)
            parts.clear()
            ends = []
        if not ends and skips is not None:
            skips.clear()  # a fresh start (before any process of a launcher reads an image)
    if processes is None or processes.num_processes == 1:
        return ends[-1] if ends else 0
    from accelerate.utils import gather_object

    held = [e for k, e in gather_object([(keeps, ends)]) if k]
    if not held or any(e is None for e in held):
        return 0
    common = set(held[0]).intersection(*held[1:])
    return max(common, default=0)


def _say_discarded(parts: PartFolder) -> None:
    """A warning for the parts of an earlier build with another plan, as they are removed."""
    then, n = parts.plan_then(), len(parts.parts())
    if not n:
        return
    if then is not None and then.get("batch_size") != parts.plan["batch_size"]:
        why = (
            f"made with batch size {then.get('batch_size')}, not {parts.plan['batch_size']} (set "
            f"latents.batch_size back to go on from them)"
        )
    else:
        why = "of other images (the folder changed since)"
    logger.warning("the token cache's %d parts in %s were %s: they are encoded again", n, parts.folder, why)


def _readable_part(path: Path, rows: int) -> bool:
    """Whether the part at `path` holds the tokens and labels of `rows` rows (from its header)."""
    from safetensors import safe_open

    try:
        with utf8_path(path) as readable, safe_open(readable, "pt") as f:
            shapes = [f.get_slice(name).get_shape() for name in ("tokens", "labels")]
    except Exception:  # noqa: BLE001 (safetensors raises its own errors for a damaged file)
        return False
    return shapes[0][0] == rows and shapes[1] == [rows]


def _read_parts(parts: PartFolder, first: int, allocate) -> int:
    """Read the rows of batches 0..first-1 back from `parts` into the tensors `allocate(shape, dtype,
    label dtype)` returns (parts beyond them are removed); -> the rows read."""
    from safetensors import safe_open

    at, tensors = 0, None
    for _, _, path in parts.following_on(first):
        with utf8_path(path) as readable, safe_open(readable, "pt") as f:
            t, y = f.get_tensor("tokens"), f.get_tensor("labels")
        tensors = tensors or allocate(t.shape[1:], t.dtype, y.dtype)
        tensors[0][at : at + len(t)], tensors[1][at : at + len(t)] = t, y
        at += len(t)
    if at:
        logger.info("caching the tokens: %d batches read back from %s", first, parts.folder)
    return at


@dataclass
class TokenImages:
    data: Dataset  # the images to tokenize, eval transform
    images: str  # a folder's: the sha256 of its listing with sizes and times (`LatentCache.images`)


def token_images(tokenizer, dataset: str, held_out: float = 0.0, contents: bool = True) -> TokenImages:
    """The images `encode_dataset` tokenizes: an embedded split, or a folder, labelled with the
    tokenizer's classes, without the fraction `held_out` that `build_datasets` held out of it in the
    tokenizer's training (the same images, as both split with `split_indices`; refused when the folder
    has changed since, see `check_split_listing`). `contents` False: no `stat` of the files (`images`
    is then "")."""
    from smapctl.data.datasets import DATA_LISTING, SPLIT_SEED, build_eval_dataset, check_split_listing
    from smapctl.data.folder import ImageFolderDataset, split_indices
    from smapctl.train import checkpoint as ckpt

    size, on_error = tokenizer.model.cfg.image_size, tokenizer.recipe.data.on_error
    data = build_eval_dataset(dataset_key(dataset), size, tokenizer.class_names, on_error=on_error)
    if held_out > 0:
        check_split_listing(
            dataset,
            data.listing() | {"held_out": held_out},
            ckpt.load_meta(tokenizer.path).get(DATA_LISTING),
            f"the tokenizer {tokenizer.path} was trained",
            "set latents.dataset to the images to tokenize (all of them are then used)",
        )
        train_idx, _ = split_indices(len(data), held_out, SPLIT_SEED, data.labels)
        data = data.subset(train_idx, data.transform)
    folder = contents and isinstance(data, ImageFolderDataset)
    images = data.listing(contents=True)["sha256"] if folder else ""
    return TokenImages(data, images)


def write_latents(path: Path, cache: LatentCache) -> None:
    """Write the cache atomically; a full disk is a one-line UserError (`smapctl.io`)."""
    from smapctl.io import atomic_path
    from smapctl.safetensors_io import write_safetensors

    meta = _cache_meta(cache.fingerprint, cache.dataset, cache.images)
    with atomic_path(path, "the token cache") as tmp:
        write_safetensors(tmp, {"tokens": cache.tokens.contiguous(), "labels": cache.labels}, meta)


def _cache_meta(fingerprint: str, dataset: str, images: str) -> dict[str, str]:
    """The metadata a cache file carries (`read_latents` reads it back into its `LatentCache`)."""
    # A folder's bytes that are not UTF-8 as \xNN: the header is UTF-8 (such a cache could not be written).
    # The cache's file name hashes the bytes themselves (`cache_path`), so two folders never share one.
    dataset = escape_surrogates(dataset)
    return {"fingerprint": fingerprint, "dataset": dataset, "version": str(CACHE_VERSION), "images": images}


class UnusableCache(UserError):
    """A token cache file that cannot be read (damaged, cut short) or is of another format version;
    `load_or_build_latents` makes it again, with a warning."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}; delete it to rebuild")
        self.why = f"{path}: {why}"


def read_latents(path: Path) -> LatentCache:
    """The cache at `path`. safetensors maps the file copy-on-write instead of reading it (tested): an
    ImageNet cache with its mirror images (2.6M x 128 x 16 float32, 21 GB) costs page cache that the
    kernel can drop, not process memory, and training pages in the rows it samples."""
    from safetensors import safe_open

    try:
        with utf8_path(path) as readable:
            with safe_open(readable, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("version") != str(CACHE_VERSION):
                raise UnusableCache(path, "latent cache of another format version")
            data = load_file(readable)
    except UserError:
        raise
    except Exception as e:  # a damaged file (safetensors' own error types, OSError)
        raise UnusableCache(path, f"unreadable latent cache ({describe(e, type(e).__name__)})") from None
    fields = (meta.get(name, "") for name in ("fingerprint", "dataset", "images"))
    return LatentCache(data["tokens"], data["labels"], *fields)
