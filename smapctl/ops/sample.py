"""Class-conditional sampling from a trained generator: PNG files, a grid, and the ADM `.npz`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smapctl.errors import UserError


@dataclass
class SampleResult:
    out_dir: Path
    files: list[Path]
    grid: Path
    npz: Path | None
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,)


def parse_classes(spec: str, class_names: list[str]) -> list[int]:
    """`all`, or comma-separated class names or ids -> class ids (unknown ones: one-line error)."""
    if spec.strip() == "all":
        return list(range(len(class_names)))
    ids = []
    for item in (s.strip() for s in spec.split(",")):
        if item in class_names:
            ids.append(class_names.index(item))
        elif item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            shown = ", ".join(class_names[:12]) + (" ..." if len(class_names) > 12 else "")
            raise UserError(f"--classes: unknown class {item!r}; the generator's classes are: {shown}")
    return ids


def sample_images(
    checkpoint,
    out_dir: Path,
    *,
    classes: str = "all",
    per_class: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    npz: bool = False,
    device: str | None = None,
    **overrides,
) -> SampleResult:
    """Sample `per_class` images of each class; `overrides` are SamplingConfig fields (cfg_scale, ...).

    Deterministic for a seed: batch b draws from a generator seeded with (seed, b), so the images do not
    depend on anything else in the process.
    """
    from smapctl.data.images import make_grid, save_png, to_uint8
    from smapctl.eval.npz import write_npz
    from smapctl.train.generator import decode_tokens, generate, load_generator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, recipe, tok, stats, _ = load_generator(checkpoint, device)
    ids = parse_classes(classes, tok.class_names)
    if per_class < 1:
        raise UserError("--per-class: must be at least 1")
    labels = torch.tensor(ids).repeat_interleave(per_class)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    images = []
    for b, start in enumerate(tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch")):
        y = labels[start : start + batch_size].to(device)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        tokens = generate(model, recipe, y, generator=g, **overrides)
        images.append(to_uint8(decode_tokens(tok, tokens, y, stats)).cpu())
    images = torch.cat(images)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = [], {}
    for image, label in zip(images, labels.tolist(), strict=True):
        name = _safe(tok.class_names[label])
        i = counts[name] = counts.get(name, -1) + 1
        files.append(save_png(image, out_dir / f"{label:04d}_{name}_{i:05d}.png"))
    grid = save_png(make_grid(images, nrow=per_class if per_class > 1 else None), out_dir / "grid.png")
    npz_path = None
    if npz:
        npz_path = out_dir / "samples.npz"
        write_npz(npz_path, images.permute(0, 2, 3, 1).numpy())
    return SampleResult(out_dir, files, grid, npz_path, images, labels)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
