"""The benchmark script runs (smallest shapes, one timed run): correctness only, no timing asserted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_runs_and_reports():
    cases = ",".join(
        ["matmul_bf16", "tok_train_tiny_bf16", "tok_codec_tiny_fp32", "card_tiny_kv", "card_tiny_nokv"]
        + ["ar_tiny_kv", "maskgit_tiny"]
    )
    r = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--only", cases],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stdout
    for name in cases.split(","):
        assert f"| {name} |" in r.stdout
    assert "% of bf16 peak" in r.stdout and "KV cache speed-up" in r.stdout
