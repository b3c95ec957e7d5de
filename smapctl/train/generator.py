"""Generator training (appendix A): CARD on continuous SMAP latents, LlamaGen / MaskGIT on VQ indices.

The training tokens are the tokenizer's, cached once (`data/latents.py`); continuous latents are
normalised per channel with the cache's statistics, which are stored in the generator checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import closing
from pathlib import Path

import torch
from torch import nn

from smapctl.data.latents import (
    LatentDataset,
    LatentStats,
    dataset_key,
    load_or_build_latents,
    tokenizer_training_data,
)
from smapctl.devices import same_device
from smapctl.errors import UserError
from smapctl.models.card import CARD, CARDConfig
from smapctl.models.kv_attention import fill_rotary_tables
from smapctl.models.llamagen import LlamaGen
from smapctl.models.maskgit import MaskGIT
from smapctl.ops.load import (
    LoadedTokenizer,
    demo_recipe,
    fingerprint,
    load_tokenizer,
    open_checkpoint,
    tokenizer_model,
)
from smapctl.recipe import GeneratorRecipe, unused_sampling_settings
from smapctl.train import checkpoint as ckpt
from smapctl.train.ema import EMA
from smapctl.train.init import (
    RECORD,
    InitFrom,
    carried_record,
    check_init_tokenizer,
    load_init,
    open_shared_init,
    refuse_with_resume,
)
from smapctl.train.run_folder import refuse_run_in_data
from smapctl.train.runner import TrainingRun
from smapctl.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

GENERATORS = {"card": CARD, "llamagen": LlamaGen, "maskgit": MaskGIT}


def build_generator(recipe: GeneratorRecipe, class_embed: nn.Module | None) -> nn.Module:
    """The recipe's generator; `class_embed` is the tokenizer's module when the recipe shares it."""
    # A copy on the CPU, where the rest of the generator is built, whatever device the tokenizer is on:
    # a copy left on its GPU made a model on two devices, which the EMA snapshot then kept.
    shared = None
    if recipe.class_embed == "shared" and class_embed is not None:  # None: the generator builds its own
        shared = copy.deepcopy(class_embed).cpu()
    return GENERATORS[recipe.model.kind](recipe.model, shared)


def check_compatible(recipe: GeneratorRecipe, tok: LoadedTokenizer) -> None:
    """The generator's token shape and classes must be the tokenizer's (one-line error otherwise)."""
    m, t = recipe.model, tok.model.cfg
    continuous = isinstance(m, CARDConfig)
    if continuous == t.discrete:
        from smapctl.ops.load import demo_recipe

        # A model section of the other kind has other keys: name a recipe to start from.
        want, like = (
            ("CARD (continuous)", "generator")
            if not t.discrete
            else ("llamagen or maskgit (discrete)", "generator_llamagen")
        )
        raise UserError(
            f"model.kind: {tok.path} has {t.regularizer.kind} tokens; use a {want} generator (a recipe"
            f" like {demo_recipe(like)})"
        )
    expected = {"num_tokens": t.num_latent_tokens, "num_classes": t.num_classes}
    expected |= {"token_dim": t.token_dim} if continuous else {"vocab_size": t.regularizer.codebook_size}
    if recipe.class_embed == "shared":
        if tok.model.class_embed is None:
            raise UserError(
                f"class_embed: {tok.path} has no class embedding (TiTok-style); use 'independent'"
            )
        expected["class_dim"] = tok.model.class_embed.dim
    wrong = {key: value for key, value in expected.items() if getattr(m, key) != value}
    if wrong:  # all of them at once (one run per mismatch would take four runs to fix a recipe)
        said = "; ".join(
            f"model.{key}: is {getattr(m, key)} but the tokenizer has {v}" for key, v in wrong.items()
        )
        sets = " ".join(f"--set model.{key}={v}" for key, v in wrong.items())
        raise UserError(f"{said} ({tok.path}); to fit it: {sets}")


def check_token_classes(spec: str | None, tok: LoadedTokenizer) -> None:
    """latents.dataset must be there and hold the tokenizer's classes (an embedded dataset all of them,
    a folder some), said with the key before any image is listed or tokenized."""
    from smapctl.data.config import embedded_name
    from smapctl.data.datasets import missing_images
    from smapctl.data.embedded import load_embedded
    from smapctl.data.folder import class_folders, class_ids, class_key

    problem = missing_images("latents.dataset", spec)
    if problem is not None:
        raise UserError(problem)
    if spec is None:  # the tokenizer's own images: its classes
        return
    name = embedded_name(spec)
    if name is not None:
        names = load_embedded(name, tok.model.cfg.image_size).class_names
        if names != tok.class_names:
            shown = [", ".join(n[:5]) + (", ..." if len(n) > 5 else "") for n in (names, tok.class_names)]
            raise UserError(
                f"latents.dataset: {spec}: its classes ({shown[0]}) are not those of the tokenizer {tok.path}"
                f" ({shown[1]})"
            )
        return
    try:
        ids = class_ids(tok.class_names)
        foreign = [c for c in class_folders(Path(spec).expanduser()) if class_key(c) not in ids]
    except UserError as e:
        raise UserError(f"latents.dataset: {e}") from None
    if foreign:
        raise UserError(
            f"latents.dataset: {spec}: class folder(s) {', '.join(foreign[:5])} not among the"
            f" {len(tok.class_names)} classes of the tokenizer {tok.path}"
        )


# How to load the weights a tokenizer or generator path names (`open_checkpoint`'s `weights_hint`).
SET_WEIGHTS = "; --set latents.tokenizer_weights={named} for those"
_SAMPLED_WITH_EMA = "; the commands sample with the EMA weights: name the checkpoint folder"


def train_generator(
    recipe: GeneratorRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    init_weights: str = "ema",
) -> Path:
    """Train (or resume) the recipe's generator in `run_dir`; returns the final checkpoint's path.
    `init_from`: a run or checkpoint folder whose `init_weights` the new run starts from (`train/init.py`),
    a generator trained on the recipe's tokenizer."""
    refuse_with_resume(init_from, resume)
    init = None if init_from is None else open_shared_init(init_from, recipe, "generator", init_weights)
    if resume:
        recipe = tokenizer_of_the_resumed_run(recipe, run_dir)
    where = Path(recipe.latents.tokenizer)
    if not where.exists():
        raise UserError(
            f"latents.tokenizer: {where} does not exist (a relative path is taken from {Path.cwd()}); "
            f"train the tokenizer first (the demo's: smapctl train-tokenizer {demo_recipe('tokenizer')}) "
            "or point the recipe at it with --set latents.tokenizer=RUN"
        )
    tok = load_tokenizer(
        _tokenizer_to_load(recipe, run_dir, resume),
        recipe.latents.tokenizer_weights,
        weights_hint=SET_WEIGHTS,
    )
    if recipe.latents.dataset is not None:
        refuse_run_in_data(run_dir, {"latents.dataset": recipe.latents.dataset})
    else:  # the tokenizer's own images
        data = tok.recipe.data
        folders = {"the tokenizer's data.dataset": data.dataset, "its data.val_dataset": data.val_dataset}
        refuse_run_in_data(run_dir, folders)
    check_compatible(recipe, tok)
    if init is not None:  # before the (possibly long) tokenizing
        check_init_tokenizer(init, tok.path, tok.fingerprint, recipe.latents.tokenizer_weights)
    check_token_classes(recipe.latents.dataset, tok)
    # tok.model as it is when called: the one loaded here is replaced once the tokens are cached.
    run = TrainingRun(
        recipe, run_dir, kind="generator", build_model=lambda: build_generator(recipe, tok.model.class_embed)
    )
    with run:  # the run folder is let go on any exit (a later run in this process may use it)
        return _train_in(run, recipe, tok, resume, init)


def _train_in(
    run: TrainingRun, recipe: GeneratorRecipe, tok: LoadedTokenizer, resume: bool, init: InitFrom | None
) -> Path:
    """`train_generator`'s work in its TrainingRun."""
    run_dir = run.run_dir
    _check_same_tokenizer(run.check_resume(resume), tok, recipe)  # before the (possibly long) tokenizing
    _pin_tokenizer(run, tok)
    tok.model.to(run.accelerator.device)
    resumed = run.check_resume(resume)
    resumed_images = None if resumed is None else _recorded_images(resumed)
    model = _built_model(recipe, tok)
    record = carried_record(run_dir, resume)
    # Before the (possibly long) tokenizing: the --init-from checkpoint of a run still training could be
    # pruned by then. Its classes are its tokenizer's, this run's: every weight the checkpoint's.
    if init is not None:
        load_init(model, init)
        record = init.record()
    with run.own_rng():  # building the cache draws random numbers (loader seeds); reading it does not
        data, stats, digest = _training_tokens(recipe, tok, run, resumed_images)
    _check_same_images(resumed, digest)
    _keep_what_training_uses(tok, recipe.latents.tokenizer_weights, run.is_main)

    ema = EMA(model, recipe.train.ema_decay)  # from the weights the run starts with
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    run.start(
        {"model": model, "ema": ema},
        {"optimizer": optimizer, "scheduler": scheduler},
        resume=resume,
        class_names=tok.class_names,
        meta={
            "tokenizer": _tokenizer_meta(tok, recipe, run_dir) | {"images_digest": digest},
            "latent_stats": None if stats is None else stats.to_meta(),
        }
        | ({RECORD: record} if record is not None else {}),
    )
    model, optimizer = run.prepare(model, optimizer)
    per_class = 2  # preview images of each of (up to) 8 classes, one class a row
    preview_labels = torch.arange(min(8, tok.model.cfg.num_classes)).repeat_interleave(per_class)

    # Closed on any exit, so its DataLoader workers stop before the error is reported.
    with closing(run.steps(data)) as steps:
        for step, micro_batches in steps:
            terms = _train_step(run, model, optimizer, micro_batches)
            if terms is None:  # non-finite loss: no update, nothing logged
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used; stepping gives the next one's
            scheduler.step()
            ema.update(run.accelerator.unwrap_model(model, keep_torch_compile=False))
            run.record(step, terms, images=recipe.train.batch_size, lr=lr)
            if run.due(step, recipe.train.sample_every):
                run.write_samples(
                    step,
                    lambda: (_preview(run.eval_model(ema), recipe, tok, stats, preview_labels), per_class),
                )
    return run.final_checkpoint


def _pin_tokenizer(run: TrainingRun, tok: LoadedTokenizer) -> None:
    """A resumed tokenizer run must not prune the checkpoint this generator depends on: the main process
    pins it, with this run's own line, taken back if the run fails at once (its folder removed)."""
    run_dir = run.run_dir
    if run.is_main and ckpt.pin_checkpoint(tok.path, run_dir):
        run.on_removed.append(lambda: ckpt.unpin_checkpoint(tok.path, run_dir))


def _recorded_images(resumed: Path) -> str:
    """The digest of the images the run resumed from `resumed` was trained on ("" when it recorded none)."""
    return (ckpt.load_meta(resumed).get("tokenizer") or {}).get("images_digest") or ""


def _built_model(recipe: GeneratorRecipe, tok: LoadedTokenizer) -> nn.Module:
    """`build_generator` with the same initial weights on every process, the global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        # The same initial weights on every process, from the CPU generator only (the model is built
        # there): torch.manual_seed would also give every GPU the same random stream.
        torch.default_generator.manual_seed(recipe.train.seed)
        return build_generator(recipe, tok.model.class_embed)


def _keep_what_training_uses(tok: LoadedTokenizer, weights: str, is_main: bool) -> None:
    """Once the tokens are cached, the tokenizer's encoder is used no more: only the main process decodes
    (its previews), and the generator holds its own copy of the class table (`build_generator`). So the
    encoder goes in every process, and the decoder too in the others, whose rest goes back to the CPU:
    their GPUs hold the generator alone. SMAP-B's encoder is 0.34 GB in fp32, its decoder 1.2 GB.

    On the CPU the weights are views of the checkpoint's file mapping (`tokenizer_model`), which any one
    of them keeps whole, with the encoder's pages that the tokenizing read: they are mapped afresh first,
    so that those pages go too (`_mapped_afresh`)."""
    if next(tok.model.parameters()).device.type == "cpu":
        tok.model = _mapped_afresh(tok, weights)
    tok.model.drop("encoder", *(() if is_main else ("decoder",)))
    if not is_main:
        tok.model.cpu()


def _mapped_afresh(tok: LoadedTokenizer, weights: str) -> nn.Module:
    """tok.model with its `weights` mapped again from its checkpoint, while that still holds the weights
    it was loaded with (the same fingerprint; pinned, `_pin_tokenizer`), else tok.model as it is. A
    checkpoint removed or replaced during the tokenizing (by hand, or on storage no pin is written to)
    would end the run once its tokens are cached, or have its previews decode with other weights: the weights
    loaded before, still mapped, are those of the tokens."""
    try:
        if fingerprint(tok.path, weights) == tok.fingerprint:
            return tokenizer_model(tok.model.cfg, tok.path, weights)
    except (OSError, UserError):  # (gone meanwhile: its meta.json, or weights that no longer fit)
        pass
    log.info("%s: not the checkpoint it was any more; the tokenizer's weights stay as loaded", tok.path)
    return tok.model


def _training_tokens(
    recipe: GeneratorRecipe, tok: LoadedTokenizer, run, resumed_images: str | None = None
) -> tuple[LatentDataset, LatentStats | None, str]:
    """The cached tokens as a dataset (continuous ones normalised per channel), their statistics (None
    for discrete indices) and the digest of a folder's images (`LatentCache.images`, "" for an embedded
    dataset). Resuming (`resumed_images`: the digest the run recorded), a folder whose images are no
    longer the run's is refused."""
    dataset, held_out = images_to_tokenize(recipe, tok)
    cache = load_or_build_latents(
        tok,
        dataset,
        recipe.latents.hflip,
        recipe.latents.batch_size,
        run.accelerator.device,
        held_out,
        resumed_images=resumed_images,
        processes=run.accelerator,  # all of them tokenize their share
    )
    stats = None if cache.discrete else LatentStats.of(cache.tokens)
    if run.is_main:
        _warn_of_classes_without_tokens(cache.labels, tok.class_names, dataset)
    return LatentDataset(cache.tokens, cache.labels, stats), stats, cache.images


def _warn_of_classes_without_tokens(labels: torch.Tensor, class_names: list[str], dataset: str) -> None:
    """A class with no image among the tokens (an empty class folder is still a class) is learned from
    nothing: its samples are drawn, and scored, like any other's without a word."""
    counts = torch.bincount(labels[labels >= 0].long(), minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts.tolist(), strict=False) if n == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        log.warning(
            "%d of the %d classes have no image in %s: %s; the generator learns nothing of them, and their "
            "samples show it",
            len(empty),
            len(class_names),
            dataset,
            shown,
        )


def _check_same_images(checkpoint: Path | None, digest: str) -> None:
    """--resume: the tokens are of the images the run started on, whether their cache was kept or made
    again since (a digest recorded by the run and one of the cache; "" where there is none)."""
    if checkpoint is None:
        return
    saved = (ckpt.load_meta(checkpoint).get("tokenizer") or {}).get("images_digest")
    if saved and digest and saved != digest:
        raise UserError(
            f"--resume: {checkpoint} was trained on the tokens of other images (the folder has changed"
            " since, and its token cache was made again); the run must go on with the tokens it started"
            " on: restore the images, or start a new run with another --out"
        )


def images_to_tokenize(recipe: GeneratorRecipe, tok: LoadedTokenizer) -> tuple[str, float]:
    """(dataset, held-out fraction left out) of the images to tokenize: latents.dataset as named, or by
    default the tokenizer's own training images (without its held-out split)."""
    if recipe.latents.dataset is not None:
        return recipe.latents.dataset, 0.0
    return tokenizer_training_data(tok.recipe.data)


def _tokenizer_meta(tok: LoadedTokenizer, recipe: GeneratorRecipe, run_dir: Path) -> dict:
    """How `load_generator` finds the tokenizer again: its absolute checkpoint folder, the same folder
    relative to the generator's run folder (`from_run`: found again when both runs moved together, to
    another machine say), the weights file and the fingerprint of those weights (a replaced or retrained
    tokenizer is refused); and which images its tokens are of (`dataset_key`), for --resume."""
    path = Path(tok.path).resolve()
    try:
        from_run = os.path.relpath(path, Path(run_dir).resolve())
    except ValueError:  # on another drive (Windows): no relative path, the absolute one only
        from_run = None
    return {
        "path": str(path),
        "from_run": from_run,
        "fingerprint": tok.fingerprint,
        "weights": recipe.latents.tokenizer_weights,
        "images": dataset_key(*images_to_tokenize(recipe, tok)),
    }


def tokenizer_of_the_resumed_run(recipe: GeneratorRecipe, run_dir: Path) -> GeneratorRecipe:
    """--resume with a latents.tokenizer that no longer exists (the run's own recipe.yaml after the
    tokenizer and generator runs moved together, say): the recipe on the tokenizer the run's newest
    checkpoint was trained on, where `its_tokenizer_path` finds it (its recorded place, else the same
    place relative to the run), as sampling finds it; a one-line error naming the key when it is in
    neither. Unchanged when latents.tokenizer exists or the run has no checkpoint. The fingerprint is
    checked as on every resume (`_check_same_tokenizer`)."""
    if Path(recipe.latents.tokenizer).exists() or not Path(run_dir).is_dir():
        return recipe
    latest = ckpt.latest_checkpoint(run_dir)
    info = ckpt.load_meta(latest).get("tokenizer") if latest is not None else None
    if not info or not info.get("path"):
        return recipe
    found = its_tokenizer_path(latest, info, option="--set latents.tokenizer=FOLDER")
    log.info(
        "--resume: latents.tokenizer %s does not exist; the run goes on with the tokenizer it was trained"
        " on, found at %s",
        recipe.latents.tokenizer,
        found,
    )
    resumed = copy.deepcopy(recipe)
    resumed.latents.tokenizer = str(found)
    return resumed


def _tokenizer_to_load(recipe: GeneratorRecipe, run_dir: Path, resume: bool) -> str | Path:
    """latents.tokenizer; on --resume of a run trained on a checkpoint of that tokenizer run, that very
    checkpoint. A run folder means its newest checkpoint, which a resumed tokenizer training moves on,
    and the run's own resume command would then be refused (the generator's checkpoint is pinned, so
    kept)."""
    given = Path(recipe.latents.tokenizer)
    latest = ckpt.latest_checkpoint(run_dir) if resume and Path(run_dir).is_dir() else None
    if latest is None:
        return given
    recorded = (ckpt.load_meta(latest).get("tokenizer") or {}).get("path")
    if not recorded or not ckpt.is_complete(recorded):
        return given  # moved or deleted: the checks on what latents.tokenizer gives say so
    recorded = Path(recorded)
    if recorded.parent.resolve() == (given / ckpt.CHECKPOINTS).resolve():
        newest = ckpt.latest_checkpoint(given)
        if newest is not None and newest.resolve() != recorded.resolve():
            log.info(
                "%s: resuming on %s, the checkpoint it was trained on (%s is newer)",
                run_dir,
                recorded,
                newest.name,
            )
        return recorded
    return given


def _check_same_tokenizer(checkpoint: Path | None, tok: LoadedTokenizer, recipe: GeneratorRecipe) -> None:
    """--resume: the run must continue on the tokens it started on: the same tokenizer, images and flips
    (the sample stream's position and the latent statistics refer to them); and with the class table it
    started with (`class_embed`: the restored weights hold it, a new value would only mislabel the run)."""
    if checkpoint is None:
        return
    meta = ckpt.load_meta(checkpoint)
    then = (meta.get("recipe") or {}).get("class_embed")
    if then is not None and then != recipe.class_embed:  # the restored weights hold the table it began with
        raise UserError(
            f"--resume: class_embed was {then!r} in {checkpoint}, the recipe says {recipe.class_embed!r};"
            " the run goes on with the class table it started with (use another --out)"
        )
    saved = (meta.get("tokenizer") or {}).get("fingerprint")
    weights = (meta.get("tokenizer") or {}).get("weights")
    if saved != tok.fingerprint and weights is not None and weights != recipe.latents.tokenizer_weights:
        raise UserError(  # the same checkpoint, its other weights: say which setting changed
            f"--resume: latents.tokenizer_weights was {weights!r} in {checkpoint}, the recipe says "
            f"{recipe.latents.tokenizer_weights!r}; the run must go on with the tokens it started on "
            "(use another --out)"
        )
    if saved != tok.fingerprint:
        raise UserError(
            f"--resume: {checkpoint} was trained on tokenizer {saved}, but latents.tokenizer "
            f"({tok.path}) is now {tok.fingerprint}; use another --out"
        )
    latents = (meta.get("recipe") or {}).get("latents") or {}
    for key in ("dataset", "hflip"):
        then, now = latents.get(key), getattr(recipe.latents, key)
        if key == "dataset" and then is not None and now is not None:  # an older run's may be relative
            then, now = dataset_key(then), dataset_key(now)
        if key in latents and then != now:
            raise UserError(
                f"--resume: latents.{key} was {latents[key]!r} in {checkpoint}, the recipe says "
                f"{getattr(recipe.latents, key)!r}; the run must go on with the tokens it started on "
                "(use another --out)"
            )
    # Runs from before "images" was recorded tokenized the whole of latents.dataset (or of the
    # tokenizer's data.dataset), its held-out split included.
    saved_images = meta["tokenizer"].get(
        "images", dataset_key(latents.get("dataset") or tok.recipe.data.dataset)
    )
    images = dataset_key(*images_to_tokenize(recipe, tok))
    if saved_images != images:
        raise UserError(
            f"--resume: {checkpoint} was trained on the tokens of {saved_images}, this recipe gives those of "
            f"{images}; the run must go on with the tokens it started on (use another --out)"
        )


def _train_step(run, model, optimizer, micro_batches) -> dict | None:
    """One optimiser step over its micro-batches -> {"loss": mean over them}, or None when a non-finite
    loss or gradient skipped the step (the gradients of the micro-batches before it are dropped)."""
    total, skipped = 0.0, False
    for tokens, labels in micro_batches:
        # Every micro-batch enters `accumulate`, skipped or not, so accelerate's count stays in step
        # with ours and the last one of each step is the one that syncs.
        with run.accelerator.accumulate(model):
            if skipped:
                continue
            with run.accelerator.autocast():
                loss = model(tokens, labels).loss
            if not run.check_finite(loss):
                skipped = True
                continue
            run.accelerator.backward(loss)
            if not run.clip_and_step((model, optimizer)):
                skipped = True
                continue
            total = total + loss.detach().float()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        return None
    return {"loss": total / len(micro_batches)}


@torch.no_grad()
def generate(
    model: nn.Module,
    recipe: GeneratorRecipe,
    labels: torch.Tensor,
    generator=None,
    on_step=None,
    num_tokens: int | None = None,
    **overrides,
):
    """Tokens for `labels` (B,) with the recipe's sampling settings (`overrides`, SamplingConfig fields,
    win): (B, k, C) or (B, k), k = `num_tokens` (default K). An override the generator family does not
    use is an error (`unused_sampling_settings`). `on_step()` after each of the `sampling_steps` (a
    progress bar's)."""
    unused = unused_sampling_settings(recipe.model.kind, overrides)
    if unused:
        raise ValueError(f"a {recipe.model.kind} generator does not use {', '.join(unused)}")
    s = {**vars(recipe.sample), **overrides}
    kind = recipe.model.kind
    common = dict(
        labels=labels,
        cfg_scale=s["cfg_scale"],
        cfg_schedule=s["cfg_schedule"],
        temperature=s["temperature"],
        num_tokens=num_tokens,
        generator=generator,
        on_step=on_step,
    )
    try:
        if kind == "card":
            tokens = model.sample(**common, steps=s["steps"], method=s["method"])
        elif kind == "llamagen":
            tokens = model.sample(**common, top_k=s["top_k"], top_p=s["top_p"])
        else:
            tokens = model.sample(**common, steps=s["steps"], choice_temperature=s["choice_temperature"])
    except RuntimeError as e:  # torch.multinomial of nan or inf probabilities
        if "probability tensor contains" not in str(e):
            raise
        raise NotFiniteSamples("its token probabilities") from None
    if tokens.is_floating_point() and not bool(torch.isfinite(tokens).all()):  # one sync per batch
        raise NotFiniteSamples("its tokens")  # decoded, they would be black images
    return tokens


def sampling_steps(recipe: GeneratorRecipe, num_tokens: int | None = None, **overrides) -> int:
    """How many steps `generate` takes (with the same arguments): a token each for CARD and LlamaGen
    (section 3.3), MaskGIT's decoding steps (at most one a token)."""
    from smapctl.models.maskgit import masked_counts

    s = {**vars(recipe.sample), **overrides}
    k = recipe.model.num_tokens if num_tokens is None else num_tokens
    if recipe.model.kind != "maskgit":
        return k
    return len(masked_counts(k, s["steps"])) if k > 0 else 0


class NotFiniteSamples(UserError):
    """Sampling gave inf or nan (`what`): a guidance scale so large that the guided values overflow, a
    temperature far from 1, or a generator whose weights are not finite. `smapctl sample` names those of
    the guidance and temperature that scale the values."""

    def __init__(self, what: str):
        super().__init__(f"sampling gave values that are not finite ({what})")


@torch.no_grad()
def decode_samples(tok: LoadedTokenizer, tokens: torch.Tensor, labels: torch.Tensor, stats) -> torch.Tensor:
    """A generator's tokens (indices (B, k), or latents (B, k, C) normalised with `stats`), labels (B,) ->
    images (B, 3, H, W) clamped to [-1, 1], through the tokenizer's decoder (`decode_tokens`)."""
    from smapctl.ops.decode import decode_tokens

    latents = tokens if not tokens.is_floating_point() else stats.denormalize(tokens)
    return decode_tokens(tok.model, latents, labels).clamp(-1, 1)


def _preview(model, recipe, tok, stats, labels) -> torch.Tensor:
    """The sample grid of a training run: two images per class for the first classes (B, 3, H, W)."""
    from smapctl.progress import progress

    device = next(model.parameters()).device
    labels = labels.to(device)
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the run's RNG is untouched
    # Token by token, then a decode, with a bar: CARD-B's end-of-run grid takes 4 min 44 s on a CPU.
    try:
        with progress(sampling_steps(recipe) + 1, "the sample grid", "steps") as bar:
            tokens = generate(model, recipe, labels, generator=g, on_step=lambda: bar.update(1))
            images = decode_samples(tok, tokens, labels, stats)
            bar.update(1)
    except NotFiniteSamples as e:  # a preview does not stop the run (training checks its own losses)
        log.warning(
            "the sample grid: %s (sample.cfg_scale %g too large, or weights that are not finite); it is left"
            " black",
            e, recipe.sample.cfg_scale,
        )  # fmt: skip
        size = tok.model.cfg.image_size
        return torch.full((len(labels), 3, size, size), -1.0, device=device)
    return images


def its_tokenizer_path(path: Path, info: dict, given=None, option: str = "--tokenizer") -> Path:
    """Where the tokenizer of the generator checkpoint `path` is now (`info`: its meta's `tokenizer`):
    `given` when the user names it (a checkpoint folder; a run folder means its checkpoint of the
    recorded name when it has one, else its newest); else the folder recorded in training while it is
    there; else the same place relative to the generator's run folder as in training (the two runs moved
    together). A one-line error naming `option` when none is there. The caller checks the fingerprint."""
    recorded = Path(info["path"])
    if given is not None:
        return ckpt.same_step(Path(given).expanduser(), recorded)
    if recorded.exists():
        return recorded
    run = ckpt.run_of(path)
    if run is not None and info.get("from_run"):
        moved = (run / info["from_run"]).resolve()
        if moved.exists():
            log.info("%s: its tokenizer is not at %s any more; found it at %s", path, recorded, moved)
            return moved
    raise UserError(
        f"{path}: its tokenizer {recorded} no longer exists (moved or deleted?); name its new place with "
        f"{option} (the run or checkpoint folder: the very tokenizer the generator was trained on)"
    )


def its_tokenizer(path: Path, info: dict, given=None, option: str = "--tokenizer") -> tuple[Path, dict]:
    """The checkpoint folder and meta.json of the tokenizer the generator checkpoint `path` was trained on
    (`its_tokenizer_path`), refused unless its weights have the fingerprint the generator recorded: told
    before any weights are loaded (or a reference classifier trained)."""
    found = its_tokenizer_path(path, info, given, option)
    where = f"{path}: its tokenizer {found}" if given is None else f"{option} {given}"
    trained_on = f"; the generator was trained on its {info['weights']} weights: name the checkpoint folder"
    try:
        folder, meta = open_checkpoint(
            found, "tokenizer", option, weights=info["weights"], weights_hint=trained_on
        )
    except UserError as e:
        raise UserError(f"{where} cannot be loaded: {e}") from None
    missing = ckpt.missing_weights(folder, info["weights"])
    if missing is not None:  # its fingerprint (of the file's size) differs too: said as "replaced"
        raise UserError(f"{where} cannot be loaded: {missing}")
    got = fingerprint(folder, info["weights"])
    if got != info["fingerprint"]:
        what = "the tokenizer was replaced or retrained; put the original back"
        if given is not None:
            what = f"not the tokenizer {path} was trained on (or one retrained since)"
        raise UserError(
            f"{where} has fingerprint {got}, but the generator was trained on {info['fingerprint']}: {what}"
        )
    return folder, meta


def _load_its_tokenizer(path: Path, info: dict, device, given=None, option="--tokenizer") -> LoadedTokenizer:
    """The tokenizer a generator checkpoint was trained on (`its_tokenizer`), loaded on `device`; `given`
    one loaded already (the API's `tokenizer=`) is used as it is when it is that tokenizer, on `device`
    (the generator holds a copy of its class embedding, `build_generator`: it is not changed)."""
    if isinstance(given, LoadedTokenizer):
        if given.fingerprint != info["fingerprint"]:
            raise UserError(
                f"{option} {given.path} has fingerprint {given.fingerprint}, but the generator was trained"
                f" on {info['fingerprint']} (its {info['weights']} weights): not the tokenizer {path} was"
                " trained on, or loaded with its other weights"
            )
        if same_device(next(given.model.parameters()).device, device):
            return given
        given = given.path.absolute()  # on another device: loaded again there
    folder, _ = its_tokenizer(path, info, given, option)
    try:
        return load_tokenizer(folder, info["weights"], device)
    except UserError as e:  # (a weights file missing, say)
        where = f"{path}: its tokenizer {folder}" if given is None else f"{option} {given}"
        raise UserError(f"{where} cannot be loaded: {e}") from None


def load_generator(
    spec,
    device="cpu",
    weights: str = "ema",
    weights_hint: str = _SAMPLED_WITH_EMA,
    tokenizer=None,
    tokenizer_option: str = "--tokenizer",
):
    """A trained generator from a run or checkpoint folder -> `LoadedGenerator`;
    `weights_hint` as `open_checkpoint` takes it (by default for the commands, which sample with EMA);
    `tokenizer`: where the tokenizer it was trained on is now, if it moved (`its_tokenizer_path`; the
    option that gave it is `tokenizer_option`)."""
    from smapctl.ops.load import LoadedGenerator, checkpoint_recipe

    path, meta = open_checkpoint(spec, "generator", weights=weights, weights_hint=weights_hint)
    recipe = checkpoint_recipe(GeneratorRecipe, path, meta)
    tok = _load_its_tokenizer(path, meta["tokenizer"], device, tokenizer, tokenizer_option)
    with torch.device("meta"):
        model = build_generator(recipe, tok.model.class_embed)
    ckpt.load_weights_into(model, path, weights, assign=True)
    fill_rotary_tables(model, "cpu")  # buffers that checkpoints do not hold are computed, not loaded
    stats = LatentStats.from_meta(meta["latent_stats"]) if meta["latent_stats"] is not None else None
    return LoadedGenerator(model.to(device).eval(), recipe, tok, stats, path)
