"""The memory the rows of tokens take while they are made: made in memory then written (as smapctl did
before), against made in a file through a memory map (`smapctl.safetensors_io.MappedSafetensors`); for a
generator's token cache (its own file) or, with `--tokenize`, for `smapctl tokenize` (a scratch file
beside the token file, which is then written from it).

    python benchmarks/cache_memory.py                # 2 GiB of rows (262144 x 128 x 16 float32)
    python benchmarks/cache_memory.py --gib 8        # more
    python benchmarks/cache_memory.py --tokenize     # tokenize's rows, written to a `.pt` token file
    python benchmarks/cache_memory.py --quick        # a few MiB (used by the test suite for correctness)

Each way runs in its own process, which fills the rows batch by batch through the code smapctl uses (the
token cache's `_CacheRows`, what `load_or_build_latents` uses; tokenize's `_TokenRows`) and then writes
the file; it reports its peak of anonymous memory (RssAnon: memory only swap can take back), its peak of
file pages (RssFile: page cache the kernel writes back and can drop) and the wall time. Both files must
be equal byte for byte (the script stops if not). An ImageNet cache with its mirror images is 2.56M x 128
x 16 float32 (21 GB); ImageNet's token file, 1.28M x 128 x 16 (10.5 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K, C, BATCH = 128, 16, 256


def rss() -> dict[str, int]:
    """RssAnon and RssFile of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def build(way: str, rows: int, path: Path) -> dict:
    """Fill `rows` rows as the token cache does, batch by batch, and write the cache at `path`."""
    from smapctl.data import latents

    meta = latents._cache_meta("0" * 16, "bench", "")
    out = latents._CacheFile(path, meta) if way == "mapped" else None
    made = latents._CacheRows(rows, None, 0, out)
    peak = rss()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for at in range(0, rows, BATCH):
        n = min(BATCH, rows - at)
        made.add(torch.randn(n, 1, K, C, generator=g), torch.full((n,), at % 1000))
        peak = {k: max(v, rss()[k]) for k, v in peak.items()}
    cache = latents.LatentCache(
        made.tokens, made.labels, meta["fingerprint"], meta["dataset"], meta["images"]
    )
    if out is not None:
        out.write(cache, None)
        out.close()
    else:
        latents.write_latents(path, cache)
    peak = {k: max(v, rss()[k]) for k, v in peak.items()}
    return {"way": way, "seconds": time.perf_counter() - start, **{f"peak_{k}": v for k, v in peak.items()}}


def tokenize(way: str, rows: int, path: Path) -> dict:
    """Fill `rows` rows as `smapctl tokenize` does, batch by batch, and write its token file at `path`."""
    from smapctl.ops import codes as files
    from smapctl.ops import tokenize as tok

    shape = (rows, K, C)
    made = tok._TokenRows(path, shape, torch.float32) if way == "mapped" else None
    tokens = made.tokens if made is not None else torch.empty(shape)
    peak = rss()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for at in range(0, rows, BATCH):
        n = min(BATCH, rows - at)
        tokens[at : at + n] = torch.randn(n, K, C, generator=g)
        peak = {k: max(v, rss()[k]) for k, v in peak.items()}
    codes = files.Codes(
        tokens=made.head(rows) if made is not None else tokens,
        labels=torch.arange(rows) % 1000,
        paths=[f"{i % 1000}/{i}.JPEG" for i in range(rows)],
        prefix=K,
        num_tokens=K,
        regularizer="kl",
        image_size=256,
        fingerprint="0" * 16,
        checkpoint="/bench",
        weights="ema",
        class_names=[str(i) for i in range(1000)],
    )
    files.save_codes(codes, path)
    if made is not None:
        made.close()
    peak = {k: max(v, rss()[k]) for k, v in peak.items()}
    return {"way": way, "seconds": time.perf_counter() - start, **{f"peak_{k}": v for k, v in peak.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the rows (default 2 GiB)")
    parser.add_argument("--quick", action="store_true", help="a few MiB, for correctness only")
    parser.add_argument(
        "--tokenize", action="store_true", help="the rows of `smapctl tokenize`, not a token cache's"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="an existing folder to write the two caches in (a temp folder)"
    )
    parser.add_argument("--child", nargs=4, metavar=("WHAT", "WAY", "ROWS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, way, rows, path = args.child
        print(json.dumps((tokenize if what == "tokenize" else build)(way, int(rows), Path(path))))
        return
    if args.dir is not None and not args.dir.is_dir():  # (tempfile's own error is a traceback)
        parser.error(f"--dir {args.dir}: not an existing folder")
    what = "tokenize" if args.tokenize else "cache"
    suffix = ".pt" if args.tokenize else ".safetensors"
    rows = 1000 if args.quick else int(args.gib * 2**30 / (K * C * 4))
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        results, files = [], []
        for way in ("memory", "mapped"):
            path = Path(folder) / way / f"tokens{suffix}"  # (one name: a `.pt` file holds its own)
            child = [sys.executable, __file__, "--child", what, way, str(rows), str(path)]
            results.append(
                json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            )
            files.append(path)
        if files[0].read_bytes() != files[1].read_bytes():
            sys.exit("the two caches differ")
    gib = rows * K * C * 4 / 2**30
    made = "a token file (tokenize)" if args.tokenize else "a token cache"
    print(
        f"{made}: {rows} rows x {K} x {C} float32 = {gib:.2f} GiB of tokens, batches of {BATCH}; the files"
        " are equal"
    )
    print(f"{'way':<8} {'peak RssAnon':>14} {'peak RssFile':>14} {'seconds':>9}")
    for r in results:
        anon, file = r["peak_RssAnon"] / 2**30, r["peak_RssFile"] / 2**30
        print(f"{r['way']:<8} {anon:>10.2f} GiB {file:>10.2f} GiB {r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()
