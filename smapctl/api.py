"""smapctl in your own Python code: a trained tokenizer or generator, loaded from its checkpoint.

    import smapctl

    tok = smapctl.Tokenizer.load("runs/demo-tokenizer")
    tokens = tok.encode(["a.png", "b.png"], classes=["3", "7"])   # (2, K, C) latents, or (2, K) indices
    images = tok.decode(tokens[:, :4], classes=["3", "7"])        # uint8 (2, 3, H, W): a 4-token prefix

    gen = smapctl.Generator.load("runs/demo-generator")
    samples = gen.sample(["3", "7"], per_class=4, seed=0, cfg_scale=2.0)   # .images uint8 (8, 3, H, W)

The numbers are those of the commands: `encode` gives the tokens `smapctl tokenize` stores, `decode` the
pixels `smapctl decode` writes, and `sample` the images `smapctl sample` draws for the same seed, classes,
`per_class` and `batch_size` (tested; a class listed twice is drawn twice here, once by the command). Images
go in as file paths, PIL images or uint8 tensors (3, H, W) or (N, 3, H, W), framed as evaluation frames them
(the largest centred square, resized bicubic to the model's resolution), and come out as uint8 (N, 3, H, W)
on the CPU; the models run in eval mode without gradients, and what comes back is an ordinary tensor. For
float images in [-1, 1] on the model's device (differentiable), call `tok.model.encode(x, labels)` and
`tok.model.decode(z, labels)` themselves. Bad input raises `smapctl.errors.UserError`, one line naming the
argument.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from smapctl.errors import UserError
from smapctl.ops.load import LoadedGenerator

ClassInput = int | str | Sequence[int | str] | np.ndarray | torch.Tensor | None


def _device(device) -> torch.device:
    """`device`, else a GPU when there is one (as `smapctl tokenize` and `decode` choose)."""
    if device is None:
        from smapctl.devices import default_device

        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {device!r}: {e}") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not (hasattr(backend, "is_available") and backend.is_available()):  # `mps` off a Mac: not a traceback
        what = "GPU" if device.type == "cuda" else f"{device.type} device"
        raise UserError(f"device {device}: no {what} that torch can use here")
    if device.index is not None and device.index >= backend.device_count():
        raise UserError(f"device {device}: torch sees {backend.device_count()} {device.type} device(s) here")
    return device


def _count(value, name: str, least: int = 1, most: int | None = None) -> int:
    """An integer argument (`seed`, `per_class`, `prefix`, `batch_size`), as Python, numpy or torch numbers
    take it (`torch.tensor(3)` is taken as `np.int64(3)` is)."""
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise UserError(f"{name}: an integer of at least {least}, not {value!r}")
    if most is not None and value > most:
        raise UserError(f"{name}: an integer from {least} to {most}, not {value!r}")
    return int(value)


# How to load the weights a checkpoint path names when they are not `weights=` (`open_checkpoint`'s hint).
_PASS_WEIGHTS = "; pass weights='{named}' for those"


def _weights(weights, checkpoint) -> str:
    """`weights=` as the commands' `--weights` takes it (a checkpoint's `xyz.safetensors: not found`
    would name a file the user never asked for), and `checkpoint` a path."""
    if not isinstance(checkpoint, str | os.PathLike):  # None: the commands' demo run, "or pass --checkpoint"
        raise UserError(f"checkpoint: a run or checkpoint folder, not {checkpoint!r}")
    if weights not in ("ema", "model"):
        raise UserError(f"weights: 'ema' or 'model', not {weights!r}")
    return weights


def _keyword(name: str) -> str:
    """How the API's messages name a sampling setting: as the keyword argument."""
    return name


def _not_a_path(loaded, cls: str) -> None:
    """`smapctl.Tokenizer("runs/x")`, a natural first try, said so (rather than failing on `'str' object
    has no attribute 'model'`)."""
    if isinstance(loaded, str | bytes | os.PathLike):
        raise UserError(f"{cls}({loaded!r}): a checkpoint is loaded with {cls}.load({loaded!r})")


@contextlib.contextmanager
def _float32_default():
    """Models built in float32, the checkpoints' type, whatever a notebook's `torch.set_default_dtype` says
    (float64 would fail on "class_embed.table.weight is torch.float32, the model's is torch.float64")."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its `_evaluating` lock
_LOCKS_LOCK = threading.Lock()


def _turn(model: torch.nn.Module) -> threading.RLock:
    """The lock calls on `model` take turns with (one per model, however many objects hold it)."""
    with _LOCKS_LOCK:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    """`model` in eval mode (a KL encoder's output is its posterior mean only there) and no gradients,
    its mode given back after (a notebook may be fine-tuning it). Calls on one model from several
    threads take turns: otherwise the first to end would give the train mode back while another is still
    encoding (its KL latents then posterior samples), and the model would be left in eval mode."""
    with _turn(model):
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(training)


class Tokenizer:
    """A trained SMAP tokenizer (`Tokenizer.load`): images to tokens and back."""

    def __init__(self, loaded):
        from smapctl.data.images import eval_frame

        _not_a_path(loaded, "Tokenizer")
        self._tok = loaded  # smapctl.ops.load.LoadedTokenizer
        self._frame = eval_frame(loaded.model.cfg.image_size)  # one for every image framed
        self._said_bf16 = False  # `encode(precision="bf16")` on hardware that emulates it: said once

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        *,
        weights: Literal["ema", "model"] = "ema",
        device: str | torch.device | None = None,
    ) -> Tokenizer:
        """From a run folder (its newest checkpoint) or a checkpoint folder (or a file in it: a weights file
        named is the one `weights` loads); `device` defaults to a GPU when there is one."""
        from smapctl.ops.load import load_tokenizer

        weights, device = _weights(weights, checkpoint), _device(device)
        with _float32_default():
            return cls(load_tokenizer(checkpoint, weights, device, weights_hint=_PASS_WEIGHTS))

    def to(self, device: str | torch.device) -> Tokenizer:
        """This tokenizer moved to `device` (in place, as `torch.nn.Module.to`; it returns itself), once
        the calls running on it have ended. A `Generator` that uses it stays where it is: move both with
        `Generator.to`."""
        device = _device(device)
        with _turn(self.model):
            self.model.to(device)
        self._said_bf16 = False  # the new device may emulate bf16 where the old had units for it
        return self

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, {self.regularizer}, {self.num_tokens} tokens, "
            f"{self.image_size} px, {len(self.class_names)} classes, device={self.device})"
        )

    @property
    def model(self) -> torch.nn.Module:
        """The SMAP module itself (`smapctl.models.smap.SMAP`, loaded in eval mode)."""
        return self._tok.model

    @property
    def class_names(self) -> list[str]:
        """The classes, indexed by class id."""
        return list(self._tok.class_names)

    @property
    def num_tokens(self) -> int:
        """K, the latent tokens per image; any prefix of 0..K of them decodes."""
        return self._tok.num_tokens

    @property
    def image_size(self) -> int:
        """The side of the square images it encodes and decodes."""
        return self._tok.model.cfg.image_size

    @property
    def regularizer(self) -> str:
        """`vq` (tokens are codebook indices), `kl` or `softvq` (tokens are latent vectors)."""
        return self._tok.model.cfg.regularizer.kind

    @property
    def device(self) -> torch.device:
        """Where the model runs (`load`'s `device`); what `encode` and `decode` give back is on the CPU."""
        return next(self._tok.model.parameters()).device

    @property
    def path(self) -> Path:
        """The checkpoint folder the weights came from."""
        return self._tok.path

    def labels(self, classes: ClassInput, count: int) -> torch.Tensor:
        """Class ids (count,) int64 of `classes`: one name or id for all `count` images, or one per image
        (a sequence, a 1-D array or tensor). None only for a tokenizer without class conditioning (its
        decoder ignores the class)."""
        return self._labels(classes, count)

    def _labels(self, classes: ClassInput, count: int, owner: str | None = None) -> torch.Tensor:
        """`labels`; for `owner` (a generator: "the generator"), whose errors name it and speak of a
        list of classes rather than of one per image."""
        from smapctl.ops.codes import UNKNOWN_LABEL

        if classes is None:
            if self._tok.model.cfg.class_condition:
                raise UserError(f"classes: {self.path} is class-conditioned: give the images' classes")
            return torch.full((count,), UNKNOWN_LABEL, dtype=torch.long)
        if isinstance(classes, torch.Tensor | np.ndarray):
            _has_values(classes, "classes")
            names = isinstance(classes, np.ndarray) and classes.dtype.kind in "UO"  # an array of names
            integer = classes.dtype.kind in "iu" if isinstance(classes, np.ndarray) else _integer(classes)
            if not (integer or names):
                raise UserError(f"classes: class ids are integers, not {classes.dtype}")
            if classes.ndim > 1:
                each = "one per image" if owner is None else "a list of them"
                raise UserError(f"classes: {each}, not an array of shape {tuple(classes.shape)}")
            classes = classes.tolist()
        if isinstance(classes, numbers.Integral | str):
            classes = [classes] * count
        if not isinstance(classes, Iterable):
            raise UserError(f"classes: {classes!r} is neither a class name nor an id")
        classes = list(classes)
        if len(classes) != count:
            raise UserError(f"classes: {len(classes)} given for {count} images")
        return torch.tensor([self._class_id(c, owner) for c in classes], dtype=torch.long)

    def _class_id(self, c, owner: str | None = None) -> int:
        """An integer is a class id (as `labels` of a token file or `Samples` hold them; -1, "no class",
        for a tokenizer without class conditioning), a string a class name, else an id written out (as
        `smapctl tokenize --label` takes it)."""
        from smapctl.ops.codes import UNKNOWN_LABEL

        c = _scalar(c, "classes")  # `list(samples.labels)`: 0-d tensors
        if isinstance(c, bool) or not isinstance(c, numbers.Integral | str):
            raise UserError(f"classes: {c!r} is neither a class name nor an id")
        if isinstance(c, str):
            return self._tok.class_id(c, "classes", owner or "the tokenizer")
        if c == UNKNOWN_LABEL and not self._tok.model.cfg.class_condition:  # a token file's "no class"
            return UNKNOWN_LABEL
        n = len(self._tok.class_names)
        if not 0 <= c < n:
            raise UserError(
                f"classes: class id {c} is out of range: {owner or self.path} has {n} classes, ids 0 to "
                f"{n - 1}"
            )
        return int(c)

    def frame(self, images) -> torch.Tensor:
        """Images as the model takes them: uint8 (N, 3, S, S), each framed as evaluation frames it (the
        largest centred square, resized bicubic, antialiased). `images`: a path, a PIL image (any mode,
        EXIF orientation applied, as a file is read), a uint8 tensor (3, H, W) or (N, 3, H, W), a uint8
        numpy array (H, W), (H, W, 3), (H, W, 4) or (N, H, W, C), or an iterable of any of these."""
        items, one_batch = _items(images)
        framed = torch.empty(len(items), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for i in range(len(items)):
            framed[i] = self._frame_at(items, i, one_batch)
        return framed

    def _frame_at(self, items: list, i: int, one_batch: bool) -> torch.Tensor:
        """`items[i]` framed; its error says which of a list it is (`images[2]: ...`; in a list of
        thousands, "images: a path, a PIL image or a uint8 tensor, not bytes" would not). A file's own error
        names the file; the rows of a batch tensor (`one_batch`) are one input."""
        try:
            return self._frame_one(items[i])
        except UserError as e:
            message = str(e)
            if len(items) == 1 or one_batch or not message.startswith("images: "):
                raise
            raise UserError(f"images[{i}]: {message.removeprefix('images: ')}") from None

    def _frame_one(self, image) -> torch.Tensor:
        from PIL import Image, ImageOps

        from smapctl.data.images import load_image, to_rgb

        if isinstance(image, str | os.PathLike):
            if os.path.isdir(image):  # ("not a regular file")
                raise UserError(f"{image}: a folder; give its image files (`smapctl tokenize` reads folders)")
            image = load_image(image)
        elif isinstance(image, Image.Image):
            try:  # a lazily opened file is read here
                image = to_rgb(ImageOps.exif_transpose(image))  # a copy: the caller's image is left as it is
            except Exception as e:
                raise UserError(f"images: a PIL image that cannot be read: {_unreadable(image, e)}") from None
        elif isinstance(image, torch.Tensor):
            _has_values(image, "images")
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise UserError(
                    f"images: a tensor image is uint8 (3, H, W) or a batch (N, 3, H, W), not {image.dtype} "
                    f"{tuple(image.shape)} (float images go to `tok.model.encode` in [-1, 1])"
                )
            image = image.cpu()
        elif isinstance(image, np.ndarray):  # as `Image.fromarray` reads it (skimage, OpenCV after BGR->RGB)
            channels = image.shape[2] if image.ndim == 3 else 1
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
                floats = (
                    " (floats in [0, 1]: (x * 255).round().astype(np.uint8))"
                    if image.dtype.kind == "f"
                    else ""
                )
                raise UserError(
                    "images: a numpy image is uint8 (H, W), (H, W, 3) or (H, W, 4), or a batch (N, H, W, C),"
                    f" not {image.dtype} {image.shape}{floats}"
                )
            image = to_rgb(Image.fromarray(image[..., 0] if channels == 1 and image.ndim == 3 else image))
        else:
            raise UserError(
                f"images: a path, a PIL image, a uint8 tensor or numpy array, not {type(image).__name__}"
            )
        height, width = image.shape[1:] if isinstance(image, torch.Tensor) else image.size[::-1]
        if not (height and width):  # a crop past the edge: a file of no pixels is refused as it is read
            raise UserError(f"images: an image of {width}x{height} pixels, none to frame")
        return self._frame(image)

    def encode(
        self,
        images,
        classes: ClassInput = None,
        *,
        prefix: int | None = None,
        batch_size: int = 64,
        precision: Literal["fp32", "bf16"] = "fp32",
    ) -> torch.Tensor:
        """The first `prefix` (default K) tokens of each image, on the CPU: indices (N, k) int64 for VQ,
        else latents (N, k, C) float32 (KL: the posterior mean), as `smapctl tokenize` stores them.
        `images` as `frame` takes them, read a batch at a time (a progress bar on a terminal or in a
        notebook)."""
        from smapctl.data.images import to_signed_float
        from smapctl.ops.tokenize import encode_tokens
        from smapctl.progress import progress

        k = self.num_tokens if prefix is None else _count(prefix, "prefix", least=0)
        if k > self.num_tokens:
            raise UserError(f"prefix {k}: out of range; {self.path} has {self.num_tokens} latent tokens")
        batch_size = _count(batch_size, "batch_size")
        if precision not in ("fp32", "bf16"):
            raise UserError(f"precision: 'fp32' or 'bf16', not {precision!r}")
        if precision == "bf16" and not self._said_bf16:  # as `smapctl tokenize --precision bf16` warns
            from smapctl.precision import warn_if_bf16_is_slow

            warn_if_bf16_is_slow(self.device, "precision='bf16'", "precision='fp32'")
            self._said_bf16 = True
        items, one_batch = _items(images)
        labels = self.labels(classes, len(items))  # checked before any image is read
        cfg = self.model.cfg
        shape = (len(items), k) if cfg.discrete else (len(items), k, cfg.token_dim)
        tokens = torch.empty(shape, dtype=torch.long if cfg.discrete else torch.float32)
        with _evaluating(self.model), progress(len(items), "encoding", "images", every=float("inf")) as bar:
            for start in range(0, len(items), batch_size):
                batch = range(start, min(start + batch_size, len(items)))
                x = to_signed_float(
                    torch.stack([self._frame_at(items, i, one_batch) for i in batch]).to(self.device)
                )
                y = labels[start : start + batch_size].to(self.device)
                tokens[start : start + len(batch)] = encode_tokens(self.model, x, y, k, precision)
                bar.update(len(batch))
        return tokens

    def decode(
        self, tokens: torch.Tensor, classes: ClassInput = None, *, batch_size: int = 64
    ) -> torch.Tensor:
        """Tokens of any prefix k in 0..K, indices (N, k) for VQ or latents (N, k, C) -> images uint8
        (N, 3, S, S) on the CPU, as `smapctl decode` writes them. Tokens as `encode` gives them (a
        generator's: `Samples.tokens`); latents of another float type are taken as float32."""
        from smapctl.data.images import to_uint8
        from smapctl.ops.codes import first_not_finite
        from smapctl.ops.decode import decode_tokens

        tokens = self._checked_tokens(tokens)
        labels = self.labels(classes, len(tokens))
        batch_size = _count(batch_size, "batch_size")
        images = torch.empty(len(tokens), 3, self.image_size, self.image_size, dtype=torch.uint8)
        with _evaluating(self.model):
            for start in range(0, len(tokens), batch_size):
                z, y = tokens[start : start + batch_size], labels[start : start + batch_size]
                decoded = decode_tokens(self.model, z.to(self.device), y.to(self.device))
                bad = first_not_finite(decoded)
                if bad is not None:  # (latents of 1e30 overflow the decoder: black images, as `decode` says)
                    raise UserError(
                        f"tokens[{start + bad}]: decode to values that are not finite (too large?)"
                    )
                images[start : start + len(z)] = to_uint8(decoded)
        return images

    def reconstruct(
        self,
        images,
        classes: ClassInput = None,
        *,
        prefix: int | None = None,
        batch_size: int = 64,
        precision: Literal["fp32", "bf16"] = "fp32",
    ) -> torch.Tensor:
        """`decode(encode(images))` from the first `prefix` tokens: uint8 (N, 3, S, S)."""
        tokens = self.encode(images, classes, prefix=prefix, batch_size=batch_size, precision=precision)
        return self.decode(tokens, classes, batch_size=batch_size)

    def _checked_tokens(self, tokens) -> torch.Tensor:
        """`tokens` as the model decodes them: int64 indices or float32 latents, of a shape it takes."""
        cfg = self.model.cfg
        if not isinstance(tokens, torch.Tensor):
            raise UserError(f"tokens: a tensor, not {type(tokens).__name__}")
        _has_values(tokens, "tokens")
        want = "(N, k) integer indices" if cfg.discrete else f"(N, k, {cfg.token_dim}) floating-point latents"
        shape_ok = tokens.ndim == 2 if cfg.discrete else tokens.ndim == 3 and tokens.shape[2] == cfg.token_dim
        dtype_ok = _integer(tokens) if cfg.discrete else tokens.is_floating_point()
        if not (shape_ok and dtype_ok):
            raise UserError(f"tokens: {self.path} decodes {want}, not {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.num_tokens:
            raise UserError(f"tokens: {tokens.shape[1]} per image, but {self.path} has {self.num_tokens}")
        if cfg.discrete:
            if tokens.numel():
                size, low, high = cfg.regularizer.codebook_size, int(tokens.min()), int(tokens.max())
                if low < 0 or high >= size:
                    raise UserError(f"tokens: indices {low}..{high}, outside the codebook of {size} codes")
            return tokens.long()
        tokens = tokens.float()  # (then checked: float64's 1e300 is inf in float32)
        if not bool(torch.isfinite(tokens).all()):
            raise UserError("tokens: latents that are not finite (nan or inf, or beyond float32's range)")
        return tokens


def _unreadable(image, e: Exception) -> str:
    """Why PIL could not read a lazily opened image: a bare AssertionError for one whose file is closed (a
    `with Image.open(...)` block ended; Pillow before 12.1: an AttributeError, `None` has no `seek`), an
    OSError for a truncated file."""
    from smapctl.data.images import describe_decode_error

    if isinstance(e, AssertionError | AttributeError) and getattr(image, "fp", None) is None:
        return "its file was closed before it was read (`.load()` it inside its `with Image.open`)"
    return describe_decode_error(e)


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _scalar(value, name: str):
    """A numpy scalar or 0-d array or tensor as the Python number it holds: `steps` from `np.arange` and
    `np.float32` scales would otherwise be refused ("expected an integer, got np.int64(4)") by the recipe's
    checks."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 0):
        _has_values(value, name)
        return value.item()
    return value


def _has_values(value, name: str) -> None:
    """Refuse a tensor on the meta device (a model built with `torch.device("meta")` makes them): it has
    a shape and no values, and torch's error on reading it ("Cannot copy out of meta tensor") named
    neither the argument nor why."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise UserError(f"{name}: a tensor on the meta device, which has a shape but no values")


def _items(images) -> tuple[list, bool]:
    """`frame`'s inputs as a list of single images (nothing is read yet), and whether they came as one
    batch (a tensor or array, whose rows' errors are the batch's: `_frame_at`)."""
    items = _listed(images)
    return items, isinstance(images, torch.Tensor | np.ndarray)


def _listed(images) -> list:
    from PIL import Image

    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, str | bytes | os.PathLike | torch.Tensor | Image.Image):
        return [images]  # bytes: one item, refused as such (not a list of its byte values)
    if isinstance(images, np.ndarray):  # one image (H, W[, C]) as PIL takes it, or a batch (N, H, W, C)
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Mapping):  # (its keys would be taken for paths)
        raise UserError(
            f"images: a path, a PIL image, a uint8 tensor or a list of them, not {type(images).__name__}"
        )
    if isinstance(images, Iterable):
        return list(images)
    raise UserError(
        f"images: a path, a PIL image, a uint8 tensor or a list of them, not {type(images).__name__}"
    )


@dataclass(eq=False)  # (the generated == compared tensors: "Boolean value of Tensor ... is ambiguous")
class Samples:
    """What `Generator.sample` drew: `images` uint8 (N, 3, H, W) on the CPU; `labels` (N,) their class
    ids, each class `per_class` times in the order given; `tokens` what the tokenizer decodes into them
    (indices (N, K), or latents (N, K, C) as `Tokenizer.encode` gives them: the generator itself models
    them normalised, `Generator.latent_stats`); `class_names` the generator's, indexed by `labels`.
    `len()` is N; its repr gives the shapes (else a notebook would print every pixel)."""

    images: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        classes = sorted({self.class_names[i] for i in self.labels.tolist()}, key=self.class_names.index)
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        return (
            f"Samples({len(self)} images {tuple(self.images.shape[1:])} {self.images.dtype}, tokens "
            f"{tuple(self.tokens.shape[1:])} {self.tokens.dtype}, classes: {shown})"
        )


class Generator:
    """A trained generator (CARD, LlamaGen or MaskGIT; `Generator.load`) and the tokenizer it was trained
    on: class-conditional images."""

    def __init__(self, loaded: LoadedGenerator):
        _not_a_path(loaded, "Generator")
        self._loaded = loaded  # `load_generator`'s
        self._tokenizer = Tokenizer(loaded.tokenizer)

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        *,
        weights: Literal["ema", "model"] = "ema",
        device: str | torch.device | None = None,
        tokenizer: str | os.PathLike | Tokenizer | None = None,
    ) -> Generator:
        """From a run folder (its newest checkpoint) or a checkpoint folder, with the tokenizer it was
        trained on: found where training recorded it, or at the same place beside the generator's run
        when both moved together, or at `tokenizer` (its run or checkpoint folder now, or a `Tokenizer`);
        refused if its weights are not those. `device` defaults to a GPU when there is one."""
        from smapctl.train.generator import load_generator

        weights, device = _weights(weights, checkpoint), _device(device)
        if not isinstance(tokenizer, str | os.PathLike | Tokenizer | None):
            raise UserError(f"tokenizer: a run or checkpoint folder or a Tokenizer, not {tokenizer!r}")
        if isinstance(tokenizer, Tokenizer):  # one loaded already: used as it is (not loaded again)
            tokenizer = tokenizer._tok
        with _float32_default():
            loaded = load_generator(
                checkpoint, device, weights, _PASS_WEIGHTS, tokenizer=tokenizer, tokenizer_option="tokenizer="
            )
            return cls(loaded)

    def to(self, device: str | torch.device) -> Generator:
        """This generator and its tokenizer moved to `device` (in place; it returns itself), once the
        calls running on them have ended: `Generator.load`'s `device=` for a model already loaded."""
        device = _device(device)
        with _turn(self.model):
            self.model.to(device)
            self.tokenizer.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"Generator({str(self.path)!r}, {self.kind}, {len(self.class_names)} classes, {self.tokenizer})"
        )

    @property
    def model(self) -> torch.nn.Module:
        """The generator module itself (in eval mode)."""
        return self._loaded.model

    @property
    def kind(self) -> str:
        """`card`, `llamagen` or `maskgit`."""
        return self._loaded.recipe.model.kind

    @property
    def settings(self) -> dict:
        """Its sampling settings, the recipe's (`sample`'s keyword arguments change them): `cfg_scale`,
        `cfg_schedule`, `temperature`, and `steps` and `method` (CARD), `top_k` and `top_p` (LlamaGen),
        `steps` and `choice_temperature` (MaskGIT)."""
        from smapctl.recipe import unused_sampling_settings

        settings = vars(self._loaded.recipe.sample)
        unused = unused_sampling_settings(self.kind, settings)
        return {k: v for k, v in settings.items() if k not in unused}

    @property
    def latent_stats(self):
        """CARD: the per-channel `mean` and `std` (C,) it normalises the tokenizer's latents with
        (`normalize`, `denormalize`; `smapctl.data.latents.LatentStats`); None for index tokens."""
        return self._loaded.stats

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer it was trained on (its decoder draws the images)."""
        return self._tokenizer

    @property
    def class_names(self) -> list[str]:
        """The classes, indexed by class id (the tokenizer's)."""
        return list(self._loaded.tokenizer.class_names)

    @property
    def path(self) -> Path:
        """The checkpoint folder the weights came from."""
        return self._loaded.path

    def _device_of_both(self) -> torch.device:
        """The device the generator and its tokenizer are on; a tokenizer moved alone (`Tokenizer.to`) is
        one line naming the fix, not a device mismatch deep in the decoder."""
        from smapctl.devices import same_device

        device = next(self.model.parameters()).device
        if not same_device(device, self.tokenizer.device):
            raise UserError(
                f"the generator is on {device} but its tokenizer on {self.tokenizer.device}: move both with"
                " Generator.to(device)"
            )
        return device

    def sample(
        self,
        classes: ClassInput | Literal["all"] = "all",
        per_class: int = 4,
        *,
        seed: int = 0,
        batch_size: int = 32,
        **settings,
    ) -> Samples:
        """`per_class` images of each of `classes` ("all", a class name or id, or a sequence of them; one
        given twice is drawn twice, where `smapctl sample --classes` draws it once) as `smapctl sample`
        draws them: batch b of `batch_size` images draws from (seed, b), so the same seed, classes,
        `per_class` and `batch_size` give the same images on the same kind of device (`smapctl sample`'s
        defaults are these: 4 per class, batch 32, seed 0).
        `settings`: sampling settings to change (`Generator.settings` has the generator's own), as Python,
        numpy or torch numbers."""
        from smapctl import config
        from smapctl.ops.sample import make_plan

        ids = self._class_ids(classes)
        per_class, batch_size = _count(per_class, "per_class"), _count(batch_size, "batch_size")
        seed = _count(seed, "seed", least=0, most=config.SEED_MAX)  # `smapctl sample --seed`'s range
        settings = self._checked_settings(settings)
        plan = make_plan(self._loaded, ids, per_class, settings, option=_keyword)
        images, tokens = self._draw(plan, seed, batch_size)
        return Samples(images, plan.labels, tokens, self.class_names)

    def _class_ids(self, classes: ClassInput | Literal["all"]) -> list[int]:
        """The class id of each of `classes` ("all": every class, in order), as `sample` takes them."""
        if isinstance(classes, str) and classes == "all":
            return list(range(len(self.class_names)))
        if isinstance(classes, numbers.Integral | str) or getattr(classes, "ndim", None) == 0:
            count = 1  # one class
        elif isinstance(classes, torch.Tensor | np.ndarray):
            count = len(classes)
        elif isinstance(classes, Iterable):
            classes = list(classes)
            count = len(classes)
        else:
            raise UserError(f'classes: "all", a class name or id, or a list of them; not {classes!r}')
        return self.tokenizer._labels(classes, count, "the generator").tolist()

    def _checked_settings(self, settings: dict) -> dict:
        """`sample`'s sampling settings as plain numbers, each one this kind of generator uses, their
        types and ranges those of a recipe's `sample` section."""
        from smapctl import config
        from smapctl.recipe import SamplingConfig

        own = self.settings
        settings = {name: _scalar(value, name) for name, value in settings.items()}
        unknown = [name for name in settings if name not in own]
        if unknown:
            raise UserError(
                f"{unknown[0]}: not a sampling setting of a {self.kind} generator: {', '.join(own)}"
            )
        config.build(SamplingConfig, {**vars(self._loaded.recipe.sample), **settings})  # types and ranges
        return settings

    def _draw(self, plan, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 (N, 3, H, W) on the CPU, tokens: indices (N, K) or latents (N, K, C) denormalised
        as `Tokenizer.encode` gives them) of `plan`'s N labels, batch b of `batch_size` from (seed, b)."""
        from smapctl.ops.sample import batch_rng, draw_images, draw_tokens
        from smapctl.progress import progress

        stats = self.latent_stats
        n = len(plan.labels)
        images = tokens = None  # made at the first batch's shapes, filled batch by batch (no second copy)
        bar = partial(progress, n, "sampling", "images", every=float("inf"))  # (or nothing)
        with (
            _evaluating(self.model),
            _evaluating(self.tokenizer.model),
            bar() as bar,
        ):  # once it is their turn (a `to` may have moved them meanwhile)
            device = self._device_of_both()
            for b, start in enumerate(range(0, n, batch_size)):
                y = plan.labels[start : start + batch_size].to(device)
                drawn = draw_tokens(plan, y, batch_rng(seed, b, device))
                batch = draw_images(plan, drawn, y)
                drawn = (drawn if stats is None else stats.denormalize(drawn)).cpu()
                if images is None:
                    images = batch.new_empty((n, *batch.shape[1:]))
                    tokens = drawn.new_empty((n, *drawn.shape[1:]))
                images[start : start + len(y)] = batch
                tokens[start : start + len(y)] = drawn
                bar.update(len(y))
        if images is None:  # no class given
            side, cfg = self.tokenizer.image_size, self.tokenizer.model.cfg
            images = torch.zeros(0, 3, side, side, dtype=torch.uint8)
            k = self.tokenizer.num_tokens
            tokens = torch.zeros(0, k, dtype=torch.long) if cfg.discrete else torch.zeros(0, k, cfg.token_dim)
        return images, tokens
