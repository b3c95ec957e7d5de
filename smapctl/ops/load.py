"""Rebuild trained models from their self-describing checkpoints (no constants passed again by hand)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from smapctl import config
from smapctl.data.config import embedded_name
from smapctl.data.folder import class_ids, class_key, shown_classes
from smapctl.errors import UserError
from smapctl.models.smap import SMAP, SMAPConfig
from smapctl.train import checkpoint as ckpt

logger = logging.getLogger("smapctl")

DEMO_TOKENIZER = Path("runs") / "demo-tokenizer"
DEMO_GENERATOR = Path("runs") / "demo-generator"


@dataclass
class LoadedTokenizer:
    model: SMAP  # eval mode
    recipe: object  # TokenizerRecipe
    class_names: list[str]
    path: Path  # the checkpoint folder
    fingerprint: str  # identifies this checkpoint's weights (`fingerprint`); kept with token files, caches

    @property
    def num_tokens(self) -> int:
        return self.model.cfg.num_latent_tokens

    def class_id(self, name_or_id: str, option: str = "", owner: str = "the tokenizer") -> int:
        """A class given by name (as in the checkpoint) or by integer id -> its id; errors start with
        `option` (the option that gave it), when given, and name the model as `owner`."""
        said = f"{option}: " if option else ""
        ids = class_ids(self.class_names)
        if class_key(name_or_id) in ids:
            return ids[class_key(name_or_id)]
        # isascii: "²" is a digit to isdigit() but not to int()
        if name_or_id.isascii() and name_or_id.removeprefix("-").isdigit():  # -1: out of range, not unknown
            n = len(self.class_names)
            if 0 <= int(name_or_id) < n:
                return int(name_or_id)
            raise UserError(
                f"{said}class id {name_or_id} is out of range: {owner} has {n} classes, ids 0 to {n - 1}"
            )
        shown = shown_classes(self.class_names)
        raise UserError(f"{said}unknown class {name_or_id!r}; {owner}'s classes are: {shown}")


@dataclass
class LoadedGenerator:
    model: torch.nn.Module  # CARD, LlamaGen or MaskGIT (`build_generator`), eval mode
    recipe: object  # GeneratorRecipe
    tokenizer: LoadedTokenizer  # the tokenizer it was trained on
    stats: object | None  # LatentStats: how its continuous tokens were normalized (None: discrete)
    path: Path  # the checkpoint folder


def fingerprint(path: Path, weights: str) -> str:
    """A short hash of the checkpoint's meta.json (its recipe, step and time of saving: another training's
    or another step's checkpoint differs) and the chosen weights file's name and size. The weights are
    not read (gigabytes, at every load): a weights file copied by hand over another of the same model
    would keep the fingerprint."""
    h = hashlib.sha256((Path(path) / ckpt.META).read_bytes())
    file = Path(path) / f"{weights}.safetensors"
    h.update(f"{weights}:{file.stat().st_size if file.exists() else 0}".encode())
    return h.hexdigest()[:16]


def resolve(spec: str | os.PathLike | None, default: Path, what: str, train_hint: str) -> Path:
    """A checkpoint or run folder from an option, or the demo run when no option was given."""
    if spec is None:
        if ckpt.latest_checkpoint(default) is None and training_in(default) is None:  # (else: said below)
            where = "" if Path(default).is_absolute() else f", from {Path.cwd()}"  # run elsewhere?
            raise UserError(
                f"no {what} given and the demo {what} ({default}{where}) is not trained yet; {train_hint}"
            )
        spec = default
    holder = training_in(spec)
    try:
        path = ckpt.resolve_checkpoint(spec)
    except UserError:
        if holder is None:
            raise
        raise UserError(
            f"{spec}: no complete checkpoint yet: a training is running there ({holder}); wait for its"
            " first (every train.ckpt_every steps)"
        ) from None
    if holder is not None:  # its checkpoints past train.keep_checkpoints go as it saves newer ones
        logger.warning(
            "%s: still training (%s); this uses its newest checkpoint so far, %s", spec, holder, path.name
        )
    return path


def training_in(spec: str | os.PathLike) -> str | None:
    """Who trains in the run folder `spec` names (the folder or its checkpoints/), as
    `training_holder` says it, or None; a checkpoint folder named is that checkpoint, whoever trains."""
    from smapctl.train.run_folder import training_holder

    path = Path(spec)
    try:
        if (path / ckpt.META).is_file():
            return None
    except OSError:  # a name the system refuses (too long): `resolve_checkpoint` says so of `spec`
        return None
    return training_holder(path.parent if path.name == ckpt.CHECKPOINTS else path)


def demo_recipe(kind: str) -> str:
    """The demo's `kind` recipe as a hint names it: `recipes/demo/<kind>.yaml` where that path works (the
    repository's root), else the copy beside the installed package (an editable install), absolute; else
    that path with where it is. (Otherwise, run from /tmp, the hint would name a file that is not there.)"""
    rel = Path("recipes") / "demo" / f"{kind}.yaml"
    if rel.is_file():
        return str(rel)
    beside = Path(__file__).resolve().parents[2] / rel
    return str(beside) if beside.is_file() else f"{rel} (in smapctl's repository)"


def named_weights(spec) -> str | None:
    """The weights a checkpoint path names when it is one of a checkpoint's weights files ("ema" for
    `.../ema.safetensors`, "model" for `.../model.safetensors`), else None."""
    if not isinstance(spec, str | os.PathLike):
        return None
    name = Path(spec).name
    return name.removesuffix(".safetensors") if name in ("ema.safetensors", "model.safetensors") else None


def open_checkpoint(
    spec,
    kind: str,
    option: str = "--checkpoint",
    other_kind: str = "",
    weights: str | None = None,
    weights_hint: str = "",
) -> tuple[Path, dict]:
    """A `kind` ("tokenizer" / "generator") checkpoint from an option (default: the demo run) and its
    meta.json; a checkpoint of the other kind is a one-line error, ending with `other_kind` (what to do
    with one: "; to score its samples: ...") when given. A weights file named (a path copied from the
    checkpoint folder) that is not the `weights` loaded is refused, ending with `weights_hint` (how to
    load those; "{named}" stands for them): otherwise `--checkpoint .../model.safetensors` would load the
    EMA weights beside it, silently."""
    default = DEMO_TOKENIZER if kind == "tokenizer" else DEMO_GENERATOR
    hint = f"train it with: smapctl train-{kind} {demo_recipe(kind)}, or pass {option}"
    path = resolve(spec, default, f"{kind} checkpoint", hint)
    named = named_weights(spec)
    if weights is not None and named is not None and named != weights:
        hint = weights_hint.replace("{named}", named)
        raise UserError(f"{spec}: names the {named} weights, but this loads the {weights} weights{hint}")
    meta = ckpt.load_meta(path)
    if meta.get("kind") != kind:
        hint = other_kind if meta.get("kind") in ("tokenizer", "generator") else ""
        raise UserError(f"{path}: a {meta.get('kind')} checkpoint, not a {kind}{hint}")
    recipe_section(path, meta)
    return path, meta


def recipe_section(path: str | os.PathLike, meta: dict) -> dict:
    """The recipe a checkpoint's meta.json (`meta`, of the checkpoint folder `path`) holds; none is one
    line naming that file."""
    if not isinstance(meta.get("recipe"), dict):
        raise UserError(f"{Path(path) / ckpt.META}: holds no recipe (a broken or hand-edited meta.json)")
    return meta["recipe"]


def checkpoint_recipe(cls, path: str | os.PathLike, meta: dict):
    """The recipe of a checkpoint's meta.json (`meta`, of the checkpoint folder `path`) built as `cls`; a
    value no recipe takes (a broken or hand-edited meta.json) is one line naming that file, not
    `model.regularizer: expected a section ...` as if of the command's own recipe, and so is none."""
    from smapctl.errors import ConfigError

    try:
        return config.build(cls, recipe_section(path, meta))
    except ConfigError as e:
        raise UserError(
            f"{Path(path) / ckpt.META}: its recipe's {e} (a broken or hand-edited meta.json)"
        ) from None


def load_tokenizer(
    spec: str | os.PathLike | None,
    weights: str = "ema",
    device: torch.device | str = "cpu",
    other_kind: str = "",
    weights_hint: str = "; pass --weights {named} for those",
) -> LoadedTokenizer:
    """Load a SMAP tokenizer from a run folder (its newest checkpoint) or a checkpoint folder;
    `other_kind` and `weights_hint` (by default for the commands' --weights) as `open_checkpoint` takes
    them."""
    from smapctl.recipe import TokenizerRecipe

    path, meta = open_checkpoint(
        spec, "tokenizer", other_kind=other_kind, weights=weights, weights_hint=weights_hint
    )
    recipe = checkpoint_recipe(TokenizerRecipe, path, meta)
    for key in ("dataset", "val_dataset"):  # runs of an older smapctl kept the recipe's paths as typed
        value = getattr(recipe.data, key)
        relative = value and not os.path.isabs(os.path.expanduser(value))
        if relative and not embedded_name(value):
            logger.warning(
                "%s: recorded data.%s %r relative to the folder it was trained from; it is read from %s",
                path, key, value, os.getcwd(),
            )  # fmt: skip
    model = tokenizer_model(recipe.model, path, weights, device)
    return LoadedTokenizer(model, recipe, list(meta.get("class_names", [])), path, fingerprint(path, weights))


def tokenizer_model(cfg: SMAPConfig, path: Path, weights: str, device: torch.device | str = "cpu") -> SMAP:
    """The SMAP of `cfg` with the `weights` of the checkpoint folder `path`, in eval mode. On the CPU its
    tensors are views of the weights file's mapping (safetensors), read as they are used: any one of them
    keeps the whole mapping, and with it every page read so far."""
    with torch.device("meta"):
        model = SMAP(cfg)
    # Every checkpoint holds both; a missing one is an error naming what is there (never a silent swap).
    ckpt.load_weights_into(model, path, weights, assign=True)
    return model.to(device).eval()
