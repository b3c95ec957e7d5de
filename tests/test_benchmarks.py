"""The benchmark script runs (smallest shapes, one timed run): correctness only, no timing asserted."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """python benchmarks/NAME ARGS from the repository root, output captured."""
    cmd = [sys.executable, f"benchmarks/{name}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_benchmark_quick_runs_and_reports():
    cases = ",".join(
        ["matmul_bf16", "tok_train_tiny_bf16", "tok_train_tiny_fp32", "tok_codec_tiny_fp32"]
        + ["card_tiny_nokv"]  # (it times the cached sampler too, alternating: `card_tiny_kv`'s code)
        + ["ar_tiny_kv", "maskgit_tiny"]
        + ["tokenize_tiny"]  # its own code: a checkpoint, PNG files and `tokenize_images` end to end
    )
    r = run_script("run.py", "--quick", "--only", cases)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stdout
    assert "**--quick: a correctness run of the smallest shapes, one timed run each; its figures" in r.stdout
    for name in cases.split(","):
        assert f"| {name} |" in r.stdout
    assert "% of bf16 peak" in r.stdout
    # The fp32 training case times the matmul peak alternately with its steps (no matmul_fp32 case here).
    assert "% of fp32 peak paired**" in r.stdout and "% of fp32 peak**" not in r.stdout
    # The uncached case times both samplers alternately and reports their paired ratio.
    assert "kv_speedup_paired" in r.stdout and "CARD tiny: KV cache speed-up **" in r.stdout
    # `tokenize` end to end against the bare encoder on as many images: both rates and their ratios.
    row = next(line for line in r.stdout.splitlines() if line.startswith("| tokenize_tiny |"))
    for field in ("bare_images_per_s", "tokenize_images_per_s", "ratio ", "ratio_of_medians"):
        assert field in row


def test_breakdown_quick_runs_and_replays_the_steps_matmuls():
    r = run_script("breakdown.py", "--quick")
    assert r.returncode == 0, r.stderr
    for part in ("forward", "matmuls (", "everything else", "attention core", "AdamW over", "ops timed"):
        assert part in r.stdout


def test_few_rows_ab_quick_runs_and_checks_the_samples_agree():
    r = run_script("few_rows_ab.py", "--quick")
    assert r.returncode == 0, r.stderr
    for line in ("512 -> 512: ", "CARD K128: plain_images_per_s", "AR tiny: plain_images_per_s"):
        assert line in r.stdout and "paired_speedup" in r.stdout


def test_few_rows_ab_head_compares_the_flow_head_alone():
    r = run_script("few_rows_ab.py", "--head", "--quick")
    assert r.returncode == 0, r.stderr  # the script asserts both give the same samples
    assert "CARD K128, flow head: plain_images_per_s" in r.stdout and "paired_speedup" in r.stdout


def test_sampler_profile_quick_lists_the_operators_and_rates_the_products(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["sampler_profile.py", "--quick", "--rows", "40"])
    from sampler_profile import main, product_gflops

    main()
    out = capsys.readouterr().out
    assert "CARD quick, KV cache, 8 images, 4 tokens" in out and "ms per token" in out
    products = [line for line in out.splitlines() if line.startswith("| aten::addmm |")]
    assert products and all(line.split("|")[-2].strip() for line in products)  # each with its GFLOP/s
    # 2 m k n FLOPs: a 16 x 64 -> 128 product with its bias, in 1 us per call, is 262 GFLOP/s
    assert product_gflops("aten::addmm", [[128], [16, 64], [64, 128], [], []], 1.0) == 2 * 16 * 64 * 128 / 1e3
    assert product_gflops("aten::silu", [[16, 64]], 1.0) is None


def test_master_weights_ab_quick_trains_as_adamw_and_times_both():
    r = run_script("master_weights_ab.py", "--quick")
    assert r.returncode == 0, r.stderr  # the script asserts the masters follow the autocast run's AdamW
    assert "updates per step from AdamW's" in r.stdout
    for line in ("autocast: step ", "master: step ", "master weights: "):
        assert line in r.stdout


def test_loader_ab_quick_checks_the_three_pipelines_agree(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["loader_ab.py", "--quick"])
    from loader_ab import main

    main()  # exits with a message if a pair of batches differs
    out = capsys.readouterr().out
    assert "3 batches of 64 digits at 32 px, equal bit for bit" in out and "over converting per image" in out


def test_recorded_matmuls_carry_the_steps_flops(monkeypatch):
    """The replay covers the step: its matmuls' FLOPs are the model's FLOPs but the patch embedding's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from breakdown import RecordMatmuls, matmul_flops
    from run import TokenizerStep, count_flops

    step = TokenizerStep("tiny", "bf16", quick=True)
    recorder = RecordMatmuls()
    with recorder:
        step()
    cfg = step.cfg
    # The patch embedding's conv: forward and weight gradient (the images need no gradient).
    patch_flops = 2 * 2 * step.batch * cfg.num_patches * cfg.enc_width * 3 * cfg.patch_size**2
    recorded = sum(matmul_flops(f, s) for f, s in recorder.calls)
    assert recorded + patch_flops == count_flops(step)
    assert {f.__name__ for f, _ in recorder.calls} == {"mm.default", "addmm.default", "bmm.default"}


def test_the_flop_count_includes_attention_in_fp32(monkeypatch):
    """SDPA's fused CPU kernel is invisible to FlopCounterMode: without the math backend while counting,
    the fractions of peak would leave out attention (7.6% of the B step's FLOPs)."""
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from run import count_flops

    b, h, t, s, d = 2, 4, 10, 12, 16
    q = torch.randn(b, h, t, d, requires_grad=True)
    k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(2))
    # Forward: Q K^T and A V, 2*B*H*T*S*D each; backward: twice the forward.
    assert (
        count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
        == 3 * 4 * b * h * t * s * d
    )


def test_op_timer_sees_each_op_once_per_call_and_splits_casts_by_direction(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from breakdown import TimeOps, op_times
    from run import TokenizerStep

    timer = TimeOps()
    a = torch.randn(4, 4)
    with timer:
        for _ in range(3):
            (a @ a).to(torch.bfloat16).float()
    assert timer.calls["mm"] == 3
    assert timer.calls["_to_copy float32->bfloat16"] == 3 and timer.calls["_to_copy bfloat16->float32"] == 3
    assert all(sec >= 0 for sec in timer.seconds.values())

    step = TokenizerStep("tiny", "bf16", quick=True)
    ops = op_times(step, 2)
    assert ops.calls["_fused_adamw_"] % 2 == 0 and ops.calls["_fused_adamw_"] > 0
    assert ops.calls["bmm"] > 0 and ops.calls["addmm"] > 0


def test_a_full_run_leaves_out_bf16_model_cases_where_bf16_is_emulated(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from run import emulated_bf16, report

    monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda: 1 / 70)
    assert "70x slower than fp32" in emulated_bf16("tok_train_B_bf16")
    assert emulated_bf16("matmul_bf16") is None  # the peak is still measured
    assert emulated_bf16("tok_train_B_fp32") is None and emulated_bf16("card_K128_kv") is None
    text = report({"tok_train_B_bf16": {"skipped": emulated_bf16("tok_train_B_bf16")}}, "python run.py")
    assert "| tok_train_B_bf16 | skipped: this CPU has no bf16 units" in text

    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: True)
    monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda: 4.3)
    assert emulated_bf16("tok_train_B_bf16") is None


def test_the_bf16_peak_takes_fewer_runs_where_bf16_is_emulated(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    calls = []
    monkeypatch.setattr("smapctl.precision.cpu_bf16_units", lambda: True)
    monkeypatch.setattr(run, "median_time", lambda fn, runs, warmup: calls.append((runs, warmup)) or 1.0)
    for speedup in (1 / 70, 4.3):
        monkeypatch.setattr("smapctl.precision.cpu_bf16_speedup", lambda s=speedup: s)
        assert run.case_matmul("bf16", 5, quick=False)["shape"].startswith("2048^3")
    run.case_matmul("fp32", 5, quick=False)
    assert calls == [(3, 1), (10, 2), (10, 2)]


def test_the_compiled_training_case_times_eager_steps_beside_its_own(monkeypatch):
    """The paired `torch.compile` speed-up: one eager step per compiled step, in alternating order, and a
    summary line against the eager case. torch.compile is replaced by a counting wrapper (no inductor)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    calls = []

    def fake_compile(model):
        def net(*args, **kwargs):
            calls.append("compiled")
            return model(*args, **kwargs)

        return net

    monkeypatch.setattr(torch, "compile", fake_compile)
    real_forward = run.TokenizerStep.forward
    monkeypatch.setattr(
        run.TokenizerStep,
        "forward",
        lambda self, net=None: calls.append(net is None) or real_forward(self, net),
    )
    r = run.case_tok_train("tiny", "fp32", 3, quick=True, compile=True)
    assert r["compile_speedup_paired"] > 0 and r["peak_fraction_paired"] > 0
    # FLOP count (eager), 3 warm-up steps, then compiled/eager, eager/compiled, compiled/eager.
    timed = [c for c in calls if c != "compiled"][4:]
    assert timed == [False, True, True, False, False, True]

    text = run.report(
        {
            "tok_train_tiny_fp32": {"images_per_s": 10.0},
            "tok_train_tiny_fp32_compiled": {**r, "images_per_s": 8.0},
        },
        "python run.py",
    )
    assert (
        f"tok_train_tiny_fp32: `torch.compile` speed-up **{r['compile_speedup_paired']:.2f}x** (paired"
        in text
    )
    assert "; 0.80x between the two cases" in text and "compile_speedup_paired" not in text


def test_listing_quick_lists_and_labels_a_tree():
    r = run_script("listing.py", "--quick")
    assert r.returncode == 0, r.stderr
    assert "32 files in 4 folders" in r.stdout and "this (" in r.stdout


@pytest.mark.parametrize("what", [[], ["--tokenize"]])
def test_cache_memory_quick_builds_both_ways_into_equal_files(tmp_path, what):
    r = run_script("cache_memory.py", "--quick", "--dir", str(tmp_path), *what)
    assert r.returncode == 0, r.stderr
    assert "the files are equal" in r.stdout and ("(tokenize)" in r.stdout) == bool(what)
    assert [line.split()[0] for line in r.stdout.splitlines()[2:]] == ["memory", "mapped"]


def test_cache_memory_names_a_missing_dir_in_one_line(tmp_path):
    r = run_script("cache_memory.py", "--quick", "--dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].endswith(f"--dir {tmp_path / 'none'}: not an existing folder")
