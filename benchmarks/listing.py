"""How long `smapctl tokenize` takes to list and label its inputs before the first image is read.

    python benchmarks/listing.py                       # 100 class folders of 1,280 empty files (128,000)
    python benchmarks/listing.py --against /tmp/old    # alternating with another checkout's code
    python benchmarks/listing.py --quick               # 4 folders of 8 files (the test suite, correctness)

It makes an ImageNet-like tree of empty `.JPEG` files (`n%08d/n%08d_%d.JPEG`) in a temporary folder and
times `list_inputs` (finding the files, their relative paths) and `resolve_labels` (each image's class from
its folder, for a tokenizer with 1,000 classes) on it, each run in a fresh process (the folder cache warm
after the first). With `--against DIR` (e.g. `git worktree add /tmp/old <commit>`), runs of that checkout's
`smapctl` alternate with this one's, and the script stops if their paths, relative paths or labels differ.
Prints the median seconds of each and of their paired ratios; nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def child(code: str, root: str, classes: int) -> None:
    """One timed listing with the `smapctl` of `code`; prints a JSON line."""
    sys.path.insert(0, code)
    from types import SimpleNamespace

    import smapctl

    try:
        from smapctl.ops.inputs import list_inputs, resolve_labels
    except ImportError:  # a checkout from before `ops/tokenize.py` was split (e5a536f)
        from smapctl.ops.tokenize import list_inputs, resolve_labels

    assert Path(smapctl.__file__).resolve().is_relative_to(Path(code).resolve()), smapctl.__file__
    cfg = SimpleNamespace(class_condition=True)
    tok = SimpleNamespace(class_names=[f"n{c:08d}" for c in range(classes)], model=SimpleNamespace(cfg=cfg))
    start = time.perf_counter()
    images = list_inputs([root])
    listed = time.perf_counter()
    labels = resolve_labels(images, tok, None)
    done = time.perf_counter()

    def digest(items) -> str:
        return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]

    out = {"list": listed - start, "labels": done - listed, "total": done - start, "files": len(labels)}
    out["digest"] = digest([digest(images.paths), digest(images.relative), digest(labels)])
    print(json.dumps(out))


def make_tree(root: Path, folders: int, per_folder: int) -> None:
    for c in range(folders):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            (folder / f"n{c:08d}_{i}.JPEG").touch()


def run(code: Path, root: Path, classes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(code), str(root), str(classes)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--per-folder", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each checkout, after one warm-up")
    ap.add_argument("--against", type=Path, help="another checkout whose runs alternate with this one's")
    ap.add_argument("--quick", action="store_true", help="4 folders of 8 files, one timed run")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    if args.quick:
        args.folders, args.per_folder, args.repeats = 4, 8, 1
    codes = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        make_tree(root, args.folders, args.per_folder)
        classes = max(1000, args.folders)
        for code in codes.values():  # warm-up: the folder cache, the imports' .pyc files
            run(code, root, classes)
        times = {name: [] for name in codes}
        digests = set()
        for _ in range(args.repeats):
            for name, code in codes.items():
                r = run(code, root, classes)
                times[name].append(r)
                digests.add(r["digest"])
        if len(digests) > 1:
            sys.exit("the checkouts list different paths, relative paths or labels")
    n = args.folders * args.per_folder
    print(f"{n:,} files in {args.folders} folders, {args.repeats} runs each (median seconds):")
    for name, runs in times.items():
        parts = {key: statistics.median(r[key] for r in runs) for key in ("list", "labels", "total")}
        print(f"  {name} ({codes[name]}): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    if args.against:
        pairs = zip(times["this"], times["against"], strict=True)
        ratio = statistics.median(a["total"] / t["total"] for t, a in pairs)
        print(f"  paired speed-up of this checkout: {ratio:.2f}x (the same paths and labels)")


if __name__ == "__main__":
    main()
