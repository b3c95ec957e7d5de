"""Image sets on disk: the ADM evaluator's `.npz` format.

The ADM evaluator (openai/guided-diffusion, `evaluations/evaluator.py`) reads the array `arr_0`, uint8,
shaped (N, H, W, 3); the paper's gFID follows it, so `smapctl sample` writes that file too.
"""

import zipfile
from pathlib import Path

import numpy as np

from smapctl.errors import UserError
from smapctl.io import atomic_output


def _check_nhwc_uint8(images: np.ndarray) -> str | None:
    """Why `images` is not a uint8 (N, H, W, 3) array, or None if it is."""
    if images.dtype != np.uint8:
        hint = (
            " (pixel values 0..255: np.clip(x, 0, 255).astype(np.uint8))" if images.dtype.kind == "f" else ""
        )
        return f"dtype {images.dtype}, expected uint8{hint}"
    if images.ndim != 4 or images.shape[-1] != 3:
        return f"shape {images.shape}, expected (N, H, W, 3)"
    return None


def write_npz(
    path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, kept: str | None = None
) -> Path:
    """Write uint8 images (N, H, W, 3) as `arr_0` of an uncompressed `.npz`, atomically; returns the path.
    With `labels` (N,) integer class ids they go in `arr_1`, as guided-diffusion's `image_sample.py` stores
    class-conditional samples (the ADM evaluator reads `arr_0` only; `evaluate` reads both). A failed
    write (disk full) is a one-line UserError and leaves any earlier file intact (`kept`: what the
    message says is intact instead)."""
    images = np.asarray(images)
    problem = _check_nhwc_uint8(images)
    if problem:
        raise ValueError(f"write_npz: {problem}")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"write_npz: labels of shape {labels.shape}, expected ({len(images)},) integers")
        arrays["arr_1"] = labels.astype(np.int64)
    path = Path(path)
    with atomic_output(path, "the .npz file", kept) as f:  # a reader never sees a half-written file
        np.savez(f, **arrays)
    return path


def _check_zip(path: str | Path) -> None:
    """An `.npz` is a zip archive of `.npy` arrays: anything else is named so (numpy takes a text file for
    pickled data, and its message advises loading it unsafely)."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)")


def npz_arrays(path: str | Path) -> list[str]:
    """The names of the arrays in a `.npz`; an unreadable file is a UserError."""
    _check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None


def read_npz(path: str | Path) -> np.ndarray:
    """Read `arr_0` (uint8, (N, H, W, 3)) from an ADM-style `.npz`; any other content is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: .npz file not found")
    _check_zip(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UserError(
                    f"{path}: no 'arr_0' array in the .npz (found: {', '.join(data.files) or 'none'})"
                )
            images = data["arr_0"]
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    problem = _check_nhwc_uint8(images)
    if problem:
        raise UserError(f"{path}: 'arr_0' has {problem}")
    return images
