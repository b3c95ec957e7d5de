"""The training loader as smapctl runs it against the two pipelines before it, alternating in one process.

    python benchmarks/loader_ab.py            # the demo tokenizer's loader: digits at 32 px, batches of 64
    python benchmarks/loader_ab.py --quick    # a few batches (used by the test suite for correctness only)

Three loaders over the same samples with the same seeds, timed round-robin per batch (this host's speed
drifts by 10-30% within minutes, so only times taken side by side compare):
- `torchvision`: the v2 `Compose` smapctl first used (ToImage, RandomResizedCrop, ToDtype, Normalize,
  ToPureTensor), float32 per image;
- `per image`: `train_transform` (torchvision's kernels called directly, `RandomCropFlip`) followed by the
  float conversion `SignedFloat` on every image, as smapctl did until the loader moved uint8 frames;
- `smapctl`: `train_transform` alone, uint8 frames collated, then one `to_signed_float` call per batch, as
  the tokenizer's training step does on its device.
Every batch of the three must be equal bit for bit (the script stops if not); it prints the median time
per batch of each and the medians of the paired speed-ups of `smapctl` over the other two. The demo recipe
reads in the training process (`data.num_workers: 0`), serially with the step, so this time is part of
every step.
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
    from smapctl.data.images import SignedFloat, to_signed_float, train_transform
    from smapctl.runtime import tune_host_allocator

    tune_host_allocator()  # as every `smapctl` command does
    size, scale, batch = 32, (0.85, 1.0), 64  # recipes/demo/tokenizer.yaml
    batches = 3 if args.quick else args.batches
    data = load_embedded("digits", size)
    ours = train_transform(size, scale, hflip=False)
    to_float = to_signed_float
    pipelines = {  # name: (per-sample transform, per-batch finish)
        "torchvision": (torchvision_pipeline(size, scale), lambda x: x),
        "per image": (v2.Compose([ours, SignedFloat()]), lambda x: x),
        "smapctl": (ours, to_float),
    }
    loaders = {}
    for name, (transform, _) in pipelines.items():
        dataset = TensorImageDataset(data.train_images, data.train_labels, data.class_names, transform)
        loaders[name] = iter(make_loader(dataset, batch, shuffle=True, seed=0, drop_last=True, endless=True))
    times = {name: [] for name in pipelines}
    for i in range(batches + 1):  # the first round is warm-up
        got = {}
        for name, (_, finish) in pipelines.items():
            t = time.perf_counter()
            images, labels = next(loaders[name])
            images = finish(images)
            elapsed = time.perf_counter() - t
            got[name] = images, labels
            if i:
                times[name].append(elapsed)
        ref = got["torchvision"]
        for name, (images, labels) in got.items():
            if not (torch.equal(images, ref[0]) and torch.equal(labels, ref[1])):
                sys.exit(f"batch {i}: the {name} loader differs from torchvision's")
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    paired = {
        name: statistics.median(r / o for r, o in zip(times[name], times["smapctl"], strict=True))
        for name in ("torchvision", "per image")
    }
    print(f"{batches} batches of {batch} digits at {size} px, equal bit for bit")
    print(", ".join(f"{name} {ms[name]:.1f} ms" for name in pipelines) + " per batch")
    print(
        f"smapctl's paired speed-up: {paired['torchvision']:.2f}x over torchvision's pipeline, "
        f"{paired['per image']:.2f}x over converting per image"
    )


if __name__ == "__main__":
    main()
