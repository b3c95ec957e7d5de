"""Throughput and memory of smapctl's hot paths on this machine; prints a table, writes RESULTS.md.

    python benchmarks/run.py                 # every case, medians of 5 timed runs after warm-up
    python benchmarks/run.py --quick         # smallest shapes, 1 timed run (used by the test suite)
    python benchmarks/run.py --only tok_train_tiny_bf16,card_tiny_kv   # prints; writes only with --out

Each case runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own. Model FLOPs
are counted by torch's FlopCounterMode (matmuls and attention; forward + backward for training) and
compared with the matmul peak measured in the same run, 2048^3 in fp32 and bf16, and with the same
product timed in the training case's own process, alternating with its steps (the "paired" figure; shared
hosts drift by 10-30% between cases, so the ratio of two cases is the noisier one). Attention's FLOPs are
counted on SDPA's math backend: FlopCounterMode does not see the CPU flash kernel, and the results
before 2026-11-25 left them out (about 8% of the B shape's FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------------- timing


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def count_flops(fn) -> int:
    """Model FLOPs of `fn`: every matmul, attention's two included (fwd 4*B*H*T*S*D, bwd twice that).
    SDPA runs its math backend while counting, because FlopCounterMode does not see the CPU flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------------------------------------- cases


def case_matmul(precision: str, repeats: int, quick: bool) -> dict:
    from smapctl.precision import native_bf16

    n = 512 if quick else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    runs, warmup = (max(repeats, 10), 2) if not quick else (1, 2)
    if precision == "bf16" and not quick and not native_bf16("cpu"):
        runs, warmup = 3, 1  # ~60 s per emulated 2048^3 product (Zen 3): 4 minutes instead of 12
    t = median_time(lambda: a @ b, runs, warmup)
    return {"gflops": 2 * n**3 / t / 1e9, "shape": f"{n}^3, median of {runs}"}


def case_linear_chain(precision: str, repeats: int, quick: bool) -> dict:
    """A ceiling for the B shape: F.linear through 24 *distinct* ViT-B MLP weights (768 -> 3072) at
    2 x 385 tokens, as a training step meets them (each weight cold in cache), in the given precision."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tokens, width, hidden, layers = (2 * 385, 768, 3072, 24) if not quick else (64, 64, 256, 2)
    x = torch.randn(1, tokens, width, dtype=dtype)
    ws = [torch.randn(hidden, width, dtype=dtype) for _ in range(layers)]
    bs = [torch.randn(hidden, dtype=dtype) for _ in range(layers)]
    t = median_time(lambda: [F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], max(repeats, 10))
    return {"gflops": 2 * tokens * width * hidden * layers / t / 1e9}


TOKENIZER_SHAPES = {
    # name: (image_size, patch, enc (depth, width, heads), dec (...), tokens, batch)
    "tiny": (64, 8, (4, 256, 4), (4, 256, 4), 32, 16),
    "B": (256, 16, (12, 768, 12), (12, 768, 12), 128, 2),
}


def tokenizer_config(shape: str, quick: bool):
    from smapctl.models.regularizers import KLConfig
    from smapctl.models.smap import SMAPConfig

    size, patch, enc, dec, tokens, batch = TOKENIZER_SHAPES[shape]
    if quick:
        size, enc, dec, tokens, batch = 32, (1, 64, 4), (1, 64, 4), 8, 4
    cfg = SMAPConfig(
        image_size=size,
        patch_size=patch,
        enc_depth=enc[0],
        enc_width=enc[1],
        enc_heads=enc[2],
        dec_depth=dec[0],
        dec_width=dec[1],
        dec_heads=dec[2],
        num_latent_tokens=tokens,
        num_classes=1000,
        regularizer=KLConfig(token_dim=16),
    )
    return cfg, batch


class TokenizerStep:
    """One optimisation step of the tokenizer as `train/tokenizer.py` takes it (pixel + KL losses), in
    phases: `forward` -> loss, `backward`, `update` (optimizer step, gradients dropped). Calling it runs
    all three; `net` replaces the model (its compiled form) in the forward."""

    def __init__(self, shape: str, precision: str, quick: bool):
        from smapctl.models.smap import SMAP
        from smapctl.train.config import TrainConfig
        from smapctl.train.schedule import build_optimizer

        self.cfg, self.batch = tokenizer_config(shape, quick)
        self.precision = precision
        torch.manual_seed(0)
        self.model = SMAP(self.cfg).train()
        self.optimizer = build_optimizer(self.model, TrainConfig(lr=1e-4))
        size = self.cfg.image_size
        self.x = torch.rand(self.batch, 3, size, size) * 2 - 1
        self.y = torch.randint(0, 1000, (self.batch,))
        # The full budget K: the FLOPs do not vary by step.
        self.keep = torch.full((self.batch,), self.cfg.num_latent_tokens)

    def forward(self, net=None) -> torch.Tensor:
        with autocast(self.precision):
            out = (self.model if net is None else net)(self.x, self.y, keep=self.keep)
            return (out.recon.float() - self.x).pow(2).mean() + out.reg.loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, net=None) -> None:
        self.backward(self.forward(net))
        self.update()


def case_tok_train(shape: str, precision: str, repeats: int, quick: bool, compile: bool = False) -> dict:
    """Tokenizer training steps (`TokenizerStep`); `compile` compiles the model as `train.compile: true`
    does (`torch.compile`, inductor)."""
    from smapctl.precision import native_bf16

    step = TokenizerStep(shape, precision, quick)
    net = torch.compile(step.model) if compile else step.model
    flops = count_flops(step)  # eager: the compiled step runs the same model FLOPs
    warmup = 3 if compile else 2  # compiling: the first call (and a recompile) are warm-up
    paired = {}
    if precision == "bf16" and not native_bf16("cpu"):  # no paired peak: an emulated product takes ~60 s
        t = median_time(lambda: step(net), repeats, warmup)
    else:
        # Each timed step follows a timing of the matmul peak (median of 3, as the matmul case takes the
        # median of 10), so their ratio sees one host speed: the matmul case ran minutes earlier, and
        # shared hosts drift by 10-30% over that time. Not the best of 3: on a host whose speed swings
        # within seconds it picks the fastest moments, which a step of several seconds averages out
        # (2048^3 in groups of 3 on the Zen 3 host: best of 3 1-17% above median of 3).
        n = 512 if quick else 2048
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(warmup):
            a @ b, step(net)
        peak = lambda: statistics.median(timed(lambda: a @ b) for _ in range(3))  # noqa: E731
        pairs, eager = [], []
        runs = (net, None) if compile else (net,)  # compiling: an eager step beside each compiled one
        for i in range(repeats):
            m = peak()
            t = {w: timed(lambda w=w: step(w)) for w in (runs if i % 2 == 0 else runs[::-1])}
            pairs.append((m, t[net]))
            if compile:
                eager.append(t[None])
        t = statistics.median(s for _, s in pairs)
        paired["peak_fraction_paired"] = statistics.median(flops / s / (2 * n**3 / m) for m, s in pairs)
        if compile:
            # The eager case runs minutes apart in its own process: on a drifting host the ratio of the
            # two cases can point the wrong way (it did on the AMX host, benchmarks/README.md).
            paired["compile_speedup_paired"] = statistics.median(
                e / s for e, (_, s) in zip(eager, pairs, strict=True)
            )
    batch = step.batch
    return {"images_per_s": batch / t, "flops_per_image": flops / batch, "gflops": flops / t / 1e9, **paired}


@torch.inference_mode()
def case_tok_codec(shape: str, precision: str, repeats: int, quick: bool) -> dict:
    """Encode-only and decode-only throughput at k = K/4, K/2 and K (decode cost falls with k)."""
    from smapctl.models.smap import SMAP

    cfg, _ = tokenizer_config(shape, quick)
    batch = 8 if not quick else 2
    torch.manual_seed(0)
    model = SMAP(cfg).eval()
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    y = torch.randint(0, 1000, (batch,))
    with autocast(precision):
        out = {"encode_images_per_s": batch / median_time(lambda: model.encode(x, y), repeats)}
        z = model.encode(x, y).z
        K = cfg.num_latent_tokens
        for k in (K // 4, K // 2, K):
            out[f"decode_k{k}_images_per_s"] = batch / median_time(
                lambda k=k: model.decode(z[:, :k], y), repeats
            )
    return out


def case_tokenize(repeats: int, quick: bool) -> dict:
    """`tokenize` end to end (PNG files -> codes file) against the bare encoder on the same images."""
    import smapctl.ops.tokenize as tok_ops
    from smapctl.data.images import save_png
    from smapctl.models.smap import SMAP
    from smapctl.recipe import load_tokenizer_recipe
    from smapctl.train import checkpoint as ckpt

    cfg, _ = tokenizer_config("tiny", quick)
    n = 1024 if not quick else 8  # a dataset's worth: the one-off loading of the tokenizer is amortised
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = load_tokenizer_recipe(ROOT / "recipes/demo/tokenizer.yaml")
        recipe.model = cfg
        torch.manual_seed(0)
        model = SMAP(cfg).eval()
        ckpt.save_checkpoint(
            tmp / "run",
            1,
            kind="tokenizer",
            recipe=recipe,
            weights={"model": model},
            meta={"class_names": [str(i) for i in range(1000)]},
        )
        images = tmp / "images" / "0"
        for i in range(n):
            save_png(torch.rand(3, cfg.image_size, cfg.image_size) * 2 - 1, images / f"{i:04d}.png")
        x = torch.rand(n, 3, cfg.image_size, cfg.image_size) * 2 - 1
        y = torch.zeros(n, dtype=torch.long)

        def bare():
            with torch.inference_mode():
                for i in range(0, n, 16):
                    model.encode(x[i : i + 16], y[i : i + 16])

        def end_to_end(workers=None):
            tok_ops.tokenize_images(
                [str(tmp / "images")],
                tmp / "codes.pt",
                checkpoint=str(tmp / "run"),
                weights="model",
                label="0",
                batch_size=16,
                workers=workers,
                device="cpu",  # as the bare encoder, on a GPU host too
                overwrite=True,  # timed again and again into the same file
            )

        # Interleaved, so both see the same machine, in alternating order (A B, B A, ...) so that a drift
        # within a pair favours neither. The host's speed swings by 10-30% within seconds, and one pair's
        # ratio scattered over 0.76-1.0 on a 2-core Zen 3, so this case times at least 9 pairs and
        # reports the quartiles of their ratios beside the median.
        bare(), end_to_end()
        pairs = []
        for i in range(max(repeats, 9) if not quick else repeats):
            order = (bare, end_to_end) if i % 2 == 0 else (end_to_end, bare)
            t = {fn: timed(fn) for fn in order}
            pairs.append((t[bare], t[end_to_end]))
        t_bare = statistics.median(b for b, _ in pairs)
        t_e2e = statistics.median(e for _, e in pairs)
        ratios = [b / e for b, e in pairs]
        out = {"bare_images_per_s": n / t_bare, "tokenize_images_per_s": n / t_e2e}
        out["ratio"] = statistics.median(ratios)
        out["ratio_of_medians"] = t_bare / t_e2e  # the target holds when both are >= 0.9
        if len(ratios) >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            out |= {"ratio_q1": q1, "ratio_q3": q3}
        if not quick:  # the default (inline on the CPU) against reading in 2 worker processes
            t_workers = median_time(lambda: end_to_end(workers=2), repeats, 1)
            out["with_2_workers_images_per_s"] = n / t_workers
    return out


GENERATOR_SHAPES = {
    # name: (width, depth, heads, head_depth, head_width, tokens)
    "tiny": (256, 8, 4, 3, 256, 64),
    "K128": (384, 12, 6, 3, 512, 128),
}


def card_model(shape: str, quick: bool):
    """The CARD of a GENERATOR_SHAPES entry (the smallest one with `quick`), seeded, in eval mode."""
    from smapctl.models.card import CARD, CARDConfig

    w, d, h, hd, hw, k = GENERATOR_SHAPES[shape] if not quick else (64, 2, 4, 1, 64, 8)
    torch.manual_seed(0)
    cfg = CARDConfig(
        num_tokens=k,
        token_dim=16,
        num_classes=1000,
        class_dim=w,
        width=w,
        depth=d,
        num_heads=h,
        head_depth=hd,
        head_width=hw,
    )
    return CARD(cfg).eval()


def ar_model(quick: bool):
    """The tiny discrete AR model (the smallest one with `quick`), seeded, in eval mode."""
    from smapctl.models.llamagen import LlamaGen, LlamaGenConfig

    w, d, h, v, k = (256, 4, 4, 1024, 64) if not quick else (64, 1, 4, 64, 8)
    torch.manual_seed(0)
    cfg = LlamaGenConfig(
        vocab_size=v, num_tokens=k, num_classes=1000, class_dim=w, width=w, depth=d, num_heads=h
    )
    return LlamaGen(cfg).eval()


def sampler_case(run, kv: bool, repeats: int) -> dict:
    """Images/s of `run(use_kv_cache)`, which samples 8 images. The uncached case also times the cached
    sampler, alternating with it, and reports the paired speed-up of the cache: the two cases run
    minutes apart, over which this host's speed drifts by up to 30%, so their ratio alone is noisy."""
    if kv:
        return {"images_per_s": 8 / median_time(lambda: run(True), repeats, 1)}
    run(True), run(False)
    pairs = [(timed(lambda: run(True)), timed(lambda: run(False))) for _ in range(repeats)]
    return {
        "images_per_s": 8 / statistics.median(u for _, u in pairs),
        "kv_speedup_paired": statistics.median(u / c for c, u in pairs),
    }


@torch.inference_mode()
def case_card_sample(shape: str, kv: bool, repeats: int, quick: bool) -> dict:
    """CARD sampling, 25 Euler steps, CFG 2.0 (constant), batch 8."""
    model = card_model(shape, quick)
    labels = torch.arange(8)
    return sampler_case(
        lambda use: model.sample(labels, cfg_scale=2.0, steps=25, use_kv_cache=use), kv, repeats
    )


@torch.inference_mode()
def case_ar_sample(kv: bool, repeats: int, quick: bool) -> dict:
    """Discrete AR (LlamaGen-style) sampling, CFG 2.0, batch 8."""
    model = ar_model(quick)
    labels = torch.arange(8)
    return sampler_case(lambda use: model.sample(labels, cfg_scale=2.0, use_kv_cache=use), kv, repeats)


@torch.inference_mode()
def case_maskgit_sample(repeats: int, quick: bool) -> dict:
    """MaskGIT sampling, 8 steps, CFG 2.0, batch 8 (same tiny shape as the AR model)."""
    from smapctl.models.maskgit import MaskGIT, MaskGITConfig

    w, d, h, v, k = (256, 4, 4, 1024, 64) if not quick else (64, 1, 4, 64, 8)
    torch.manual_seed(0)
    model = MaskGIT(
        MaskGITConfig(
            vocab_size=v, num_tokens=k, num_classes=1000, class_dim=w, width=w, depth=d, num_heads=h
        )
    ).eval()
    labels = torch.arange(8)
    t = median_time(lambda: model.sample(labels, steps=8, cfg_scale=2.0), repeats, 1)
    return {"images_per_s": 8 / t}


CASES = {
    "matmul_fp32": lambda r, q: case_matmul("fp32", r, q),
    "matmul_bf16": lambda r, q: case_matmul("bf16", r, q),
    "linear_chain_fp32": lambda r, q: case_linear_chain("fp32", r, q),
    "linear_chain_bf16": lambda r, q: case_linear_chain("bf16", r, q),
    "tok_train_tiny_fp32": lambda r, q: case_tok_train("tiny", "fp32", r, q),
    "tok_train_tiny_bf16": lambda r, q: case_tok_train("tiny", "bf16", r, q),
    "tok_train_B_fp32": lambda r, q: case_tok_train("B", "fp32", r, q),
    "tok_train_B_bf16": lambda r, q: case_tok_train("B", "bf16", r, q),
    "tok_train_tiny_bf16_compiled": lambda r, q: case_tok_train("tiny", "bf16", r, q, compile=True),
    "tok_train_B_bf16_compiled": lambda r, q: case_tok_train("B", "bf16", r, q, compile=True),
    "tok_codec_tiny_fp32": lambda r, q: case_tok_codec("tiny", "fp32", r, q),
    "tok_codec_B_fp32": lambda r, q: case_tok_codec("B", "fp32", r, q),
    "tok_codec_B_bf16": lambda r, q: case_tok_codec("B", "bf16", r, q),
    "tokenize_tiny": lambda r, q: case_tokenize(r, q),
    "card_tiny_kv": lambda r, q: case_card_sample("tiny", True, r, q),
    "card_tiny_nokv": lambda r, q: case_card_sample("tiny", False, r, q),
    "card_K128_kv": lambda r, q: case_card_sample("K128", True, r, q),
    "card_K128_nokv": lambda r, q: case_card_sample("K128", False, r, q),
    "ar_tiny_kv": lambda r, q: case_ar_sample(True, r, q),
    "ar_tiny_nokv": lambda r, q: case_ar_sample(False, r, q),
    "maskgit_tiny": lambda r, q: case_maskgit_sample(r, q),
}


def run_case(name: str, repeats: int, quick: bool) -> dict:
    """Run one case in a fresh interpreter; its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--case", name, "--repeats", str(repeats)] + (
        ["--quick"] if quick else []
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emulated_bf16(name: str) -> str | None:
    """Why a full run leaves out a bf16 model case here, if it does: on a CPU without bf16 units PyTorch
    emulates bf16 matmuls (0.28 against 99 GFLOP/s in fp32 at 2048^3 on a Zen 3 EPYC), and a B step
    would take ten minutes or more. The bf16 matmul peak is still measured; `--only` runs any case."""
    from smapctl.precision import cpu_bf16_speedup, native_bf16

    if "bf16" not in name or name.startswith("matmul") or native_bf16("cpu"):
        return None
    return (
        f"this CPU has no bf16 units (bf16 matmuls {1 / cpu_bf16_speedup():.0f}x slower than fp32 in "
        "smapctl.precision's probe; `train.precision: auto` trains in fp32 here)"
    )


# --------------------------------------------------------------------------------------------- report


def machine() -> dict:
    from smapctl.runtime import tune_host_allocator

    return {
        "allocator": "glibc malloc kept warm by smapctl.runtime" if tune_host_allocator() else "as found",
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    """The CPU's name, family and model, and its bf16 units: shared hosts report the same "AMD EPYC"
    for a Zen 3 without bf16 units and a Zen 5 with AVX512-BF16, whose bf16 figures differ 3000x."""
    try:
        info = dict(
            (key.strip(), value.strip())
            for key, _, value in (
                line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
            if value
        )
    except OSError:
        return platform.processor() or "unknown"
    flags = set(info.get("flags", "").split())
    units = [
        name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags
    ]
    return (
        f"{info.get('model name', 'unknown')} (CPU family {info.get('cpu family', '?')} model "
        f"{info.get('model', '?')}; bf16 units: {', '.join(units) or 'none'})"
    )


_PAIRED = ("peak_fraction_paired", "compile_speedup_paired")  # reported on their own, not in the row list


def report(results: dict, command: str, quick: bool = False) -> str:
    m = machine()
    peak = {p: results.get(f"matmul_{p}", {}).get("gflops") for p in ("fp32", "bf16")}
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}`",
        "",
        *(
            [
                "**--quick: a correctness run of the smallest shapes, one timed run each; its figures are not"
                " measurements (run without --quick for those).**",
                "",
            ]
            if quick
            else []
        ),
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {m['threads']} threads, "
        f"Python {m['python']}; host allocator: {m['allocator']}. Medians of the timed runs after warm-up; "
        "peak RSS per case (own process). The uncached samplers' cases also time the cached sampler, "
        "alternating with it, for the paired KV-cache speed-up; their RSS covers both. The compiled training "
        "cases likewise time eager steps alternately for the paired `torch.compile` speed-up.",
        "",
        "| case | result | peak RSS |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            lines.append(
                f"| {name} | {'error' if 'error' in r else 'skipped'}: {r.get('error', r.get('skipped'))} | |"
            )
            continue
        parts = []
        for k, v in r.items():
            if k in ("rss_mb", *_PAIRED):
                continue
            if isinstance(v, str):  # e.g. how many products the matmul peak is the median of
                parts.append(f"{k} {v}")
            elif k == "flops_per_image":
                parts.append(f"GFLOP/image {v / 1e9:.2f}")
            elif isinstance(v, int | float):
                parts.append(f"{k} {v:,.3g}")
        prec = "bf16" if "bf16" in name else "fp32"
        # The paired fraction is the figure the target is judged by (its matmuls are timed beside the
        # steps); the matmul case's, minutes away on a host whose speed drifts, is shown beside it.
        if "peak_fraction_paired" in r:
            parts.append(f"**{100 * r['peak_fraction_paired']:.0f}% of {prec} peak paired**")
        if "gflops" in r and not name.startswith("matmul") and peak.get(prec):
            fraction = f"{100 * r['gflops'] / peak[prec]:.0f}% of {prec} peak"
            parts.append(
                f"({fraction} of the matmul case)" if "peak_fraction_paired" in r else f"**{fraction}**"
            )
        lines.append(f"| {name} | {', '.join(parts)} | {r.get('rss_mb', 0):.0f} MB |")
    for model, prefix in [(f"CARD {shape}", f"card_{shape}") for shape in GENERATOR_SHAPES] + [
        ("AR tiny", "ar_tiny")
    ]:
        kv, nokv = results.get(f"{prefix}_kv", {}), results.get(f"{prefix}_nokv", {})
        if "kv_speedup_paired" in nokv:
            paired = nokv["kv_speedup_paired"]
            line = f"\n{model}: KV cache speed-up **{paired:.1f}x** (paired, in one process)"
            if "images_per_s" in kv:
                line += f"; {kv['images_per_s'] / nokv['images_per_s']:.1f}x between the two cases"
            lines.append(line)
    for name, compiled in results.items():
        if "compile_speedup_paired" in compiled:
            eager = results.get(name.removesuffix("_compiled"), {})
            line = (
                f"\n{name.removesuffix('_compiled')}: `torch.compile` speed-up "
                f"**{compiled['compile_speedup_paired']:.2f}x** (paired, in one process)"
            )
            if "images_per_s" in eager:
                line += f"; {compiled['images_per_s'] / eager['images_per_s']:.2f}x between the two cases"
            lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest shapes, one timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument(
        "--out",
        help="where to write the report (default: benchmarks/RESULTS.md for a full run; a run with --only "
        "or --quick writes nothing unless given --out)",
    )
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.case:
        from smapctl.runtime import tune_host_allocator

        tune_host_allocator()  # as every `smapctl` command does
        result = CASES[args.case](repeats, args.quick)
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    names = [n for n in args.only.split(",") if n] or list(CASES)
    results = {}
    for name in names:
        skip = None if args.only or args.quick else emulated_bf16(name)
        results[name] = {"skipped": skip} if skip else run_case(name, repeats, args.quick)
        print(f"{name}: {results[name]}", flush=True)
    text = report(results, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), args.quick)
    print(text)
    out = args.out or (None if args.quick or args.only else ROOT / "benchmarks" / "RESULTS.md")
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
