"""The host-allocator tuning every `smapctl` command applies (`smapctl/runtime.py`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc"
)

# Allocates, fills and frees a 64 MiB tensor (above glibc's largest dynamic mmap threshold) 24 times and
# prints the minor page faults of the last 8 rounds. With glibc's defaults every round maps fresh pages;
# tuned, the heap settles within about 10 rounds (PyTorch's 64-byte aligned blocks fragment it at first;
# observed 4-10) and then reuses the same pages.
_PROBE = """
import resource, sys, torch
from smapctl.runtime import tune_host_allocator
applied = tune_host_allocator() if sys.argv[1] == "tuned" else None
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[-8:]))
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SMAPCTL_KEEP"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    applied, tuned_faults = _probe("tuned")
    _, default_faults = _probe("default")
    assert applied == "True"
    # 8 rounds of 64 MiB = 131,072 pages of 4 KiB: the defaults fault them all in again, tuned reuses them.
    assert default_faults > 60_000
    assert tuned_faults < 2_000


@glibc_only
def test_users_own_malloc_settings_win():
    applied, _ = _probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"


@glibc_only
def test_opt_out_keeps_glibc_defaults():
    applied, faults = _probe("tuned", SMAPCTL_KEEP_HOST_MEMORY="0")
    assert applied == "False"
    assert faults > 60_000


def test_cli_applies_the_tuning(monkeypatch, capsys):
    from tiny_tokenizer import run_cli

    from smapctl import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_host_allocator", lambda: calls.append(1) or True)
    code, _, err = run_cli(capsys, "decode", "no-such-tokens.pt", "-o", "unused")
    assert code == 1 and "no-such-tokens.pt" in err  # a user error, after the start-up tuning ran
    assert calls == [1]


def test_another_preloaded_allocator_is_left_alone(monkeypatch):
    from smapctl import runtime

    for name in (*runtime._USER_SETTINGS, runtime.OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert runtime._apply() is False


def test_the_memory_a_training_needs_counts_every_process_on_the_machine(monkeypatch):
    from smapctl import runtime

    monkeypatch.setattr(runtime, "machine_memory", lambda: 100 * 2**30)
    parameters = 1_000_000_000  # 14.9 GiB in fp32 with AdamW, 18.6 GiB with the EMA
    assert runtime.training_memory_problem(parameters, ema=True, processes=5) is None
    problem = runtime.training_memory_problem(parameters, ema=True, processes=6)
    assert problem is not None and "111.8 GiB" in problem and "in each of 6 processes" in problem


def test_images_may_take_half_of_the_machines_memory_and_no_more(monkeypatch):
    from smapctl import runtime

    monkeypatch.setattr(runtime, "machine_memory", lambda: 2 * 3 * 64 * 64 * 100)
    assert runtime.images_fit_in_memory(100, (3, 64, 64)) is None
    assert runtime.images_fit_in_memory(101, (3, 64, 64)).startswith("101 images of 64x64 pixels take")
