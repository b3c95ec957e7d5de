"""A new training run that starts from another run's weights (`train-* --init-from`): fine-tuning.

The new run is a run of its own recipe: step 0, a fresh optimizer, learning-rate schedule and data order;
only the model's weights (and a tokenizer's discriminator) come from the checkpoint, and the new EMA
starts from them. The checkpoint is opened and checked (the same model, a generator's same tokenizer)
before any image is read; under a launcher the main process finds it (`open_shared_init`) and every
process loads that checkpoint's files, as `--resume` does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from smapctl.errors import UserError
from smapctl.train import checkpoint as ckpt

log = logging.getLogger("smapctl.train")

OPTION = "--init-from"
RECORD = "init_from"  # the meta.json key of every checkpoint of a run started so

# model.* settings of the training objective rather than of the weights: a fine-tuning run may change
# them (a tail-drop schedule of table 3, a KL weight, a generator's class dropout); every other model.*
# setting must be the checkpoint's, as the weights hold what it made of them.
TRAINING_SETTINGS = {
    "tokenizer": {
        *("tail_drop", "tail_drop_per_sample", "tail_drop_full_prob", "regularizer.kl_weight"),
        *("regularizer.commitment_weight", "regularizer.codebook_weight", "regularizer.entropy_weight"),
        "regularizer.entropy_temperature",  # SoftVQ's entropy loss alone (eq. 10's weights use `temperature`)
    },
    "generator": {
        *("class_dropout", "diffusion_batch_mul", "freeze_class_embed", "dropout", "token_dropout"),
        "label_smoothing",
    },
}


@dataclass
class InitFrom:
    """The checkpoint a run starts from and which of its weights ("ema" or "model")."""

    path: Path  # the checkpoint folder
    meta: dict
    weights: str

    def record(self) -> dict:
        """What the run keeps in its checkpoints' meta.json of where it started."""
        from smapctl.ops.load import fingerprint

        return {
            "path": str(Path(self.path).resolve()),
            "weights": self.weights,
            "step": self.meta.get("step"),
            "fingerprint": fingerprint(self.path, self.weights),
        }


def refuse_with_resume(init_from, resume: bool) -> None:
    """--init-from and --resume together: a resume goes on from the run's own checkpoint."""
    if init_from is not None and resume:
        raise UserError(
            f"{OPTION} with --resume: a resumed run goes on with the weights of its own newest checkpoint;"
            f" leave out {OPTION} (a run started with it goes on without it)"
        )


def open_init(spec: str | os.PathLike, recipe, kind: str, weights: str = "ema") -> InitFrom:
    """The checkpoint `spec` names (a run folder: its newest checkpoint; as `--checkpoint` elsewhere),
    checked against `recipe`: a one-line UserError for another kind or another model."""
    from smapctl.ops.load import open_checkpoint

    try:
        path, meta = open_checkpoint(
            spec, kind, OPTION, weights=weights, weights_hint="; pass --init-weights {named} for those"
        )
    except UserError as e:
        raise UserError(f"{OPTION}: {e}") from None
    if weights not in ckpt.weight_names(path):
        have = ", ".join(ckpt.weight_names(path)) or "none"
        raise UserError(f"{OPTION}: {path} has no {weights} weights (it has: {have})")
    init = InitFrom(path, meta, weights)
    check_same_model(init, recipe, kind)
    return init


def open_shared_init(spec: str | os.PathLike, recipe, kind: str, weights: str = "ema") -> InitFrom:
    """`open_init` in a training, whose processes under a launcher must start from one checkpoint: the
    main process finds and checks it, and every other opens the checkpoint folder it found (a run folder
    still training could save a newer one between two processes' look-ups: each would start its EMA from
    other weights, and record or check another file). The main process's refusal is every process's."""
    from smapctl.launch import on_the_main_process

    found = on_the_main_process(lambda: open_init(spec, recipe, kind, weights), share=lambda i: str(i.path))
    return found if isinstance(found, InitFrom) else open_init(found, recipe, kind, weights)


def _leaves(d: dict, where: str) -> dict:
    """A nested config dict as {"model.a.b": value}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{where}.{key}")
        else:
            out[f"{where}.{key}"] = value
    return out


def check_same_model(init: InitFrom, recipe, kind: str) -> None:
    """The recipe's model is the checkpoint's, apart from `TRAINING_SETTINGS` (logged when they differ)
    and a tokenizer's class count (`fresh_class_keys`); a generator's class table is its own or its
    tokenizer's as it was (`class_embed`). Recipes are compared, not tensor shapes: weights of the same
    shapes can mean something else (another regularizer, another patch grid of the same count)."""
    from smapctl.config import to_dict
    from smapctl.train.resume import with_defaults

    saved = with_defaults(type(recipe.model), (init.meta.get("recipe") or {}).get("model"))
    then = _leaves(saved if isinstance(saved, dict) else {}, "model")
    now = _leaves(to_dict(recipe.model), "model")
    if kind == "generator":
        then["class_embed"] = (init.meta.get("recipe") or {}).get("class_embed", "shared")
        now["class_embed"] = recipe.class_embed
    allowed = {f"model.{key}" for key in TRAINING_SETTINGS[kind]}
    if kind == "tokenizer":
        allowed.add("model.num_classes")  # the class embedding starts anew (`fresh_class_keys`)
    # "kind" first: it decides the other keys (a regularizer's, a generator's)
    order = sorted(set(then) | set(now), key=lambda k: (not k.endswith(".kind"), k))
    differ = [key for key in order if then.get(key, "absent") != now.get(key, "absent")]
    wrong = [key for key in differ if key not in allowed]
    # Another kind (of regularizer, of generator) is said alone, with the whole section to set back.
    kinds = [key.removesuffix(".kind") for key in wrong if key.endswith(".kind")]
    wrong = [k for k in wrong if k.endswith(".kind") or not any(k.startswith(f"{p}.") for p in kinds)]
    if wrong:
        said = "; ".join(
            f"{key} {then.get(key, 'absent')!r}, the recipe says {now.get(key)!r}" for key in wrong[:4]
        )
        more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
        sets = " ".join(_set_back(key, then) for key in wrong[:4] if key in then)
        raise UserError(
            f"{OPTION}: {init.path} is of another model ({said}{more}); a run starts only from weights of its"
            f" own model: {sets}"
        )
    changed = [f"{key} {then[key]!r} -> {now[key]!r}" for key in differ if key != "model.num_classes"]
    if changed:
        log.info(
            "%s: the run trains with %s (the checkpoint's run had the other values)",
            OPTION,
            ", ".join(changed),
        )


def _set_back(key: str, then: dict) -> str:
    """The --set that gives `key` the checkpoint's value (`then`: its flattened model); for a `.kind`,
    its whole section as a YAML mapping."""
    if not key.endswith(".kind"):
        return f"--set {key}={then[key]}"
    section = key.removesuffix(".kind")
    values = ", ".join(
        f"{k.removeprefix(section + '.')}: {v}" for k, v in then.items() if k.startswith(f"{section}.")
    )
    return f"--set '{section}={{{values}}}'"


def fresh_class_keys(init: InitFrom, model: nn.Module, class_names: list[str]) -> list[str]:
    """The weights of `model` (a tokenizer) that do not come from the checkpoint: its class embedding
    when the run's classes are not the checkpoint's (other names, another count; section 3.2: the class
    embedding is a token of both towers, one row a class), with a warning. It starts as the recipe's
    seed draws it; every other weight is the checkpoint's."""
    from smapctl.data.folder import same_classes, shown_classes

    saved = list(init.meta.get("class_names") or [])
    keys = [key for key in model.state_dict() if key.startswith("class_embed.")]
    if not keys or same_classes(saved, class_names):
        return []
    log.warning(
        "%s: the run's %d classes (%s) are not the %d of %s (%s): its class embedding starts anew (as"
        " the recipe's seed draws it); every other weight is the checkpoint's",
        OPTION, len(class_names), shown_classes(class_names, 5), len(saved), init.path,
        shown_classes(saved, 5),
    )  # fmt: skip
    return keys


def load_init(module: nn.Module, init: InitFrom, keep: list[str] | tuple = ()) -> None:
    """The checkpoint's weights (`init.weights`) into `module`, but for the `keep` keys (strictly)."""
    ckpt.load_weights_into(module, init.path, init.weights, fits="this run's model", keep=keep)


def load_discriminator(disc: nn.Module | None, init: InitFrom, loss) -> None:
    """A tokenizer's discriminator from the checkpoint's when it has one of the recipe's shape; else
    the recipe's new one, said (a discriminator is a training aid: the tokenizer's weights are what
    matter)."""
    from smapctl.train.resume import DISCRIMINATOR_KEYS

    if disc is None:
        return
    if "discriminator" not in ckpt.weight_names(init.path):
        log.info("%s: %s has no discriminator; the run's starts anew", OPTION, init.path)
        return
    then = (init.meta.get("recipe") or {}).get("loss") or {}
    other = [
        f"loss.{k} {then[k]!r} -> {getattr(loss, k)!r}"
        for k in DISCRIMINATOR_KEYS
        if k in then and then[k] != getattr(loss, k)
    ]
    if other:
        log.warning(
            "%s: %s's discriminator is of another shape (%s); the run's starts anew",
            OPTION, init.path, ", ".join(other),
        )  # fmt: skip
        return
    ckpt.load_weights_into(disc, init.path, "discriminator", fits="this run's discriminator")


def check_init_tokenizer(init: InitFrom, tokenizer: Path, fingerprint: str, weights: str) -> None:
    """A generator starts from a generator trained on the very tokenizer (checkpoint and weights) of its
    latents.tokenizer: another one's tokens mean something else."""
    info = init.meta.get("tokenizer") or {}
    if info.get("fingerprint") == fingerprint:
        return
    then = f"{info.get('path')} ({info.get('weights')} weights)"
    raise UserError(
        f"{OPTION}: {init.path} was trained on the tokenizer {then}, but latents.tokenizer is {tokenizer}"
        f" ({weights} weights), whose tokens mean something else; train on the same tokenizer:"
        f" --set latents.tokenizer={info.get('path')} --set latents.tokenizer_weights={info.get('weights')}"
    )


def carried_record(run_dir: Path, resume: bool) -> dict | None:
    """A resumed run's record of where it started (its newest checkpoint's), kept in its next ones."""
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    return ckpt.load_meta(latest).get(RECORD) if latest is not None else None


def describe(init: InitFrom) -> str:
    """The dry run's line: where the run starts."""
    return f"starts from {init.path} (its {init.weights} weights, step {init.meta.get('step')})"
