"""smapctl in your own Python code: a trained tokenizer or generator, loaded from its checkpoint.

    import smapctl

    tok = smapctl.Tokenizer.load("runs/demo-tokenizer")
    tokens = tok.encode(["a.png", "b.png"], classes=["3", "7"])   # (2, K, C) latents, or (2, K) indices
    images = tok.decode(tokens[:, :4], classes=["3", "7"])        # uint8 (2, 3, H, W): a 4-token prefix

    gen = smapctl.Generator.load("runs/demo-generator")
    samples = gen.sample(["3", "7"], per_class=4, seed=0, cfg_scale=2.0)   # .images uint8 (8, 3, H, W)

The numbers are those of the commands: `encode` gives the tokens `smapctl tokenize` stores, `decode` the
pixels `smapctl decode` writes, and `sample` the images `smapctl sample` draws for the same seed, classes,
`per_class` and `batch_size` (tested). Images go in as file paths, PIL images or uint8 tensors (3, H, W)
or (N, 3, H, W), framed as evaluation frames them (the largest centred square, resized bicubic to the
model's resolution), and come out as uint8 (N, 3, H, W) on the CPU. Classes are names or ids, one for
every image or one per image. Bad input raises `smapctl.errors.UserError` with the message the commands
print.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from smapctl.errors import UserError

ImageInput = str | os.PathLike | torch.Tensor | object  # a path, a uint8 tensor or a PIL image
ClassInput = int | str | Sequence[int | str] | torch.Tensor | None


def _default_device(device) -> torch.device:
    """`device`, else a GPU when there is one (as `smapctl tokenize` and `decode` choose)."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


class Tokenizer:
    """A trained SMAP tokenizer (`Tokenizer.load`): images to tokens and back."""

    def __init__(self, loaded):
        self._tok = loaded  # smapctl.ops.load.LoadedTokenizer

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        *,
        weights: Literal["ema", "model"] = "ema",
        device: str | torch.device | None = None,
    ) -> Tokenizer:
        """From a run folder (its newest checkpoint) or a checkpoint folder; `device` defaults to a GPU
        when there is one."""
        from smapctl.ops.load import load_tokenizer

        return cls(load_tokenizer(checkpoint, weights, _default_device(device)))

    @property
    def model(self) -> torch.nn.Module:
        """The SMAP module, in eval mode (`smapctl.models.smap.SMAP`)."""
        return self._tok.model

    @property
    def class_names(self) -> list[str]:
        return list(self._tok.class_names)

    @property
    def num_tokens(self) -> int:
        """K, the latent tokens per image; any prefix of 0..K of them decodes."""
        return self._tok.num_tokens

    @property
    def image_size(self) -> int:
        return self._tok.model.cfg.image_size

    @property
    def regularizer(self) -> str:
        """`vq` (tokens are codebook indices), `kl` or `softvq` (tokens are latent vectors)."""
        return self._tok.model.cfg.regularizer.kind

    @property
    def device(self) -> torch.device:
        return next(self._tok.model.parameters()).device

    @property
    def path(self) -> Path:
        """The checkpoint folder the weights came from."""
        return self._tok.path

    def labels(self, classes: ClassInput, count: int) -> torch.Tensor:
        """Class ids (count,) int64 of `classes`: one name or id for all `count` images, or one per image
        (a sequence or a tensor). None only for a tokenizer without class conditioning (its decoder
        ignores the class)."""
        from smapctl.ops.tokenize import UNKNOWN_LABEL

        if classes is None:
            if self._tok.model.cfg.class_condition:
                raise UserError(f"{self.path}: a class-conditioned tokenizer needs the images' classes")
            return torch.full((count,), UNKNOWN_LABEL, dtype=torch.long)
        if isinstance(classes, torch.Tensor):
            if classes.is_floating_point() or classes.is_complex():
                raise UserError(f"classes: class ids are integers, not {classes.dtype}")
            classes = classes.reshape(-1).tolist() if classes.ndim else classes.item()
        if isinstance(classes, int | str):
            classes = [classes] * count
        if len(classes) != count:
            raise UserError(f"classes: {len(classes)} given for {count} images")
        return torch.tensor([self._class_id(c) for c in classes], dtype=torch.long)

    def _class_id(self, c: int | str) -> int:
        if isinstance(c, bool) or not isinstance(c, int | str):
            raise UserError(f"classes: {c!r} is neither a class name nor an id")
        if isinstance(c, int) and c < 0:
            raise UserError(f"classes: class id {c} is negative")
        return self._tok.class_id(str(c), "classes")

    def frame(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images as the model takes them: uint8 (N, 3, S, S), each framed as evaluation frames it (the
        largest centred square, resized bicubic, antialiased). `images`: a path, a PIL image, a uint8
        tensor (3, H, W) or (N, 3, H, W), or a sequence of paths, PIL images and (3, H, W) tensors."""
        from PIL import Image

        from smapctl.data.images import eval_frame, load_image, to_rgb

        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, list | tuple):
            images = [images]
        frame, framed = eval_frame(self.image_size), []
        for image in images:
            if isinstance(image, str | os.PathLike):
                image = load_image(image)
            elif isinstance(image, Image.Image):  # any mode, as a file of it is read (alpha on white)
                image = to_rgb(image)
            elif isinstance(image, torch.Tensor):
                if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                    raise UserError(
                        f"images: a tensor image is uint8 (3, H, W), not {image.dtype} {tuple(image.shape)}"
                    )
                image = image.cpu()
            else:
                raise UserError(f"images: a path, a PIL image or a uint8 tensor, not {type(image).__name__}")
            framed.append(frame(image))
        if not framed:
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.stack(framed)

    @torch.inference_mode()
    def encode(
        self,
        images: ImageInput | Sequence[ImageInput],
        classes: ClassInput = None,
        *,
        prefix: int | None = None,
        batch_size: int = 64,
        precision: Literal["fp32", "bf16"] = "fp32",
    ) -> torch.Tensor:
        """The first `prefix` (default K) tokens of each image, on the CPU: indices (N, k) int64 for VQ,
        else latents (N, k, C) float32 (KL: the posterior mean), as `smapctl tokenize` stores them."""
        from smapctl.data.images import to_signed_float
        from smapctl.ops.tokenize import encode_tokens

        k = self.num_tokens if prefix is None else prefix
        if not 0 <= k <= self.num_tokens:
            raise UserError(f"prefix {k}: out of range; {self.path} has {self.num_tokens} latent tokens")
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision: expected 'fp32' or 'bf16', not {precision!r}")
        framed = self.frame(images)
        labels = self.labels(classes, len(framed))
        to_float, out = to_signed_float(), []
        for start in range(0, len(framed), batch_size):
            x = to_float(framed[start : start + batch_size].to(self.device))
            y = labels[start : start + batch_size].to(self.device)
            out.append(encode_tokens(self.model, x, y, k, precision))
        if out:
            return torch.cat(out)
        cfg = self.model.cfg
        return torch.zeros((0, k) if cfg.discrete else (0, k, cfg.token_dim))

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, classes: ClassInput = None, *, batch_size: int = 64
    ) -> torch.Tensor:
        """Tokens of any prefix k in 0..K, indices (N, k) for VQ or latents (N, k, C) -> images uint8
        (N, 3, S, S) on the CPU, as `smapctl decode` writes them."""
        from smapctl.data.images import to_uint8
        from smapctl.ops.tokenize import decode_tokens

        self._check_tokens(tokens)
        labels = self.labels(classes, len(tokens))
        out = []
        for start in range(0, len(tokens), batch_size):
            z = tokens[start : start + batch_size].to(self.device)
            out.append(
                to_uint8(decode_tokens(self.model, z, labels[start : start + batch_size].to(self.device)))
            )
        if not out:
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.cat(out).cpu()

    def reconstruct(
        self,
        images: ImageInput | Sequence[ImageInput],
        classes: ClassInput = None,
        *,
        prefix: int | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """`decode(encode(images))` from the first `prefix` tokens: uint8 (N, 3, S, S)."""
        tokens = self.encode(images, classes, prefix=prefix, batch_size=batch_size)
        return self.decode(tokens, classes, batch_size=batch_size)

    def _check_tokens(self, tokens) -> None:
        cfg = self.model.cfg
        if not isinstance(tokens, torch.Tensor):
            raise UserError(f"tokens: a tensor, not {type(tokens).__name__}")
        want = "(N, k) integer indices" if cfg.discrete else f"(N, k, {cfg.token_dim}) floating-point latents"
        shape_ok = tokens.ndim == 2 if cfg.discrete else tokens.ndim == 3 and tokens.shape[2] == cfg.token_dim
        if not shape_ok or tokens.is_floating_point() == cfg.discrete:
            raise UserError(f"tokens: {self.path} decodes {want}, not {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.num_tokens:
            raise UserError(f"tokens: {tokens.shape[1]} per image, but {self.path} has {self.num_tokens}")
        if cfg.discrete and tokens.numel():
            size, low, high = cfg.regularizer.codebook_size, int(tokens.min()), int(tokens.max())
            if low < 0 or high >= size:
                raise UserError(f"tokens: indices {low}..{high}, outside the codebook of {size} codes")


@dataclass
class Samples:
    images: torch.Tensor  # uint8 (N, 3, H, W) on the CPU
    labels: torch.Tensor  # (N,) class ids: each class of the run `per_class` times, in the order given
    class_names: list[str]  # the generator's, indexed by `labels`


class Generator:
    """A trained generator (CARD, LlamaGen or MaskGIT; `Generator.load`) and the tokenizer it was trained
    on: class-conditional images."""

    def __init__(self, loaded: tuple):
        self._loaded = loaded  # `load_generator`'s (model, recipe, tokenizer, latent stats, path)

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        *,
        weights: Literal["ema", "model"] = "ema",
        device: str | torch.device | None = None,
    ) -> Generator:
        """From a run folder (its newest checkpoint) or a checkpoint folder, with the tokenizer it was
        trained on (found where it was, and refused if it changed); `device` defaults to a GPU when there
        is one."""
        from smapctl.train.generator import load_generator

        return cls(load_generator(checkpoint, _default_device(device), weights))

    @property
    def model(self) -> torch.nn.Module:
        return self._loaded[0]

    @property
    def kind(self) -> str:
        """`card`, `llamagen` or `maskgit`."""
        return self._loaded[1].model.kind

    @property
    def settings(self) -> dict:
        """The recipe's sampling settings (`sample`'s keyword arguments override them)."""
        return dict(vars(self._loaded[1].sample))

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self._loaded[2])

    @property
    def class_names(self) -> list[str]:
        return list(self._loaded[2].class_names)

    @property
    def path(self) -> Path:
        return self._loaded[4]

    @torch.inference_mode()
    def sample(
        self,
        classes: str | int | Sequence[int | str] = "all",
        per_class: int = 1,
        *,
        seed: int = 0,
        batch_size: int = 32,
        **settings,
    ) -> Samples:
        """`per_class` images of each of `classes` ("all", a class name or id, or a sequence of them) as
        `smapctl sample` draws them: batch b of `batch_size` images draws from (seed, b), so the same
        seed, classes, `per_class` and `batch_size` give the same images on the same kind of device.
        `settings`: the sampling settings to change (`cfg_scale`, `cfg_schedule`, `temperature`, `steps`,
        `method`, `top_k`, `top_p`, `choice_temperature`; those the generator does not use are refused)."""
        from smapctl.ops.sample import batch_rng, draw, make_plan, parse_classes

        tok = self._loaded[2]
        if isinstance(classes, str):
            ids = parse_classes(classes, tok.class_names)
        else:
            one = isinstance(classes, int | str)
            ids = list(dict.fromkeys(Tokenizer(tok).labels(classes, 1 if one else len(classes)).tolist()))
        if batch_size < 1:
            raise UserError("batch_size: must be at least 1")
        plan = make_plan(self._loaded, ids, per_class, settings)
        device = next(self.model.parameters()).device
        images = [
            draw(plan, plan.labels[start : start + batch_size].to(device), batch_rng(seed, b, device))
            for b, start in enumerate(range(0, len(plan.labels), batch_size))
        ]
        return Samples(torch.cat(images), plan.labels, list(tok.class_names))
