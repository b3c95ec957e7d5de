"""The training loader with smapctl's augmentation against torchvision's v2 pipeline, alternating.

    python benchmarks/loader_ab.py            # the demo tokenizer's loader: digits at 32 px, batches of 64
    python benchmarks/loader_ab.py --quick    # a few batches (used by the test suite for correctness only)

`smapctl.data.images.train_transform` calls torchvision's kernels directly (`RandomCropFlip`,
`SignedFloat`); the reference is the v2 `Compose` it replaced (ToImage, RandomResizedCrop, ToDtype,
Normalize, ToPureTensor). Both loaders draw the same samples with the same seeds, so every pair of
batches must be equal bit for bit; the script checks it and prints the median time per batch and the
median of the paired speed-ups. The demo recipe reads in the training process (`data.num_workers: 0`),
serially with the step, so this time is part of every step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torchvision_pipeline(size: int, scale: tuple[float, float]) -> v2.Compose:
    from smapctl.data.images import INTERPOLATION

    ratio = (3 / 4, 4 / 3)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale, ratio=ratio, interpolation=INTERPOLATION, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
            v2.ToPureTensor(),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few batches, for the test suite")
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()

    from smapctl.data.datasets import make_loader
    from smapctl.data.embedded import TensorImageDataset, load_embedded
    from smapctl.data.images import train_transform
    from smapctl.runtime import tune_host_allocator

    tune_host_allocator()  # as every `smapctl` command does
    size, scale, batch = 32, (0.85, 1.0), 64  # recipes/demo/tokenizer.yaml
    batches = 3 if args.quick else args.batches
    data = load_embedded("digits", size)
    loaders = {}
    for name, transform in (
        ("torchvision", torchvision_pipeline(size, scale)),
        ("smapctl", train_transform(size, scale, hflip=False)),
    ):
        dataset = TensorImageDataset(data.train_images, data.train_labels, data.class_names, transform)
        loaders[name] = iter(make_loader(dataset, batch, shuffle=True, seed=0, drop_last=True, endless=True))
    pairs = []
    for i in range(batches + 1):  # the first pair is warm-up
        t = time.perf_counter()
        ref = next(loaders["torchvision"])
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours = next(loaders["smapctl"])
        t_ours = time.perf_counter() - t
        if not (torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])):
            sys.exit(f"batch {i}: the two loaders differ")
        if i:
            pairs.append((t_ref, t_ours))
    ref_ms = 1e3 * statistics.median(r for r, _ in pairs)
    ours_ms = 1e3 * statistics.median(o for _, o in pairs)
    speedup = statistics.median(r / o for r, o in pairs)
    print(f"{batches} batches of {batch} digits at {size} px, equal bit for bit")
    print(f"torchvision v2 pipeline {ref_ms:.1f} ms, smapctl {ours_ms:.1f} ms per batch")
    print(f"paired speed-up {speedup:.2f}x")


if __name__ == "__main__":
    main()
