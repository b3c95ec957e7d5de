"""Where a tokenizer training step's time goes, measured on unprofiled steps.

    python benchmarks/breakdown.py                        # B shape, bf16 (the shape of issue 9)
    python benchmarks/breakdown.py --shape tiny --precision fp32
    python benchmarks/breakdown.py --compile              # the step as `train.compile: true` runs it
    python benchmarks/breakdown.py --quick                # smallest shape, used by the test suite

torch.profiler is not used: its own allocations fragment the heap, so the steps it records (and later
ones) fault fresh pages in - tens of thousands per step on the B shape - and the kernels that write new
memory, the dtype casts first, look several times slower than they are. Instead this script
- times the phases of plain steps (forward, backward, optimizer) and counts their page faults;
- records the step's matmuls (mm, addmm, bmm after autocast, through a dispatch mode), replays them alone
  on cold operands of the same shapes, strides and dtypes, and compares their time with the step's: the
  rest is everything that is not a matmul (attention's softmax, LayerNorm, GELU, casts, AdamW, Python);
- times the attention core (q k^T, softmax, x v; forward + backward) of all layers, as smapctl computes
  it and as SDPA does;
- compares the fused AdamW step with a plain copy of the parameters' bytes (memory bandwidth);
- times every op of a step one by one (a dispatch mode around each call; CPU ops are synchronous) and
  lists the costliest ops that are not matmuls, dtype casts split by direction.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from run import TokenizerStep, case_matmul, count_flops, median_time
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
_COLD_COPIES = 4  # operands per distinct spec, cycled: more bytes than the last-level cache holds


class RecordMatmuls(TorchDispatchMode):
    """Records (op, operand specs) of every matmul run under it; specs are (shape, stride, dtype)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            specs = tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.calls.append((func, specs))
        return func(*args, **(kwargs or {}))


class TimeOps(TorchDispatchMode):
    """Seconds and calls per op over everything run under it, each op timed around its own call (the
    mode's Python between ops is not counted). Dtype casts are keyed by direction, e.g.
    `_to_copy float32->bfloat16`."""

    def __init__(self):
        super().__init__()
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        name = func.overloadpacket.__name__
        if name == "_to_copy" and "dtype" in kwargs:
            name += f" {str(args[0].dtype)[6:]}->{str(kwargs['dtype'])[6:]}"
        self.seconds[name] += elapsed
        self.calls[name] += 1
        return out


def op_times(step: TokenizerStep, repeats: int) -> TimeOps:
    """`TimeOps` over `repeats` steps (divide by `repeats` for one step)."""
    timer = TimeOps()
    with timer:
        for _ in range(repeats):
            step()
    return timer


def matmul_flops(func, specs) -> int:
    a, b = specs[-2][0], specs[-1][0]  # addmm: (bias, a, b)
    batch = a[0] if func is torch.ops.aten.bmm.default else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def replay(calls) -> float:
    """Median seconds to run `calls` alone, each operand drawn from a few cold copies of its spec."""
    pools = {}
    for _, specs in calls:
        for spec in specs:
            if spec not in pools:
                shape, stride, dtype = spec
                copies = (
                    torch.empty_strided(shape, stride, dtype=dtype).normal_() for _ in range(_COLD_COPIES)
                )
                pools[spec] = itertools.cycle(list(copies))
    program = [(func, [next(pools[s]) for s in specs]) for func, specs in calls]

    def run():
        for func, args in program:
            func(*args)

    return median_time(run, 3, warmup=1)


def phases(step: TokenizerStep, repeats: int, net=None) -> dict:
    for _ in range(3 if net is not None else 2):  # compiling: the first call (and a recompile)
        step(net)
    times = {"forward": [], "backward": [], "optimizer": [], "step": [], "faults": []}
    for _ in range(repeats):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = step.forward(net)
        t1 = time.perf_counter()
        step.backward(loss)
        t2 = time.perf_counter()
        step.update()
        t3 = time.perf_counter()
        times["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        for name, t in zip(
            ("forward", "backward", "optimizer", "step"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True
        ):
            times[name].append(t)
    return {name: statistics.median(v) for name, v in times.items()}


def attention_core(step: TokenizerStep, repeats: int) -> dict:
    """Forward + backward of the attention core of every layer at the full sequence length (the last
    block of each tower attends from fewer rows), with its own q, k, v per layer so each starts cold:
    smapctl's kernel choice against SDPA."""
    from smapctl.models.attention import attend

    cfg = step.cfg
    tokens = cfg.num_patches + int(cfg.class_condition) + cfg.num_latent_tokens
    dtype = torch.bfloat16 if step.precision == "bf16" else torch.float32
    out = {}
    for name, fn in (("smapctl", attend), ("sdpa", F.scaled_dot_product_attention)):
        layers = []
        for width, heads, depth in (
            (cfg.enc_width, cfg.enc_heads, cfg.enc_depth),
            (cfg.dec_width, cfg.dec_heads, cfg.dec_depth),
        ):
            shape = (step.batch, heads, tokens, width // heads)
            for _ in range(depth):
                qkv = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
                layers.append((qkv, torch.randn(shape, dtype=dtype)))

        def run(fn=fn, layers=layers):
            for (q, k, v), grad in layers:
                fn(q, k, v).backward(grad)

        out[name] = median_time(run, repeats)
    return out


def adamw_bandwidth(step: TokenizerStep, optimizer_s: float) -> dict:
    """GB/s of the optimizer step (AdamW reads param, grad, both moments; writes param and moments: 7
    accesses of 4 bytes per parameter) against a plain copy of the parameters' bytes."""
    n = sum(p.numel() for p in step.model.parameters())
    src, dst = torch.randn(n), torch.empty(n)
    copy_s = median_time(lambda: dst.copy_(src), 5)
    return {"params": n, "adamw_gbs": 28 * n / optimizer_s / 1e9, "copy_gbs": 8 * n / copy_s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="B", choices=["tiny", "B"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps (medians)")
    ap.add_argument("--compile", action="store_true", help="compile the model (inductor) for the timed steps")
    ap.add_argument("--quick", action="store_true", help="smallest shape, one timed step")
    args = ap.parse_args()
    from smapctl.runtime import tune_host_allocator

    tune_host_allocator()  # as every `smapctl` command does
    repeats = 1 if args.quick else args.repeats
    peak = case_matmul(args.precision, repeats, args.quick)["gflops"]
    step = TokenizerStep(args.shape, args.precision, args.quick)
    flops = count_flops(step)
    recorder = RecordMatmuls()
    with recorder:
        step()
    t = phases(step, repeats, torch.compile(step.model) if args.compile else None)
    matmul_s = replay(recorder.calls)
    mm_flops = sum(matmul_flops(f, s) for f, s in recorder.calls)
    attn = attention_core(step, repeats)
    bw = adamw_bandwidth(step, t["optimizer"])
    ops = op_times(step, repeats)

    label = " ".join([args.shape, args.precision] + ["compiled"] * args.compile + ["(quick)"] * args.quick)
    step_s = t["step"]
    rest = step_s - matmul_s
    print(f"{label}: matmul peak {peak:.0f} GFLOP/s (2048^3), model {flops / 1e9:.1f} GFLOP per step")
    print(
        f"step {step_s:.3f} s = {step.batch / step_s:.3g} images/s, {flops / step_s / 1e9:.0f} GFLOP/s, "
        f"{100 * flops / step_s / 1e9 / peak:.0f}% of peak; page faults per step {t['faults']:.0f}"
    )
    print(f"  forward {t['forward']:.3f} s, backward {t['backward']:.3f} s, optimizer {t['optimizer']:.3f} s")
    mm_rate = mm_flops / matmul_s / 1e9
    print(
        f"  matmuls ({len(recorder.calls)} calls, {mm_flops / 1e9:.1f} GFLOP) replayed alone: "
        f"{matmul_s:.3f} s = {mm_rate:.0f} GFLOP/s ({100 * mm_rate / peak:.0f}% of peak)"
    )
    print(f"  everything else: {rest:.3f} s ({100 * rest / step_s:.0f}% of the step)")
    print(
        f"  attention core, all layers, fwd + bwd: {attn['smapctl']:.3f} s as smapctl runs it, "
        f"SDPA {attn['sdpa']:.3f} s"
    )
    print(
        f"  AdamW over {bw['params'] / 1e6:.1f}M parameters: {t['optimizer']:.3f} s = "
        f"{bw['adamw_gbs']:.0f} GB/s; a plain copy moves {bw['copy_gbs']:.0f} GB/s"
    )
    names = {f.overloadpacket.__name__ for f in _MATMULS}
    per_step = {name: sec / repeats for name, sec in ops.seconds.items()}
    mm_s = sum(v for k, v in per_step.items() if k in names)
    other = sorted(((v, k) for k, v in per_step.items() if k not in names), reverse=True)
    print(
        f"  ops timed one by one: matmuls {mm_s:.3f} s, other ops {sum(v for v, _ in other):.3f} s; "
        "the costliest others (ms per step, calls):"
    )
    for sec, name in other[:12]:
        print(f"    {name:<34} {1e3 * sec:7.1f}  {ops.calls[name] // repeats:5d}")


if __name__ == "__main__":
    main()
