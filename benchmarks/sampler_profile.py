"""Where CARD's KV-cached sampler spends its time: `torch.profiler` over one sampling of 8 images (CFG 2.0
constant, 25 Euler steps, as run.py's sampling cases), its operators grouped by their input shapes, with the
GFLOP/s of each matrix product.

    python benchmarks/sampler_profile.py                  # run.py's K = 128 model, its first 32 tokens
    python benchmarks/sampler_profile.py --shape tiny --tokens 64
    python benchmarks/sampler_profile.py --threads 1      # (default: torch's own thread count)
    python benchmarks/sampler_profile.py --quick          # smallest shape (used by the test suite)

Prints the wall time per token and the operators taking the most time (self CPU time, summed over the
threads' work as the profiler counts it) with their share of the total. A matrix product's rate is its
FLOPs (2 m k n) over its time per call: a product far below the machine's matmul peak (run.py's
`matmul_fp32`) costs its latency or its weight's trip from memory, not its arithmetic. The profiler's own
allocations can make kernels that write fresh memory look slower than they are (breakdown.py's note):
compare the profiled sampling's wall time with the unprofiled one printed above the table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from run import GENERATOR_SHAPES, card_model
from torch.profiler import ProfilerActivity, profile

PRODUCTS = {"aten::addmm": (1, 2), "aten::mm": (0, 1), "aten::bmm": (0, 1)}  # op: (A, B) argument indices


def product_gflops(name: str, shapes: list, us_per_call: float) -> float | None:
    """GFLOP/s of one call of a matrix product with these input shapes, None for any other operator."""
    if name not in PRODUCTS or us_per_call <= 0:
        return None
    a, b = (shapes[i] for i in PRODUCTS[name])
    if len(a) < 2 or len(b) < 2:
        return None
    batch = math.prod(a[:-2]) if len(a) > 2 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1] / us_per_call / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(GENERATOR_SHAPES), default="K128")
    parser.add_argument("--tokens", type=int, default=32, help="tokens drawn in the profiled sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=14, help="operators listed")
    parser.add_argument("--quick", action="store_true", help="smallest shape, 4 tokens")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = card_model(args.shape, args.quick)
    tokens = 4 if args.quick else min(args.tokens, model.cfg.num_tokens)
    labels = torch.arange(8)

    def sample():
        return model.sample(labels, cfg_scale=2.0, steps=25, num_tokens=tokens, use_kv_cache=True)

    with torch.inference_mode():
        sample()  # warm-up
        start = time.perf_counter()
        sample()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            sample()
            profiled = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    shape = "quick" if args.quick else args.shape
    print(f"CARD {shape}, KV cache, 8 images, {tokens} tokens, {torch.get_num_threads()} threads")
    print(f"wall: {wall:.3f} s, {1e3 * wall / tokens:.2f} ms per token; {profiled:.3f} s profiled")
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
    print(f"matrix products: {100 * products / total:.1f}% of the profiled CPU time")
    print()
    print("| operator | input shapes | calls | ms | share | us/call | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        per_call = e.self_cpu_time_total / e.count
        rate = product_gflops(e.key, e.input_shapes, per_call)
        print(
            f"| {e.key} | {e.input_shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} |"
            f" {100 * e.self_cpu_time_total / total:.1f}% | {per_call:.1f} |"
            f" {'' if rate is None else f'{rate:.0f}'} |"
        )


if __name__ == "__main__":
    main()
