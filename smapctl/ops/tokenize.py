"""Images -> a token file (`smapctl tokenize`; the file's format: `smapctl.ops.codes`).

Images are prepared as in training evaluation (`eval_transform`: centre square crop, bicubic resize to
the model's resolution). They travel as uint8 and become floats one batch at a time on the device (a
quarter of the bytes through the loader and to the GPU; on the CPU, 50 instead of 107 us per 64 px
image: benchmarks/README.md). With a GPU they are read in DataLoader workers, so decoding overlaps the
encoder's compute; on the CPU they are read inline, because worker processes take cores from the
encoder's threads (measured slower on 2 cores: benchmarks/RESULTS.md, tokenize_tiny). A built-in dataset
named as the input (`digits:val`, `builtin_input`) is encoded from memory, framed as `evaluate` frames it.
Under a launcher the processes share the batches and the main one writes the file (`_Launch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Subset

from smapctl.data.config import embedded_name
from smapctl.data.images import BadImageError, to_signed_float
from smapctl.devices import default_device
from smapctl.errors import UserError, agreed
from smapctl.io import file_identity
from smapctl.ops.codes import (
    Codes,
    Precision,
    check_codes_out,
    check_codes_suffix,
    save_codes,
    skipped_list_path,
)
from smapctl.ops.inputs import (
    ImageFiles,
    ImageList,
    ImageTensors,
    builtin_class_ids,
    builtin_images,
    builtin_input,
    list_inputs,
    resolve_labels,
)
from smapctl.ops.token_parts import Parts, check_partial, inputs_digest, partial_folder
from smapctl.precision import warn_if_bf16_is_slow
from smapctl.progress import progress

OnError = Literal["skip", "fail"]


@dataclass
class TokenizeResult:
    out: Path
    codes: Codes | None  # None in the other processes of a launcher (`main` False): the main one writes
    skipped: list[BadImageError] = field(default_factory=list)  # unreadable images (with on_error="skip")
    seconds: float = 0.0  # wall time of reading and encoding (not of loading the model)
    skipped_list: Path | None = None  # `skipped_list_path(out)` when images were skipped
    resumed: int = 0  # images whose tokens an interrupted run had kept (`resume`), not encoded again
    main: bool = True  # False in the other processes of a launcher: the main one writes and reports

    def skip_summary(self) -> str | None:
        """One line naming how many images were skipped, the first few and the list file; or None."""
        from smapctl.data.skipped import skip_summary

        return skip_summary(self.skipped, self.skipped_list) if self.skipped else None

    @property
    def images_per_second(self) -> float:
        """Of the images this run encoded (not those it resumed from)."""
        return (len(self.codes.labels) - self.resumed) / max(self.seconds, 1e-9)


def tokenize_images(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    weights: Literal["ema", "model"] = "ema",
    label: str | None = None,
    prefix: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    on_error: OnError = "fail",
    precision: Precision = "fp32",
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    ends_command: bool = False,
) -> TokenizeResult:
    """Encode images to their first `prefix` (default: all K) tokens and write a token file to `out`.

    The file is written atomically and only when the run succeeds. With `on_error="skip"` unreadable
    images are left out, kept in the result's `skipped` and listed in `skipped_list_path(out)`; with
    "fail" the first one is an error. `out` is checked before any image is read: an existing token file
    is replaced only with `overwrite`, any other existing file (model weights, say) never. The work is
    kept in `OUT.partial/` as it goes (`smapctl.ops.token_parts`): a run that stops (interrupted, an
    unreadable image, a token file that cannot be written) goes on from there with `resume`, which
    starts afresh when there is none (a run without it refuses to start beside one). Once every image is
    encoded a SIGINT or SIGTERM lets the token file be written, and the run ends as a complete one,
    saying so; with `ends_command` (`smapctl tokenize`) up to the command's end (`signals.CommandEnd`).

    Started by `accelerate launch` / `torchrun` (and `device` None), the processes share the batches:
    process p encodes batches p, p + P, ... on its own device, and the main process alone keeps the parts
    and writes the token file (the same as one process writes) and the list of skipped images; the
    others return a result without codes (`main` False).
    """
    from smapctl.io import ensure_dir, removed_if_left_empty
    from smapctl.ops.load import load_tokenizer
    from smapctl.train.signals import completed

    out = Path(out)
    _check_options(out, on_error, precision)
    launch = _Launch.joined(precision) if device is None else None
    # The main process alone writes OUT, and alone checks it, telling the others what it refused: where
    # each node has its own OUT (nothing shared), a token file or partial folder on one node would otherwise
    # stop that node before the processes join, and the others with a traceback from their broken
    # rendezvous; one on another node than the main one's would refuse a run that does not write there.
    if launch is None or launch.main:
        with _told_to_the_others(launch):
            check_codes_out(out, overwrite)
            check_partial(out, resume)
    spec = builtin_input(inputs)  # a built-in dataset's images are known once the tokenizer's size is
    images = list_inputs(inputs) if spec is None else None
    device = launch.device if launch is not None else device or default_device()
    if precision == "bf16":
        warn_if_bf16_is_slow(device, "--precision bf16", "--precision fp32")
    tok = load_tokenizer(checkpoint, weights, device)
    K = tok.num_tokens
    k = K if prefix is None else prefix
    if not 0 <= k <= K:
        raise UserError(f"--prefix {k}: out of range; {tok.path} has {K} latent tokens (use 0..{K})")
    if spec is not None:
        if label is None:  # refused before the dataset is built (the photos take seconds)
            from smapctl.data.embedded import embedded_class_names

            builtin_class_ids(spec, embedded_class_names(embedded_name(spec)), tok)
        images = builtin_images(spec, tok.model.cfg.image_size)
    labels = torch.tensor(resolve_labels(images, tok, label), dtype=torch.long)
    settings = (k, weights, batch_size, workers, on_error, precision)
    if launch is not None:
        launch.listed(images, labels, tok)
        if not launch.main:  # it encodes its share; the main process keeps the rows
            _encode_share(tok.model, images, labels, settings, launch)
            if ends_command:  # its work is done: a signal now ends it as complete, as the main process
                completed(f"every image is encoded; the main process writes the token file {out}")
            return TokenizeResult(out, None, main=False)
    plan = _plan(images, labels, k, tok, weights, precision)
    parts = Parts(partial_folder(out), plan, images.paths if images.dataset is None else [])  # (no files)
    # The lock file goes beside the token file: its folder is made now, and removed again (with the
    # parents made for it) if the run fails leaving nothing in it.
    with _told_to_the_others(launch), removed_if_left_empty(out.parent):
        ensure_dir(out.parent, "the token file's folder")
        if not parts.claim():
            raise UserError(
                f"another tokenize is writing {out} (it holds {parts.lock}); wait for it, or use another -o"
            )
        try:
            return _tokenize(tok, images, labels, out, parts, resume, settings, ends_command, launch)
        finally:
            parts.release()


def _check_options(out: Path, on_error: str, precision: str) -> None:
    """`tokenize_images`'s options that need nothing loaded: one-line errors."""
    if not out.is_dir():  # (a folder, whatever its name, is told as that by check_codes_out)
        check_codes_suffix(out)
    if on_error not in ("skip", "fail"):
        raise UserError(f"--on-error: expected 'skip' or 'fail', not {on_error!r}")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision: expected 'fp32' or 'bf16', not {precision!r}")


def _plan(images, labels: torch.Tensor, k: int, tok, weights: str, precision: str) -> dict:
    """What a run encodes, as its parts record it: a resumed run must be the same run."""
    return {
        "images": inputs_digest(images.relative, images.base, labels),
        "prefix": k,
        "fingerprint": tok.fingerprint,
        "weights": weights,
        "precision": precision,
    }


def _tokenize(tok, images, labels, out, parts, resume, settings: tuple, ends_command: bool, launch=None):
    """`tokenize_images` once its inputs are checked and `parts` claimed; `settings`: (k, weights,
    batch_size, workers, on_error, precision); `launch`: the `_Launch` of the main process of a
    launcher, or None."""
    k, weights, batch_size, workers, on_error, precision = settings
    parts.start(resume)
    cfg = tok.model.cfg
    shape = (len(images.paths), k) if cfg.discrete else (len(images.paths), k, cfg.token_dim)
    rows = _TokenRows(out, shape, torch.long if cfg.discrete else torch.float32)
    try:
        return _tokenize_into(rows, tok, images, labels, out, parts, settings, ends_command, launch)
    finally:
        rows.close()


def _tokenize_into(rows, tok, images, labels, out, parts, settings: tuple, ends_command: bool, launch=None):
    """`_tokenize` with the rows its tokens are made in (`_TokenRows`)."""
    from smapctl.data.skipped import absolute, write_skip_list
    from smapctl.train.signals import completing, say_late_signal

    k, weights, batch_size, workers, on_error, precision = settings
    start = time.perf_counter()
    try:
        kept, bad, resumed = _encode_files(
            tok.model, images, labels, rows.tokens, batch_size, workers, precision, on_error, parts, launch
        )
    except BaseException as e:
        _say_kept(parts, out, len(images.paths), e)
        raise
    tokens = rows.head(len(kept))
    skipped = [BadImageError(images.paths[i], reason) for i, reason in bad]
    if not kept:
        parts.remove()
        raise UserError(f"none of the {len(images.paths)} images could be read (e.g. {skipped[0]})")
    seconds = time.perf_counter() - start
    codes = _codes(tok, tokens, labels[kept], [images.relative[i] for i in kept], k, weights, precision)
    # Every image is encoded: a signal now lets the token file be written (its last part would take as
    # long) and the run ends as a complete one, saying so; one after the rename kept OUT.partial/ and
    # advised --resume, exit 130, with the token file complete. The command's final print too.
    earlier = file_identity(out)
    complete = f"the token file {out} is written; tokenize is complete"
    with completing(complete if ends_command else None) as stop:
        try:
            save_codes(codes, out)
        except BaseException as e:  # a full disk, a second signal: the tokens are kept as a last part
            if isinstance(e, KeyboardInterrupt) and file_identity(out) != earlier:  # (in the rename's fsync)
                parts.remove()
                unlisted = f", without {skipped_list_path(out).name}" if skipped else ""
                logging.getLogger("smapctl").warning(
                    "interrupted: the token file %s is written%s", out, unlisted
                )
                raise
            # (not written before, when the token file can be: a run of under a minute writes no part)
            _keep(parts, tokens, kept, bad, len(images.paths))
            if isinstance(e, UserError) and parts.saved == len(images.paths):
                raise UserError(
                    f"{e}; the tokens are kept in {parts.folder}: --resume with this -o writes the file"
                ) from e
            _say_kept(parts, out, len(images.paths), e)
            raise
        parts.remove()
        listing = write_skip_list(absolute(skipped), skipped_list_path(out))  # read later, from elsewhere
    taken = launch.last_round_signal if launch is not None else None
    # (said once: after the last round's, not again)
    say_late_signal(taken or stop.unsaid(), bool(taken), "encoded", complete)
    return TokenizeResult(out, codes, skipped, seconds, listing, resumed)


def _codes(tok, tokens, labels, paths: list[str], k: int, weights: str, precision: str) -> Codes:
    """The token file of `tokens` (N, k[, C]) of the images at `paths` (relative), of classes `labels`
    (N,), which describes the tokenizer that made them."""
    cfg = tok.model.cfg
    return Codes(
        tokens=tokens,
        labels=labels,
        paths=paths,
        prefix=k,
        num_tokens=tok.num_tokens,
        regularizer=cfg.regularizer.kind,
        image_size=cfg.image_size,
        fingerprint=tok.fingerprint,
        checkpoint=str(tok.path.resolve()),
        weights=weights,
        class_names=list(tok.class_names),
        precision=precision,
    )


def _say_kept(parts: Parts, out: Path, n: int, error: BaseException) -> None:
    """A run that stopped before its token file: what it keeps for `--resume`, or nothing at all."""
    log = logging.getLogger("smapctl")
    interrupted = isinstance(error, KeyboardInterrupt)
    if parts.saved == 0:  # a resumed run's parts that could not be read: its error says so
        if parts.resumed:
            return
        parts.remove()
        if interrupted:  # said: Ctrl-C would end it without a word
            log.warning("interrupted: nothing written%s", f"; {out} is as it was" if out.exists() else "")
        return
    then = "the same command with --resume goes on"
    if isinstance(error, BadImageError):  # it would stop there again
        then = "once that image is mended or removed (or with --on-error skip), --resume goes on"
    done = f"{parts.saved:,} of {n:,} images done"
    log.warning(
        "%s: %s, their tokens kept in %s; %s",
        "interrupted" if interrupted else "stopped",
        done,
        parts.folder,
        then,
    )


class _TokenRows:
    """Where `tokenize` makes the tokens of its images, (N, k[, C]) rows filled in input order: a scratch
    file beside the token file, filled through a shared memory map (an uncommitted `MappedSafetensors`;
    its lock and name let `remove_orphans` remove it after a kill). ImageNet's 1.28M images at 128 x 16
    latents (10.5 GB) are then page cache, which the kernel writes back to the disk and can drop, instead
    of the process's own memory (`python benchmarks/cache_memory.py --tokenize`, benchmarks/README.md),
    and are written to the token file from there.

    The disk then holds them up to three times (the scratch file, the run's parts, the token file) until
    the run ends. A disk without room for them once (nor, then, for the token file) or a folder that may
    not be written is an error at once, not after hours of encoding; a disk with room for the scratch file
    but not for the parts and the token file beside it, or a scratch file that cannot be made otherwise (a
    file system without memory maps), is said in a warning and the rows are made in memory instead (as on
    a big-endian machine: `MappedSafetensors`)."""

    def __init__(self, out: Path, shape: tuple, dtype: torch.dtype):
        from smapctl.io import is_disk_full, is_not_allowed
        from smapctl.safetensors_io import MappedSafetensors

        self.file = None
        size = math.prod(shape) * dtype.itemsize
        log = logging.getLogger("smapctl")
        try:
            self.file = MappedSafetensors(out, {"tokens": (shape, dtype)}, {}, "the token file")
        except NotImplementedError:  # big-endian
            pass
        except UserError as e:
            cause = e.__cause__
            if not isinstance(cause, OSError) or is_not_allowed(cause):
                raise
            why = cause.strerror or cause
            if is_disk_full(cause):
                raise UserError(
                    f"{out}: no room on its disk for its tokens ({size / 1e9:.2f} GB; {why}): free some space"
                    f" or write elsewhere; any earlier {out.name} is unchanged"
                ) from cause
            log.warning(
                "%s: its tokens are made in memory (%.2f GB): no scratch file (%s)", out, size / 1e9, why
            )
        if self.file is not None:
            free = shutil.disk_usage(out.parent).free
            if free >= 2 * size:
                self.tokens = self.file.tensors["tokens"]
                return
            self.file.close()
            self.file = None
            log.warning(
                "%s: its tokens are made in memory (%.2f GB): the disk has no room for a scratch file of them"
                " beside the run's parts and the token file",
                out,
                size / 1e9,
            )
        self.tokens = torch.empty(shape, dtype=dtype)

    def head(self, n: int) -> torch.Tensor:
        """The first `n` rows as a tensor of their own (a view of fewer rows would be saved with the whole
        storage: `torch.save` writes a view's whole storage)."""
        if n == len(self.tokens):
            return self.tokens
        return self.tokens[:n].clone() if self.file is None else self.file.rows("tokens", n)

    def close(self) -> None:
        """The scratch file goes (the rows stay readable while referenced, as the result's tokens)."""
        if self.file is not None:
            self.file.close()


def _image_source(images: ImageList, image_size: int, device, workers: int | None):
    """(the dataset `_encode_files` reads `images` from, the loader's worker processes)."""
    if workers is None:  # measured in benchmarks/RESULTS.md (tokenize_tiny); a built-in set is in memory
        workers = 0 if device.type == "cpu" or images.dataset is not None else min(4, os.cpu_count() or 1)
    if images.dataset is not None:
        return ImageTensors(images.dataset.images, image_size), workers
    return ImageFiles(images.paths, image_size), workers


@torch.inference_mode()
def _encode_files(
    model,
    images: ImageList,
    labels,
    tokens,
    batch_size,
    workers,
    precision,
    on_error,
    parts: Parts,
    launch=None,
):
    """Encode `images` into the first rows of `tokens` (N, k[, C]), those of the readable images in
    input order -> (their indices, (index, reason) of the others, the number of kept images read back
    from `parts`). With on_error="fail" the first unreadable image is raised at once. The work is written
    to `parts` now and then and when it stops (any exception). `launch` (`_Launch`, in the main process of
    a launcher): the batches are spread over its processes (`_encode_rounds`)."""
    from smapctl.data.datasets import deaf_workers
    from smapctl.train.signals import stop_if_unheard

    k = tokens.shape[1]
    device = next(model.parameters()).device
    paths = images.paths
    source, workers = _image_source(images, model.cfg.image_size, device, workers)
    kept, bad = [], []  # bad: (input index, reason)
    done = parts.load(tokens, kept, bad)
    resumed = len(kept)
    if bad and on_error == "fail":  # the interrupted run skipped them (--on-error skip): this one would not
        i, reason = bad[0]
        raise BadImageError(paths[i], f"{reason} (--on-error skip leaves such images out)")
    if launch is not None:
        launch.start(done)  # the other processes start where the parts end
        settings = (k, batch_size, workers, precision, on_error)
        _encode_rounds(model, source, paths, labels, settings, launch, done, (tokens, kept, bad, parts))
        return kept, bad, resumed
    loader = deaf_workers(  # the main process takes a signal and stops them itself
        DataLoader(
            Subset(source, range(done, len(paths))),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
    )
    try:
        with progress(len(paths), "tokenizing", "images", initial=done) as bar:
            for images, index, errors in loader:
                end = int(index[-1]) + 1
                if any(errors):
                    for i, reason in zip(index.tolist(), errors, strict=True):
                        if reason and on_error == "fail":  # the default: a token file of every image given
                            raise BadImageError(
                                paths[i], f"{reason} (--on-error skip leaves such images out)"
                            )
                        if reason:
                            bad.append((i, reason))
                    ok = torch.tensor([not e for e in errors], dtype=torch.bool)
                    images, index = images[ok], index[ok]
                if len(index):
                    y = labels[index].to(device)
                    images = to_signed_float(images.to(device, non_blocking=True))
                    tokens[len(kept) : len(kept) + len(index)] = encode_tokens(model, images, y, k, precision)
                    kept.extend(index.tolist())
                done = end  # the parts take `kept` and `bad` below `done`: consistent wherever a signal lands
                bar.update(len(errors))
                if parts.due():
                    parts.save(tokens, kept, bad, done)
                if done < len(paths):
                    stop_if_unheard()
    except BaseException:
        _keep(parts, tokens, kept, bad, done)
        raise
    return kept, bad, resumed


class _Launch:
    """This process's place among the processes of a launcher (`accelerate launch`, `torchrun`): each
    encodes its share of the batches (`_encode_rounds`); the main one keeps the parts and writes the files."""

    def __init__(self, state):
        self.state = state  # accelerate's PartialState
        self.told = False  # the main process has told the others where to start (or its problem)
        self.inputs = None  # (count, digest) of the images this process listed and their labels (`listed`)
        self.tokenizer = {}  # the checkpoint it loaded, for `launch.different_checkpoints` (`listed`)
        self.last_round_signal = None  # a signal taken in the last round, which let the run finish

    def listed(self, images: ImageList, labels: torch.Tensor, tok) -> None:
        """The images this process lists, and their labels: each process reads its batches from its own
        listing, and the main one keeps the tokens under its own paths; and the tokenizer it encodes them
        with, from its node's copy (`start` checks that they agree)."""
        self.inputs = (len(images.relative), inputs_digest(images.relative, Path(), labels))
        self.tokenizer = {"tokenizer": (tok.path, tok.fingerprint)}

    @classmethod
    def joined(cls, precision: Precision) -> _Launch | None:
        """Joined with the other processes of a launcher, one device each, as `sample` joins them; None
        without a launcher. `precision`: the encoder's (`--precision`), which accelerate's is not."""
        from smapctl.launch import check_joined, launched_processes, launcher_precision, process_state

        if launched_processes() == 1:
            return None
        state = process_state()
        check_joined(state.num_processes, "each would encode every image into the same token file")
        asked = launcher_precision()
        if asked is not None and state.is_main_process:  # (it would be dropped without a word)
            logging.getLogger("smapctl").warning(
                "accelerate's mixed precision %s is not used: tokenize encodes in --precision %s",
                asked,
                precision,
            )
        return cls(state)

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def start(self, done: int = 0, problem: str | None = None) -> int:
        """The main process's first image to encode (`done`: those before it are in its parts) or the
        problem that stopped it before (`_told_to_the_others`), told to every process: -> that image; in
        the others the problem is raised (agreed: they all stop there). Processes that list other images
        than the main one (nodes with their own copy of a folder, one of them incomplete) all stop here:
        the main process would have kept another image's tokens under each path from there on; so do
        processes whose nodes' copies of the tokenizer differ (`launch.different_checkpoints`)."""
        from accelerate.utils import gather_object

        from smapctl.launch import different_checkpoints, different_images, fingerprints

        told = gather_object([(done, problem, self.inputs, fingerprints(self.tokenizer))])  # in process order
        (done, problem, _, _), self.told = told[0], True
        different = different_images([inputs for _, _, inputs, _ in told], "images")
        if problem is None and different is None:  # (a problem before it listed: nothing to compare)
            different = different_checkpoints([prints for *_, prints in told], self.tokenizer)
        if problem is None and different is not None:  # raised by every process, the main one too
            raise different
        if problem is not None and not self.main:  # (the main process raises its own as it goes on)
            raise agreed(UserError(problem))
        return done


@contextlib.contextmanager
def _told_to_the_others(launch: _Launch | None):
    """A UserError the main process of a launcher meets alone before the encoding starts (another run
    holds the lock, a resume is refused, no room for the tokens) is told to the other processes, which
    wait to hear where to start (`_Launch.start`): every process stops with it, and it is printed once."""
    try:
        yield
    except UserError as e:
        if launch is not None and not launch.told:
            launch.start(problem=str(e))
            agreed(e)
        raise


@torch.inference_mode()
def _encode_share(model, images: ImageList, labels, settings: tuple, launch: _Launch) -> None:
    """In a process of a launcher other than the main one: its share of the batches, from where the main
    process's parts end, sent to the main process round by round (`_encode_rounds`). `settings` as
    `_tokenize`'s."""
    k, _, batch_size, workers, on_error, precision = settings
    source, workers = _image_source(images, model.cfg.image_size, launch.device, workers)
    done = launch.start()
    _encode_rounds(
        model, source, images.paths, labels, (k, batch_size, workers, precision, on_error), launch, done
    )


def _encode_rounds(model, source, paths, labels, settings: tuple, launch: _Launch, done: int, keeps=None):
    """Under a launcher: images `done`.. in the batches one process makes of them, in rounds of one batch
    per process, process p encoding batches p, p + P, ..., as the generator's token cache is made
    (`smapctl.data.latents._encode_rounds`). After each round every process has every process's tokens
    and unreadable images, in input order: with on_error "fail" all stop alike at the first unreadable
    one, and the main process (`keeps`: `_encode_files`'s tokens, kept, bad and parts) keeps them as one
    process would (its parts too, now and then and when the run stops). `settings`: (k, batch_size,
    workers, precision, on_error)."""
    from accelerate.utils import gather_object

    from smapctl.data.datasets import deaf_workers, shutdown_iterators
    from smapctl.launch import RoundStops, gather_rows

    k, batch_size, workers, precision, on_error = settings
    tokens, kept, bad, parts = keeps or (None, None, None, None)
    device, world, cfg = launch.device, launch.world, model.cfg
    batches = [range(i, min(i + batch_size, len(paths))) for i in range(done, len(paths), batch_size)]
    loader = iter(
        deaf_workers(
            DataLoader(
                source,
                batch_sampler=batches[launch.rank :: world],
                num_workers=workers,
                pin_memory=device.type == "cuda",
            )
        )
    )
    # What a process sends of a batch without a readable image, or in a last round without a batch.
    shape = (0, k) if cfg.discrete else (0, k, cfg.token_dim)
    none = torch.zeros(shape, dtype=torch.long if cfg.discrete else torch.float32, device=device)
    try:
        with (
            progress(len(paths), "tokenizing", "images", initial=done, enabled=launch.main) as bar,
            RoundStops(world, device) as rounds,  # a signal stops every process after the same round
        ):
            for first in range(0, len(batches), world):
                t, index, unread = _encode_batch(model, next(loader, None), labels, none, precision)
                unreadable = gather_object([unread])  # each process's, in process order
                gathered = gather_rows((t, index), batch_size, world)
                # (strict=False: a last round has fewer batches than processes, which send none)
                for b, (t_p, index_p), unread_p in zip(
                    batches[first : first + world], gathered, unreadable, strict=False
                ):
                    if unread_p and on_error == "fail":  # every process raises it, the main one prints it
                        # (made by a function: an error held in a local here made a cycle through its
                        # traceback, which kept the model and the tokens until Python's next collection)
                        raise _stopped_everywhere_at(paths, *unread_p[0])
                    if tokens is not None:
                        tokens[len(kept) : len(kept) + len(index_p)] = t_p.cpu()
                        kept.extend(index_p.tolist())
                        bad.extend(unread_p)
                    done = b.stop  # the parts take `kept` and `bad` below `done`
                    bar.update(len(b))
                if parts is not None and parts.due():
                    parts.save(tokens, kept, bad, done)
                rounds.round_done(last=first + world >= len(batches))
        launch.last_round_signal = rounds.signal_name
    except BaseException:
        if parts is not None:
            _keep(parts, tokens, kept, bad, done)
        raise
    finally:  # its worker processes end now, not with the traceback that holds it
        shutdown_iterators([loader])


def _stopped_everywhere_at(paths, i: int, reason: str) -> BadImageError:
    """The error every process of a launch raises at the first unreadable image (on_error fail), input
    `i`: the main process prints it."""
    error = BadImageError(paths[i], f"{reason} (--on-error skip leaves such images out)")
    error.same_in_every_process = True
    return agreed(error)


def _encode_batch(model, batch, labels, none: torch.Tensor, precision: Precision):
    """A batch of `ImageFiles` or `ImageTensors` (None: a process without one in the last round) ->
    (tokens (B, k[, C]) of its readable images, their indices (B,), both on the device of `none` (its
    tokens' kind, with 0 rows), and the (index, reason) of its unreadable images)."""
    if batch is None:
        return none, none.new_zeros(0, dtype=torch.long), []
    images, index, errors = batch
    unread = [(i, reason) for i, reason in zip(index.tolist(), errors, strict=True) if reason]
    ok = torch.tensor([not e for e in errors], dtype=torch.bool)
    images, index = images[ok], index[ok]
    device, t = none.device, none
    if len(index):  # (the tokens stay on the device, where NCCL gathers them)
        images = to_signed_float(images.to(device, non_blocking=True))
        t = _encoded(model, images, labels[index].to(device), none.shape[1], precision)
    return t, index.to(device), unread


def _keep(parts: Parts, tokens, kept, bad, done) -> None:
    """The work of a run that stops, written as a last part (a failure to write it is said, not raised:
    the reason the run stopped is the error to show; not tried again when a part just failed)."""
    if parts.failed:
        return
    try:
        parts.save(tokens, kept, bad, done)
    except Exception as e:  # noqa: BLE001
        logging.getLogger("smapctl").warning("the tokens could not be kept for --resume either: %s", e)


def encode_tokens(model, images: torch.Tensor, labels: torch.Tensor, k: int, precision: Precision = "fp32"):
    """images (B, 3, H, W) in [-1, 1], labels (B,) -> indices (B, k) int64 for VQ, else latents (B, k, C)
    float32. The encoder runs in eval mode (KL: the posterior mean)."""
    return _encoded(model, images, labels, k, precision).cpu()


def _encoded(model, images: torch.Tensor, labels: torch.Tensor, k: int, precision: Precision) -> torch.Tensor:
    """`encode_tokens`'s tokens on the images' device (a launch gathers them there)."""
    # torch's autocast itself, not accelerate's: `--precision` is the encoder's alone (a launcher's
    # --mixed_precision is a training setting, `_Launch.joined`), and the Python API encodes here too,
    # without an Accelerator.
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model.encode(images, labels)
    return out.indices[:, :k] if out.indices is not None else out.z[:, :k].float()
