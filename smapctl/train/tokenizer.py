"""One-stage SMAP training (section 4.2, appendix A) on accelerate.

Objective per step: pixel loss + the regularizer's own terms + perceptual loss + adaptive-weight hinge
GAN loss (after `loss.gan_start_step`), with tail token dropping inside the model (eq. 5). The
discriminator is trained with the hinge loss on the same batch.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from smapctl.data.images import BadImageError, to_signed_float
from smapctl.errors import UserError
from smapctl.models.smap import SMAP
from smapctl.recipe import TokenizerRecipe
from smapctl.train import checkpoint as ckpt
from smapctl.train.ema import EMA
from smapctl.train.init import (
    RECORD,
    InitFrom,
    carried_record,
    fresh_class_keys,
    load_discriminator,
    load_init,
    open_shared_init,
    refuse_with_resume,
)
from smapctl.train.losses import (
    adaptive_gan_weight,
    build_discriminator,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
    perceptual_weights_problem,
    pixel_loss,
)
from smapctl.train.resume import check_same_classes
from smapctl.train.run_folder import refuse_run_in_data
from smapctl.train.runner import TrainingRun
from smapctl.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger("smapctl.train")

# Warn when a batch uses fewer codes than this fraction of what it could use (codebook collapse).
COLLAPSE_FRACTION = 0.02
# ... or every image (nearly) the same tokens: under this perplexity per token position, on batches of this
# many images or more. (A VQ or SoftVQ run starts near 1.2-1.4, and a healthy one leaves it: not warned of.)
SAME_TOKENS_PERPLEXITY = 1.05
SAME_TOKENS_STEPS = 50  # ... for this many steps
SAME_TOKENS_BATCH = 4


@dataclass
class TokenizerParts:
    model: SMAP
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    perceptual: nn.Module | None = None
    disc: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None


def build_parts(recipe: TokenizerRecipe) -> TokenizerParts:
    model = SMAP(recipe.model)
    parts = TokenizerParts(
        model=model,
        ema=EMA(model, recipe.train.ema_decay),
        optimizer=build_optimizer(model, recipe.train),
        scheduler=None,  # set below: needs the optimizer
        perceptual=build_perceptual_loss(recipe.loss),
        disc=build_discriminator(recipe.loss),
    )
    parts.scheduler = build_scheduler(parts.optimizer, recipe.train)
    if parts.disc is not None:
        parts.disc_optimizer = build_optimizer(parts.disc, recipe.train, lr=recipe.loss.disc_lr)
        parts.disc_scheduler = build_scheduler(parts.disc_optimizer, recipe.train)
    return parts


def _check_same_data(checkpoint: Path | None, data) -> dict[str, str]:
    """--resume on other images, before they are listed: a built-in set instead of another one or of a
    folder (or the other way), or a held-out folder given or dropped, is refused (otherwise it would go on
    silently, or be refused for a reason about held-out fractions); a folder at a new path can be the same
    images moved, which the listing check compares. Returns such moves, {folder the run started on: now}."""
    from smapctl.data.config import embedded_name

    moved: dict[str, str] = {}
    if checkpoint is None:
        return moved
    saved = (ckpt.load_meta(checkpoint).get("recipe") or {}).get("data") or {}
    for key in ("dataset", "val_dataset"):
        then, now = saved.get(key), getattr(data, key)
        if key not in saved or then == now:
            continue
        folders = then is not None and now is not None and not embedded_name(then) and not embedded_name(now)
        if not folders:
            raise UserError(
                f"--resume: data.{key} was {then!r} in {checkpoint}, the recipe says {now!r}; a resumed run"
                " goes on over the images it started with: use another --out for other data"
            )
        log.info("data.%s: %s (the run started on %s)", key, now, then)
        moved[str(then)] = str(now)
    return moved


def _check_same_images(recipe: TokenizerRecipe, data, then: dict) -> None:
    """--resume on a folder whose images changed since the run started (`then`: its checkpoint's meta):
    refused, as its held-out split would move."""
    from smapctl.data.datasets import DATA_LISTING, check_split_listing
    from smapctl.data.folder import same_classes

    if same_classes(then.get("class_names") or [], data.class_names):  # other classes: `run.start` says
        check_split_listing(
            recipe.data.dataset,
            data.listing,
            then.get(DATA_LISTING),
            "the run started",
            "the run would train on images it held out; restore the folder, or start a new run",
            "resume with --set data.val_fraction={then} (and data.val_dataset=null), or start a new run",
        )


def check_resumed_data(recipe: TokenizerRecipe, checkpoint: Path) -> None:
    """`train-tokenizer --dry-run --resume`: the checks of its data the resumed run makes before it trains
    (the same datasets and discriminator, the same images in a folder), listing files but reading no
    image."""
    from smapctl.data.datasets import build_datasets

    _check_same_data(checkpoint, recipe.data)
    _check_same_gan(checkpoint, recipe.loss)
    data = build_datasets(recipe.data, recipe.model.image_size)
    meta = ckpt.load_meta(checkpoint)
    check_same_classes(checkpoint, meta, data.class_names)  # as `TrainingRun.start` does
    _check_same_images(recipe, data, meta)


def _check_same_gan(checkpoint: Path | None, loss) -> None:
    """--resume and the discriminator: a run without one cannot gain one (said so, not as
    "discriminator.safetensors: not found", which reads as a damaged checkpoint); a run that drops it
    (loss.gan_weight 0) is warned that it is neither trained nor saved from then on, for good."""
    if checkpoint is None:
        return
    had = "discriminator" in ckpt.weight_names(checkpoint)
    if not had and loss.gan_weight > 0:
        raise UserError(
            f"--resume: {checkpoint} was trained without a discriminator (loss.gan_weight 0), and a resume"
            f" cannot add one (loss.gan_weight {loss.gan_weight:g}); go on without it, or start a new run"
            " with the GAN (another --out)"
        )
    if had and loss.gan_weight <= 0:
        log.warning(
            "loss.gan_weight 0: the run's discriminator is left out from now on (not trained, not saved in"
            " its next checkpoints), and a later resume cannot bring it back"
        )


def train_tokenizer(
    recipe: TokenizerRecipe,
    run_dir: Path,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    init_weights: str = "ema",
) -> Path:
    """Train (or resume) the recipe's tokenizer in `run_dir`; returns the final checkpoint's path.
    `init_from`: a run or checkpoint folder whose `init_weights` the new run starts from (`train/init.py`)."""
    refuse_with_resume(init_from, resume)
    problem = perceptual_weights_problem(recipe.loss)  # before the images are listed and the model built
    if problem is not None:
        raise UserError(problem)
    init = None if init_from is None else open_shared_init(init_from, recipe, "tokenizer", init_weights)
    refuse_run_in_data(
        run_dir, {"data.dataset": recipe.data.dataset, "data.val_dataset": recipe.data.val_dataset}
    )
    run = TrainingRun(recipe, run_dir, kind="tokenizer", build_model=lambda: SMAP(recipe.model))
    with run:  # the run folder is let go on any exit (a later run in this process may use it)
        try:
            return _train_in(run, recipe, resume, init)
        except BadImageError as e:  # data.on_error: fail (skipped ones are never raised)
            # Raised by a data worker, torch re-raises it from a frame that keeps it in a local, a cycle
            # that held every frame of the run (its model, optimizer, data) until Python's next full
            # collection; its traceback, which `from None` does not show, is let go.
            e.__traceback__ = None
            raise BadImageError(
                e.path, f"{e.reason}; fix or remove it, or --set data.on_error=skip to leave such images out"
            ) from None


def _train_in(run: TrainingRun, recipe: TokenizerRecipe, resume: bool, init: InitFrom | None) -> Path:
    """`train_tokenizer`'s work in its TrainingRun."""
    data, skips = _checked_data(run, recipe, resume)
    parts = _built_parts(recipe)
    record = carried_record(run.run_dir, resume)
    if init is not None:
        _start_from(parts, recipe, init, data.class_names)
        record = init.record()
    _start_run(run, parts, data, resume, record)
    nets = _prepared(run, recipe, parts)
    collapse = CollapseWatch(recipe)
    preview = None  # only the main process draws the sample grids (and reads their images)
    if run.is_main:
        with run.own_rng():
            preview = _preview_batch(data.val if len(data.val) else data.train)

    # Closed on any exit, so its DataLoader workers stop before the error is reported.
    with closing(run.steps(data.train)) as steps:
        for step, micro_batches in steps:
            terms = _train_step(run, recipe, parts, nets, micro_batches, step)
            if terms is None:  # non-finite loss or gradients: no update, nothing logged
                continue
            lr = _step_schedulers(parts)
            parts.ema.update(run.accelerator.unwrap_model(nets.model, keep_torch_compile=False))
            run.record(step, terms, images=recipe.train.batch_size, lr=lr)
            if run.due(step, recipe.train.sample_every):
                # One row of originals, then one row a prefix (the default near-square grid breaks the
                # rows for every K but 16 and 32); only the main process holds `preview`.
                run.write_samples(
                    step, lambda: (_preview_panel(parts, recipe, preview, run), len(preview[0]))
                )
                run.log_eval(step, lambda: _validate(parts, recipe, data.val, run))
            if "perplexity" in terms and run.is_main and run.due(step, recipe.train.log_every):
                collapse.check(terms, micro_batches[0][0].shape[0], step)
    _report_skipped(skips, run.is_main)
    return run.final_checkpoint


def _checked_data(run: TrainingRun, recipe: TokenizerRecipe, resume: bool):
    """(the `Datasets`, the log of skipped images or None), once a resumed run is known to go on with the
    same data and GAN set-up."""
    from smapctl.data.skipped import SKIPPED_FILE, attach_skip_log

    latest = run.check_resume(resume)
    moved = _check_same_data(latest, recipe.data)
    _check_same_gan(latest, recipe.loss)
    data = _datasets(run, recipe, latest)
    # data.on_error: skip: every process and DataLoader worker lists what it skips in one file.
    fresh = not resume and run.is_main
    skips = attach_skip_log([data.train, data.val], run.run_dir / SKIPPED_FILE, fresh=fresh)
    if skips is not None:
        skips.moved = moved  # the earlier sessions' lines name a moved folder's images where they were
    return data, skips


def _built_parts(recipe: TokenizerRecipe):
    """`build_parts` with the same initial weights on every process, the global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        # The same initial weights on every process (and whatever the data set-up drew). The CPU generator
        # only (the model is built there): torch.manual_seed would also give every GPU the same seed.
        torch.default_generator.manual_seed(recipe.train.seed)
        return build_parts(recipe)


def _start_from(parts: TokenizerParts, recipe: TokenizerRecipe, init: InitFrom, class_names) -> None:
    """The new run's weights from `init`'s (the class embedding anew for other classes), its EMA
    from the same weights, its discriminator from the checkpoint's when that fits."""
    load_init(parts.model, init, keep=fresh_class_keys(init, parts.model, class_names))
    parts.ema = EMA(parts.model, recipe.train.ema_decay)
    load_discriminator(parts.disc, init, recipe.loss)


def _start_run(run: TrainingRun, parts, data, resume: bool, record: dict | None = None) -> None:
    """`run.start` with the weights and optimizers to checkpoint (the discriminator's when there is one);
    `record`: where a run started with --init-from began, kept in its checkpoints."""
    from smapctl.data.datasets import DATA_LISTING

    weights = {"model": parts.model, "ema": parts.ema}
    optimizers = {"optimizer": parts.optimizer, "scheduler": parts.scheduler}
    if parts.disc is not None:
        weights["discriminator"] = parts.disc
        optimizers |= {"disc_optimizer": parts.disc_optimizer, "disc_scheduler": parts.disc_scheduler}
    meta = {DATA_LISTING: data.listing} if data.listing is not None else {}
    if record is not None:
        meta[RECORD] = record
    run.start(weights, optimizers, resume=resume, class_names=data.class_names, meta=meta)


def _prepared(run: TrainingRun, recipe: TokenizerRecipe, parts) -> Prepared:
    """The model, the discriminator and their optimizers as `accelerate` prepares them; the perceptual
    network on the run's device."""
    if recipe.train.compile and parts.disc is not None and recipe.loss.gan_adaptive_weight:
        # VQGAN's adaptive weight (losses.adaptive_gan_weight) takes two gradients with retain_graph=True,
        # which a compiled backward with donated buffers refuses (the run would crash when the GAN starts).
        torch._functorch.config.donated_buffer = False
    nets = Prepared(*run.prepare(parts.model, parts.optimizer))
    if parts.disc is not None:
        nets.disc, nets.disc_optimizer = run.prepare(parts.disc, parts.disc_optimizer)
    if parts.perceptual is not None:
        parts.perceptual.to(run.accelerator.device)
    return nets


def _step_schedulers(parts) -> float:
    """The learning rate the step just taken used; the schedulers stepped to the next step's."""
    lr = parts.scheduler.get_last_lr()[0]  # the rate this step used; stepping gives the next one's
    parts.scheduler.step()
    if parts.disc_scheduler is not None:
        with warnings.catch_warnings():
            # The discriminator idles until loss.gan_start_step while its schedule follows the
            # global step; torch would warn that its optimizer has not stepped yet.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            parts.disc_scheduler.step()
    return lr


def _datasets(run: TrainingRun, recipe: TokenizerRecipe, latest: Path | None):
    """The training and held-out images (`Datasets`), checked against the model's classes and against
    the images a resumed run started with; warns of a held-out split that is not what the recipe says."""
    from smapctl.data.config import EMBEDDED_DATASETS, DataConfig
    from smapctl.data.datasets import build_datasets, class_count_problem
    from smapctl.data.folder import empty_split_reason

    data = build_datasets(recipe.data, recipe.model.image_size)
    if run.accelerator.num_processes > 1:
        from smapctl.launch import check_same_images

        check_same_images(data.train, f"training images in {recipe.data.dataset}")
    if recipe.data.val_fraction != DataConfig.val_fraction:
        if recipe.data.dataset in EMBEDDED_DATASETS:
            why = f"on {recipe.data.dataset}, whose held-out split is fixed"
        elif recipe.data.val_dataset is not None:
            why = "with data.val_dataset, which holds the held-out images"
        else:
            why = None
        if why:
            log.warning("data.val_fraction %g: no effect %s", recipe.data.val_fraction, why)
    folder_split = recipe.data.dataset not in EMBEDDED_DATASETS and recipe.data.val_dataset is None
    if folder_split and recipe.data.val_fraction > 0 and len(data.val) == 0 and run.is_main:
        log.warning(
            "%s: no image held out (%s): no validation, and `evaluate` needs --data",
            recipe.data.dataset,
            empty_split_reason(recipe.data.val_fraction),
        )
    if folder_split and len(data.val) and run.is_main:
        _warn_of_held_out_classes(recipe.data, data)
    _check_same_images(recipe, data, ckpt.load_meta(latest) if latest is not None else {})
    problem = class_count_problem(recipe.data, recipe.model.num_classes, len(data.class_names))
    if problem is not None:
        raise UserError(problem)
    return data


def _warn_of_held_out_classes(cfg, data) -> None:
    """A class whose every image the folder's held-out split took (round(val_fraction x its size) is all
    of a class of 1 image at 0.5): the tokenizer, and a generator on its training images' tokens, would
    never see it, and its class embedding would stay as initialised."""
    import numpy as np

    from smapctl.data.folder import shown_classes

    trained = np.bincount(data.train.labels, minlength=len(data.class_names))
    held = np.bincount(data.val.labels, minlength=len(data.class_names))
    gone = [name for name, t, h in zip(data.class_names, trained, held, strict=True) if h and not t]
    if gone:
        shown = shown_classes(gone, 5)
        log.warning(
            "data.val_fraction %g holds out every image of %d class(es) of %s (%s): training never sees"
            " them; lower it, or give the held-out images a folder of their own (data.val_dataset)",
            cfg.val_fraction, len(gone), cfg.dataset, shown,
        )  # fmt: skip


def _report_skipped(skips, is_main: bool) -> None:
    """One warning at the end of the run: how many unreadable images the run left out, and where they
    are listed (all of them, over every session of a resumed run)."""
    from smapctl.data.skipped import skip_summary

    errors = skips.read_and_tidy() if skips is not None and is_main else []
    if errors:
        log.warning("%s", skip_summary(errors, skips.path))


@dataclass
class Prepared:
    """The modules and optimizers as `accelerator.prepare` returned them (DDP-wrapped when distributed)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    disc: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None


def _train_step(run, recipe, parts, nets: Prepared, micro_batches, step) -> dict | None:
    """One optimiser step over its micro-batches -> the loss terms averaged over them, or None when a
    non-finite loss or gradient skipped the step (the gradients of the micro-batches before it are
    dropped)."""
    sums, skipped = {}, False
    modules = [nets.model] + ([nets.disc] if nets.disc is not None else [])
    for frames, labels in micro_batches:
        # Every micro-batch enters `accumulate`, skipped or not, so accelerate's count of micro-batches
        # stays in step with ours and the last one of each step is the one that syncs.
        with run.accelerator.accumulate(*modules):
            if skipped:
                continue
            images = to_signed_float(frames)  # the loader moves uint8 frames; float32 in [-1, 1] from here on
            terms = _tokenizer_step(run, recipe, parts, nets, images, labels, step)
            if terms is None:
                skipped = True
                continue
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
    if skipped:
        nets.optimizer.zero_grad(set_to_none=True)
        if nets.disc_optimizer is not None:
            nets.disc_optimizer.zero_grad(set_to_none=True)
        return None
    return {k: v / len(micro_batches) for k, v in sums.items()}


def _tokenizer_step(run, recipe, parts, nets: Prepared, images, labels, step) -> dict | None:
    """Forward, losses, backward and (on the last micro-batch) the optimiser steps of one micro-batch;
    None when the loss is not finite (nothing is back-propagated) or its gradients are not (no update)."""
    acc, lc = run.accelerator, recipe.loss
    use_gan = nets.disc is not None and step >= lc.gan_start_step
    with acc.autocast():
        out = nets.model(images, labels)
        recon = out.recon.float()
        rec = lc.pixel_weight * pixel_loss(lc.pixel, recon, images)
        terms = {"pixel": rec.detach()}
        if parts.perceptual is not None:
            perceptual = parts.perceptual(recon, images)
            rec = rec + lc.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        loss = rec + out.reg.loss
        watched = loss.detach()
        if use_gan:
            # The generator's GAN term goes through the bare discriminator with its weights frozen, so
            # no discriminator gradient (and no DDP reduction) comes from it.
            bare = acc.unwrap_model(nets.disc, keep_torch_compile=False).requires_grad_(False)
            g_loss = hinge_g_loss(bare(recon))
            bare.requires_grad_(True)
            last = acc.unwrap_model(nets.model, keep_torch_compile=False).decoder.to_pixels.weight
            # fp16: the loss scale, as a tensor on the device (`get_scale()` would wait for the GPU)
            scale = acc.scaler.scale(rec.new_ones(())) if acc.scaler is not None else 1.0
            weight = (
                adaptive_gan_weight(rec, g_loss, last, loss_scale=scale)
                if lc.gan_adaptive_weight
                else g_loss.new_ones(())
            )
            loss = loss + lc.gan_weight * weight * g_loss
            # The discriminator judges real and reconstructed images in one call (one DDP forward).
            real_logits, fake_logits = nets.disc(torch.cat([images, recon.detach()])).chunk(2)
            d_loss = hinge_d_loss(real_logits, fake_logits)
            watched = loss.detach() + d_loss.detach()
            terms |= {"g_loss": g_loss.detach(), "gan_adaptive_weight": weight, "d_loss": d_loss.detach()}
    if not run.check_finite(watched):
        return None
    acc.backward(loss)
    pairs = [(nets.model, nets.optimizer)]
    if use_gan:
        acc.backward(d_loss)
        pairs.append((nets.disc, nets.disc_optimizer))
    if not run.clip_and_step(*pairs):  # non-finite gradients: neither steps
        return None
    terms |= {"loss": loss.detach(), "reg": out.reg.loss.detach(), "keep": out.keep.float().mean()}
    terms |= {k: v for k, v in out.reg.stats.items()}
    return terms


class CollapseWatch:
    """The "codebook collapse?" warnings, checked on the logged rows (`check`; `batch` is the per-process
    micro-batch, on which the perplexities are measured): few codes in all, at once; or every image the
    same tokens (one code per position: a pooled perplexity of K hides it), once it has lasted
    SAME_TOKENS_STEPS steps (a run starts so: its encoder gives every image nearly the same latents). Each
    is said once per time it happens (said at every logged row while the collapse lasts, the first would
    make 1,000 lines over 100,000 steps at `log_every: 100`)."""

    def __init__(self, recipe: TokenizerRecipe):
        self.recipe = recipe
        self.few_said = False  # the few-codes warning of the current stretch of such rows is given
        self.same_since: int | None = None  # the first logged step of the current stretch of same tokens
        self.said = False

    def check(self, terms: dict, batch: int, step: int) -> None:
        codebook = self.recipe.model.regularizer.codebook_size
        possible = min(codebook, batch * self.recipe.model.num_latent_tokens)
        few = float(terms["perplexity"]) < COLLAPSE_FRACTION * possible
        if few and not self.few_said:
            log.warning(
                "step %d: codebook collapse? its batch's perplexity %.1f of a possible %d (usage %.1f%%); if "
                "it stays, try a lower train.lr or a smaller model.regularizer.codebook_size or token_dim",
                step + 1,
                float(terms["perplexity"]),
                possible,
                100 * float(terms["usage"]),
            )
        self.few_said = few
        per_position = float(terms["position_perplexity"])
        if batch < SAME_TOKENS_BATCH or per_position >= SAME_TOKENS_PERPLEXITY:
            self.same_since, self.said = None, False
            return
        if self.same_since is None:
            self.same_since = step
        if not self.said and step - self.same_since >= SAME_TOKENS_STEPS:
            log.warning(
                "step %d: codebook collapse? every image of a batch has had the same tokens since step %d "
                "(perplexity %.2f per token position, of a possible %d), so the same reconstruction; try a "
                "larger encoder (model.enc_width, model.enc_depth) or model.regularizer.kind softvq",
                step + 1,
                self.same_since + 1,
                per_position,
                min(codebook, batch),
            )
            self.said = True


def _preview_batch(dataset, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n held-out images for the sample grids: the first image of each class (of as many classes
    as fit), then the earliest others, in dataset order. Chosen by the labels, without reading an image:
    scanning the first 50 n images for n classes left the grid short (a single image from a folder
    sorted by class, fewer from one with an empty class folder)."""
    labels = dataset.labels.tolist()
    firsts = sorted({label: i for i, label in reversed(list(enumerate(labels)))}.values())[:n]
    taken = set(firsts)
    others = list(islice((i for i in range(len(labels)) if i not in taken), n - len(firsts)))
    images, picked_labels = zip(*(dataset[i] for i in sorted(firsts + others)), strict=True)
    images = torch.stack(images)
    # The training split (the fallback when nothing is held out) yields uint8 frames.
    return to_signed_float(images) if images.dtype == torch.uint8 else images, torch.tensor(picked_labels)


def preview_prefixes(K: int) -> list[int]:
    """k = 0, then powers of two up to K (always ending at K): the prefix sweep of figure 1."""
    ks, k = [0], 1
    while k < K:
        ks.append(k)
        k *= 2
    return [*ks, K]


@torch.no_grad()
def _preview_panel(parts: TokenizerParts, recipe: TokenizerRecipe, preview, run) -> torch.Tensor:
    """Rows: originals, then the EMA model's reconstructions at each prefix k of `preview_prefixes`."""
    from smapctl.progress import progress

    model = run.eval_model(parts.ema)
    images, labels = (t.to(run.accelerator.device) for t in preview)
    ks = preview_prefixes(recipe.model.num_latent_tokens)
    # An encode (eq. 3) and a decode (eq. 4) a prefix: minutes for SMAP-B on a CPU, silent before.
    with progress(len(ks) + 1, "the sample grid", "passes") as bar:
        z = model.encode(images, labels).z  # (B, K, C)
        bar.update(1)
        rows = [images]
        for k in ks:
            rows.append(model.decode(z[:, :k], labels))  # (B, 3, S, S)
            bar.update(1)
    return torch.cat(rows).clamp(-1, 1)


@torch.no_grad()
def _validate(parts: TokenizerParts, recipe: TokenizerRecipe, val, run, limit: int = 256) -> dict:
    """Held-out PSNR of the EMA model at k = 0, K/4, K/2 and K on up to `limit` images."""
    from smapctl.eval.metrics import psnr
    from smapctl.progress import progress

    if len(val) == 0:
        return {}
    model = run.eval_model(parts.ema)
    K = recipe.model.num_latent_tokens
    ks = sorted({0, K // 4, K // 2, K})
    sums = dict.fromkeys(ks, 0.0)
    n = 0
    batch = 64
    loader = torch.utils.data.DataLoader(val, batch_size=batch, shuffle=False)
    # Whole batches until `limit` is reached: an encode and 4 decodes each (minutes for SMAP-B on a CPU).
    with progress(min(len(val), -(-limit // batch) * batch), "validation", "images") as bar:
        for images, labels in loader:
            images, labels = images.to(run.accelerator.device), labels.to(run.accelerator.device)
            z = model.encode(images, labels).z
            for k in ks:
                sums[k] += psnr(model.decode(z[:, :k], labels).clamp(-1, 1), images).sum().item()
            n += len(images)
            bar.update(len(images))
            if n >= limit:
                break
    return {f"val/psnr_k{k}": s / n for k, s in sums.items()}
