"""Reading images from disk, the two transforms (appendix A), and writing PNGs.

Every command that reads an image (training, tokenize, cross-recon, evaluation) goes through `load_image`,
so a file that is empty, not an image, truncated, absurdly large or in an unusual colour mode behaves the
same everywhere: either it becomes an 8-bit RGB picture, or a one-line `BadImageError` names the file.

Tensors follow the tokenizer's convention: float32 in [-1, 1], shape (3, H, W) for one image and
(B, 3, H, W) for a batch.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import stat
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from smapctl.errors import UserError
from smapctl.io import atomic_output

_logger = logging.getLogger("smapctl.data")

# Lower-case suffixes that `find_images` and the folder datasets pick up (ImageNet's ".JPEG" included).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_EXTENSIONS += (".ppm", ".pgm", ".pnm")

# Bicubic with antialiasing for every resize: the usual choice for ImageNet tokenizers and FID pipelines.
INTERPOLATION = v2.InterpolationMode.BICUBIC

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


class BadImageError(UserError):
    """An image file that cannot be used; the message is one line: `<path>: <reason>`."""

    same_in_every_process = False  # under a launcher each process reads its own share of the images

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:
            # A DataLoader worker re-raises an error in the main process as `type(err)(formatted_traceback)`
            # (torch.utils.data's ExceptionWrapper); recover the original one-line message from its last line.
            message = _last_error_line(str(path))
            path, _, reason = message.partition(": ")
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {self.reason}")


def _last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    _, sep, tail = last.partition("BadImageError: ")
    return tail if sep else last


# ------------------------------------------------------------------------------------------------ loading


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read one image file as an 8-bit RGB PIL image, or raise `BadImageError(path, reason)`.

    EXIF orientation is applied; animated files give their first frame; transparency is composited on
    white; greyscale, palette, CMYK and 16/32-bit integer images are converted to 8-bit RGB. The image is
    fully decoded here, so a truncated file fails now rather than later inside a transform. Images whose
    header claims more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (about 89 megapixels by default) are
    refused before any pixel is decoded (decompression-bomb guard).
    """
    path = Path(path)
    try:
        info = path.stat()  # one system call for the three checks
    except PermissionError:
        raise BadImageError(path, "cannot read (permission denied)") from None
    except OSError:  # missing, a broken link, a file used as a folder
        # A listing shows a broken link: "no such file" contradicted it.
        reason = "a broken symbolic link" if path.is_symlink() else "no such file"
        raise BadImageError(path, reason) from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(path, "not a regular file")
    if info.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and only errors above twice that; refuse at the warning.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                _check_size(img.size)
                if getattr(img, "is_animated", False):
                    img.seek(0)
                img.load()
                img = _apply_exif_orientation(img)
                return to_rgb(img)
        except BadImageError:
            raise
        except UnidentifiedImageError:
            raise BadImageError(path, "not an image (unrecognised file format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(path, f"too large ({e})") from None
        except PermissionError:
            raise BadImageError(path, "cannot read (permission denied)") from None
        except MemoryError:
            raise BadImageError(path, "too large to decode (out of memory)") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
            raise BadImageError(path, describe_decode_error(e)) from None


def _check_size(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height:,} pixels, over PIL.Image.MAX_IMAGE_PIXELS = {limit:,}"
        )


def describe_decode_error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"truncated or corrupt image data ({text})"
    return f"cannot decode ({text})"


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says, in place (`to_rgb` copies the result anyway); a
    broken EXIF block is ignored, not fatal."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; high bit depths are rescaled, not clipped."""
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" in img.info:  # a PNG colour key (tRNS): that colour is clear
        img = img.convert("RGBA")
        mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # PIL's own convert("L") clips 16-bit values at 255 (a 16-bit photo turns white); rescale instead.
        arr = np.asarray(img)
        grey = Image.fromarray(_high_depth_to_uint8(arr, mode))
        key = img.info.get("transparency")
        if isinstance(key, int | float):  # a 16-bit PNG's colour key: clear, as for the other modes
            clear = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8))
            rgba = Image.merge("RGBA", (grey, grey, grey, clear))
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return grey.convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except ValueError:
        raise ValueError(f"unsupported colour mode {mode}") from None


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer images are read as 0..65535 (what 16-bit PNG/TIFF give); float images as 0..1
    when their values fit, else as 0..255."""
    arr = arr.astype(np.float64)
    if mode == "F":
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    else:
        arr = arr / 257.0  # 65535 -> 255 exactly
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ finding files


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file name with an image suffix that is not hidden (macOS `._x.jpg` files are junk)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str | os.PathLike, others: Counter | None = None) -> list[Path]:
    """All image files below `root` (recursive, following symlinks, skipping hidden files and folders),
    sorted by their path relative to `root`. `others` counts the files left out by suffix."""
    root = Path(root)
    return [root / rel for rel in scan_relative(root, others)]


def say_left_out(where: str | os.PathLike, others: Counter, log: logging.Logger) -> None:
    """Log at INFO what a scan that left out `others` (file suffix -> count) says of them, if any: an
    .avif or .heic would otherwise go missing from training, a token file or scores without a word."""
    note = left_out_note(others)
    if note:
        log.info("%s: %s", where, note)


def left_out_note(others: Counter) -> str | None:
    """What a scan that left out `others` (file suffix -> count) says of them, or None when it left out
    none: `3 files left out, not images by their suffix: .txt x2, .avif x1`."""
    others = +others  # counts taken back to 0 (a command's own files) say nothing
    if not others:
        return None
    shown = ", ".join(f"{suffix} x{n}" for suffix, n in others.most_common(5)) + (
        ", ..." if len(others) > 5 else ""
    )
    total = sum(others.values())
    return f"{total} file{'s' if total > 1 else ''} left out, not images by their suffix: {shown}"


def scan_relative(root: str | os.PathLike, others: Counter | None = None) -> list[str]:
    """`scan_folder` as sorted relative path strings (cheap enough for ImageNet's 1.28M files), `/`-separated
    on every system: a folder's listing, its order (which decides the held-out split) and its digest (kept
    in checkpoints and token caches) are then the same on Windows as on Linux and macOS (with Windows'
    separator they would sort otherwise and every digest would differ: a run trained on Linux would have
    its folder refused on Windows as changed).

    Symbolic links to folders are followed (a class folder may be a link into another tree), but a
    folder is walked once: a link back to a folder above it would otherwise repeat its images about 40
    times, until the path grows too long."""
    found = []
    for folder, images in walk_images(root, others):
        prefix = os.path.relpath(folder, root)
        prefix = "" if prefix == os.curdir else prefix.replace(os.sep, "/") + "/"
        found.extend(prefix + f for f in images)
    return sorted(found)


def walk_images(root: str | os.PathLike, others: Counter | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, its image files) for each folder below `root`, lazily, as `scan_relative` lists them:
    hidden folders left out, symbolic links to folders followed, each real folder once. A link to a
    folder the walk is inside (`loop -> ..` in a class folder) is not followed, with a warning: walked
    from a class folder, it listed every other class's images as this class's. `others` counts the
    files that are not images (by suffix), hidden ones aside."""
    walked = {os.path.realpath(root)}
    for folder, subfolders, files in _walk(root):
        here = os.path.realpath(folder)
        kept = []
        for d in sorted(subfolders):
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(folder, d))
            if real == here or here.startswith(real.rstrip(os.sep) + os.sep):
                _logger.warning(
                    "%s: a link to %s, a folder it is inside, not followed (its images would be listed "
                    "again, under it)",
                    os.path.join(folder, d),
                    real,
                )
            elif real not in walked:
                walked.add(real)
                kept.append(d)
        subfolders[:] = kept
        images = []
        for f in files:  # one pass: a dataset folder may hold a million names
            if is_image_file(f):
                images.append(f)
            elif others is not None and not f.startswith("."):
                others[_suffix(f)] += 1
        yield folder, sorted(images)


def _walk(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(root, followlinks=True)` (top down: the caller may prune the subfolder list it is given),
    without recursion: Python 3.11's recurses once per folder level, and an image 1,000 folders deep
    ended `tokenize` (or a training's listing) with a RecursionError traceback. A folder that cannot be
    read is passed over, as os.walk does, but said (os.walk left a class folder without read permission
    out of a training in silence); one gone meanwhile, or not a folder, is passed over in silence."""
    stack = [os.fspath(root)]
    while stack:
        top = stack.pop()
        folders, files = [], []
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    try:
                        is_folder = entry.is_dir()  # (following a symbolic link)
                    except OSError:
                        is_folder = False
                    if is_folder:
                        folders.append(entry.name)
                    else:
                        files.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            _logger.warning("%s: cannot be read (%s); its images are left out", top, e.strerror or e)
            continue
        yield top, folders, files
        stack.extend(os.path.join(top, d) for d in reversed(folders))  # the first on top: depth first


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "no suffix"


def first_other_image(root: str | os.PathLike, ours: Callable[[Path, str], bool]) -> Path | None:
    """The first image file below `root` (at any depth, as `walk_images` lists them) for which
    `ours(relative folder, name)` is false, or None; the walk stops there, so a large dataset folder
    costs little time. Commands that write images into a folder use it to refuse one holding others."""
    root = Path(root)
    if not root.is_dir():
        return None
    for folder, images in walk_images(root):
        rel = Path(folder).relative_to(root)
        for name in images:
            if not ours(rel, name):
                return Path(folder) / name
    return None


def find_images(inputs: Iterable[str | os.PathLike], others: Counter | None = None) -> list[str]:
    """Expand files, folders (recursively) and glob patterns (`**` allowed) into a list of image files,
    spelled as `pathlib` spells them (`str(Path(p))`) but made as strings: a `Path` per file took about 12
    of the 30 s that listing ImageNet's 1.28M files took.

    Inputs keep their order; what one folder or pattern expands to is sorted. A file named explicitly is
    kept whatever its suffix (it is checked when read); folders and patterns contribute image files only.
    Duplicates are dropped: the same file in the same real folder, however the path spells it (`a/x.png`
    and `link-to-a/x.png`). A symbolic link to an image elsewhere is an image of its own folder, as the
    training datasets see it: linked into another class folder, it is a sample of that class too (the
    first of the two kept alone would give it one class only). A path that does not exist, a pattern
    that matches nothing or an empty result is a `UserError`. `others` counts the files that folders
    hold beside their images (by suffix).
    """
    out: list[str] = []
    seen: set[str] = set()
    inputs = [str(i) for i in inputs]
    real = _RealFolders()
    counted: set[str] = set()  # the folders whose other files are counted (an input given twice: once)
    for item in inputs:
        key = real(os.path.expanduser(item))
        again = os.path.isdir(os.path.expanduser(item)) and key in counted
        counted.add(key)
        for path in _expand_one(item, None if again else others):
            key = real(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    if not out:
        note = left_out_note(others) if others is not None else None
        why = f" ({note})" if note else ""
        raise UserError(f"no images found in {', '.join(inputs) or '(no inputs given)'}{why}")
    return out


class _RealFolders:
    """A file's identity for `find_images`: the real path of its folder (`os.path.realpath`, each folder
    resolved once) plus its own name, not followed when it is a symbolic link. A folder is resolved once
    for all its files (1024 files in /tmp/<folder>/<class>/: 6.7 against 17.6 ms for `realpath` of each
    file on a 2-core Zen 3; deeper paths gain more)."""

    def __init__(self):
        self.folders: dict[str, str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        folder, name = os.path.split(os.fspath(path))
        if name in ("", os.curdir, os.pardir):
            return os.path.realpath(path)
        if folder not in self.folders:
            self.folders[folder] = os.path.realpath(folder or os.curdir)
        return os.path.join(self.folders[folder], name)


def _expand_one(item: str, others: Counter | None = None) -> list[str]:
    path = str(Path(item).expanduser())  # the input in pathlib's spelling, once
    if os.path.isdir(path):
        return _folder_images(path, others)
    if os.path.lexists(path):
        # A file, or a named pipe, socket, device or broken link named as one: `load_image` says what it
        # is ("not a regular file", "a broken symbolic link"), rather than "no such file or folder".
        return [path]
    if glob.has_magic(item):
        try:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        except RecursionError:  # glob's `**` recurses once per folder level (a traceback)
            raise UserError(
                f"'{item}': its folders go too deep for a pattern to list (over {sys.getrecursionlimit()}"
                " levels); give the folder itself, whose images are listed at any depth"
            ) from None
        if not matches:
            raise UserError(f"no files match '{item}'")
        files: list[str] = []
        spelled: dict[str, str] = {}  # a match's folder -> pathlib's spelling of it, once per folder
        for match in matches:
            if os.path.isdir(match):
                files.extend(_folder_images(str(Path(match)), others))
            elif is_image_file(match):
                folder, name = os.path.split(match)
                if folder not in spelled:
                    spelled[folder] = str(Path(folder))
                files.append(_child(spelled[folder], name))
            elif others is not None and not os.path.basename(match).startswith("."):
                others[_suffix(match)] += 1
        return files
    raise UserError(f"no such file or folder: {item}")


def _folder_images(root: str, others: Counter | None) -> list[str]:
    """`scan_folder(root)` as strings; `root` in pathlib's spelling."""
    return [_child(root, rel) for rel in scan_relative(root, others)]


def _child(folder: str, rel: str) -> str:
    """`str(Path(folder) / rel)` for a `folder` in pathlib's spelling and a `rel` without `.` or empty
    parts (a file name, or `os.path.relpath`'s answer)."""
    return rel if folder == os.curdir else os.path.join(folder, rel)


# ------------------------------------------------------------------------------------------- transforms


class SignedFloat(torch.nn.Module):
    """uint8 (..., 3, H, W) -> plain float32 tensor in [-1, 1]: torchvision's `ToDtype(float32, scale=True)`
    then `Normalize(0.5, 0.5)`, i.e. (x / 255 - 0.5) / 0.5, which `to_uint8` inverts exactly. It calls their
    kernels directly (same values bit for bit, tested): the three v2 transforms took 0.12 ms per 32 px image
    on a 2-core Zen 3, mostly dispatch, against 0.5 ms for the whole training augmentation."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = TF.to_dtype_image(img.as_subclass(torch.Tensor), torch.float32, scale=True)
        return TF.normalize_image(x, mean=[0.5] * 3, std=[0.5] * 3)


class Frame(torch.nn.Module):
    """PIL RGB image or uint8 (3, H, W) -> plain uint8 tensor (3, image_size, image_size): the largest
    centred square, then a bicubic, antialiased resize (resizing uint8 keeps values on the 8-bit grid).
    Cropping before resizing frames the picture exactly as "resize the shorter side, then centre-crop"
    does, without building a huge intermediate for very long images. An image already at that size skips
    both, identities for it. torchvision's kernels are called directly, as `v2.CenterCrop` and `v2.Resize`
    call them (the same pixels, tested against them), without v2's dispatch and `tv_tensors` wrapping: on
    a 2-core Zen 3, 0.03 against 0.11 ms per 64 px PIL image at size (`tokenize`'s benchmark, where the
    tiny encoder takes 7 ms per image) and 0.14 against 0.38 ms resizing it to 48 px."""

    def __init__(self, image_size: int):
        super().__init__()
        self.size = image_size

    def forward(self, img) -> torch.Tensor:
        img = as_image(img)
        return img if img.shape[-2:] == (self.size, self.size) else self.crop_resize(img)

    def crop_resize(self, img: torch.Tensor) -> torch.Tensor:
        side = min(img.shape[-2:])
        img = TF.center_crop_image(img, [side, side])
        return TF.resize_image(img, [self.size, self.size], INTERPOLATION, antialias=True)


def as_image(img) -> torch.Tensor:
    """PIL image or uint8 (3, H, W) -> plain uint8 tensor (3, H, W), as `v2.ToImage` converts it (then
    unwrapped). An RGB PIL image (what `load_image` returns) and a (3, H, W) tensor skip v2's dispatch."""
    if isinstance(img, torch.Tensor) and img.ndim == 3:
        return img.as_subclass(torch.Tensor)
    if isinstance(img, Image.Image) and img.mode == "RGB":
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return _TO_IMAGE(img).as_subclass(torch.Tensor)


_TO_IMAGE = v2.ToImage()  # stateless


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """One image file -> uint8 (3, H, W), read as `load_image` reads it (the same checks and
    `BadImageError`)."""
    return as_image(load_image(path))


class RandomCropFlip(torch.nn.Module):
    """PIL image or uint8 (3, H, W) -> uint8 (3, size, size): appendix A's augmentation, a random resized
    crop (area fraction in `scale`, aspect ratio 3/4..4/3, bicubic, antialiased) and, with `hflip`, a
    random horizontal flip. The same random draws and pixels as
    `v2.Compose([v2.ToImage(), v2.RandomResizedCrop(...), v2.RandomHorizontalFlip()])` (tested), with
    torchvision's kernels called directly: its dispatch took about a third of the 0.5 ms per 32 px image
    that the training loader spent on a 2-core Zen 3, serially with the training step."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: bool):
        super().__init__()
        self.size, self.hflip = [size, size], hflip
        self.crop = v2.RandomResizedCrop(
            size, tuple(scale), ratio=(3 / 4, 4 / 3), interpolation=INTERPOLATION, antialias=True
        )

    def forward(self, img) -> torch.Tensor:
        img = as_image(img)
        box = self.crop.make_params([img])  # v2.RandomResizedCrop's own draws
        top, left, height, width = box["top"], box["left"], box["height"], box["width"]
        img = TF.resized_crop_image(img, top, left, height, width, self.size, INTERPOLATION, antialias=True)
        # v2.RandomHorizontalFlip(p=0.5) flips unless torch.rand(1) >= p: the same single draw.
        if self.hflip and torch.rand(1) < 0.5:
            img = TF.horizontal_flip_image(img)
        return img


def eval_frame(image_size: int) -> Frame:
    """`eval_transform` up to the float conversion: PIL RGB image or uint8 (3, H, W) -> uint8 (3,
    image_size, image_size), to be finished by `to_signed_float`."""
    return Frame(image_size)


def eval_transform(image_size: int) -> torch.nn.Sequential:
    """PIL RGB image or uint8 (3, H, W) -> float32 (3, image_size, image_size) in [-1, 1]: centre square
    crop, bicubic antialiased resize, (x / 255 - 0.5) / 0.5 (`eval_frame`, then `to_signed_float`)."""
    return torch.nn.Sequential(Frame(image_size), SignedFloat())


def train_transform(image_size: int, crop_scale: tuple[float, float], hflip: bool) -> RandomCropFlip:
    """The training augmentation of appendix A: random resized crop (area fraction in `crop_scale`,
    aspect ratio 3/4..4/3) and, if `hflip`, a random horizontal flip. Output as `eval_frame`: uint8, to
    be finished per batch by `to_signed_float` on the training device. On a 2-core Zen 3 that made the
    demo tokenizer's loader 1.3x faster than converting image by image (`benchmarks/loader_ab.py`), and it
    moves a quarter of the bytes to a GPU."""
    return RandomCropFlip(image_size, crop_scale, hflip)


class SampleKey(NamedTuple):
    """What `ResumableSampler` yields: a dataset index and the seed of that sample's augmentation, so the
    augmentation depends only on the position in the sample stream (not on workers or on resuming)."""

    index: int
    seed: int


def unpack_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset key -> (index, augmentation seed or None). Plain integers use the ambient RNG."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def apply_transform(transform: Callable, image, seed: int | None) -> torch.Tensor:
    """Run `transform` on `image`; with a seed, its random draws come from the CPU generator seeded with it,
    and the caller's RNG state is left untouched (torchvision's transforms draw from the global RNG)."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: do not reseed CUDA generators
        return transform(image)


# ------------------------------------------------------------------------------- uint8 <-> float, saving


def to_signed_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 in [-1, 1], the inverse of `to_uint8`: the last step of
    `eval_transform` (`SignedFloat`) alone, equal bit for bit to it applied image by image (x / 127.5 - 1
    differs in the last bit for 111 of the 256 values). Loaders that move uint8 batches (a quarter of the
    bytes: `tokenize`, and training with `train_transform`) convert after the transfer, on the device, in
    one call per batch. Float images are returned as float32, unchanged."""
    if images.dtype == torch.uint8:
        return _SIGNED_FLOAT(images)
    return images.float()


_SIGNED_FLOAT = SignedFloat()  # stateless


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any shape, e.g. (B, 3, H, W)) -> uint8 via round((x + 1) * 127.5), clamped.
    The one rounding used for every saved image and metric input; it inverts the loaders' conversion.
    uint8 images are returned as they are (read as [-1, 1] floats, every pixel became 255)."""
    if x.dtype == torch.uint8:
        return x
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] or uint8 -> one uint8 (3, H', W') grid, `nrow` images per row
    (default: a near-square grid)."""
    from torchvision.utils import make_grid as tv_make_grid

    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return tv_make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=255)


def save_png(
    image: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, sync_folder: bool = True
) -> Path:
    """Write a (3, H, W) image or a (B, 3, H, W) batch (as a grid, `nrow` images a row) to `path`, which
    must end in .png.
    Float input is read as [-1, 1]; uint8 as is. The file is written atomically (a full disk is a
    one-line UserError and leaves any earlier file intact); parents are created. Without `sync_folder` its
    folder is not fsynced after the rename: the caller does that (`smapctl.io.fsync_dir`) once it has
    written all its files."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: images are saved as PNG; use a .png file name")
    if image.ndim == 4:
        image = make_grid(image, nrow)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    array = image.cpu().permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
    with atomic_output(path, "the image", sync_folder=sync_folder) as f:
        Image.fromarray(array).save(f, format="PNG")
    return path
