"""Shared by the tests of tokenize, decode and token files: small class folders of random PNGs, the model's
own reconstruction path, and the one-line error of a CLI run."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smapctl.data.images import eval_transform, load_image, to_uint8

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"1": 2, "3": 2, "7": 3}  # class folder -> number of images


def write_image(path: Path, seed: int | np.random.Generator, size=(24, 20)) -> Path:
    """A random RGB PNG (width x height = size); not square and not 16 px, so eval_transform crops and
    resizes. `seed` may be a generator shared by several images (each draws on from where the last left
    it); its parent folders are made."""
    rng = np.random.default_rng(seed)  # a Generator is used as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def direct(tok, paths, labels, k):
    """The model's own path: eval_transform -> encode -> first k tokens -> decode, as uint8 images."""
    x = torch.stack([eval_transform(tok.model.cfg.image_size)(load_image(p)) for p in paths])
    with torch.inference_mode():
        out = tok.model.encode(x, labels)
        if out.indices is not None:
            return out.indices[:, :k], to_uint8(tok.model.decode_indices(out.indices[:, :k], labels))
        return out.z[:, :k], to_uint8(tok.model.decode(out.z[:, :k], labels))


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def one_line_error(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def class_folders(root: Path) -> Path:
    """root/<class>/<i>.png for the classes in CLASSES (random PNGs, seeds 0, 1, ...)."""
    seed = 0
    for name, n in CLASSES.items():
        for i in range(n):
            write_image(root / name / f"{i}.png", seed)
            seed += 1
    return root
