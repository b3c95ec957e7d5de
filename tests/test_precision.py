"""`train.precision: auto` and the bf16 warnings (`smapctl/precision.py`)."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_tokenizer import load, write_recipe

from smapctl import precision
from smapctl.errors import UserError
from smapctl.precision import cpu_bf16_speedup, native_bf16, resolve_train_precision
from smapctl.train.checkpoint import load_meta
from smapctl.train.config import TrainConfig
from smapctl.train.tokenizer import train_tokenizer


@pytest.fixture
def cpu_speedup(monkeypatch):
    """Pretend this CPU reports bf16 units and runs bf16 matmuls `value` times as fast as fp32 ones."""

    def set_to(value: float) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_units", lambda: True)
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: value)

    return set_to


def test_the_probe_measures_a_ratio_once():
    ratio = cpu_bf16_speedup()
    assert math.isfinite(ratio) and ratio > 0
    assert cpu_bf16_speedup() is ratio  # cached: start-up pays for it once


def test_the_probe_leaves_the_global_rng_alone():
    """`torch.manual_seed(0)`, then `tok.encode(..., precision="bf16")` (the probe's first run), then
    `torch.randn`: the numbers `torch.randn` draws without the encode."""
    state = torch.get_rng_state()
    cpu_bf16_speedup.__wrapped__()  # uncached
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("speedup", "chosen"), [(3.0, "bf16"), (1.2, "bf16"), (0.9, "no"), (0.014, "no")])
def test_auto_is_bf16_only_where_bf16_is_faster(cpu_speedup, speedup, chosen, caplog):
    cpu_speedup(speedup)
    with caplog.at_level(logging.INFO, logger="smapctl"):
        assert resolve_train_precision("auto", "cpu") == chosen
    assert f"auto: {'bf16' if chosen == 'bf16' else 'fp32'} on cpu" in caplog.text
    assert native_bf16("cpu") is (chosen == "bf16")


@pytest.mark.parametrize("stall_for", [3, 10])
@pytest.mark.parametrize("stall_at", range(24))
def test_a_core_busy_for_a_few_products_does_not_decide_the_probe(monkeypatch, stall_at, stall_for):
    """On a busy 2-core Zen 5 (AVX512-BF16, bf16 3.3x fp32) the probe said bf16 was slower in 2 of 7 fresh
    processes (0.36x; the README's demo trained in fp32): all 3 timed bf16 products came right after the 3
    fp32 ones, so one stall of a core could hold up every bf16 sample and none of fp32's. Here each product
    costs 1 (fp32) or 0.25 (bf16) on a fake clock, and `stall_for` products in a row from `stall_at` on cost
    100. In turns, a stall of 10 products (1 ms of bf16 units' products, under a scheduler's time slice)
    holds up 5 of each kind; timed 10 fp32 then 10 bf16, it could hold up all of bf16's."""
    clock, calls = [0.0], [0]
    matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        stalled = stall_at <= calls[0] < stall_at + stall_for
        calls[0] += 1
        clock[0] += 100.0 if stalled else {torch.float32: 1.0, torch.bfloat16: 0.25}[a.dtype]
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    monkeypatch.setattr(precision, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert cpu_bf16_speedup.__wrapped__() == 4.0


def test_a_cpu_without_bf16_units_trains_auto_in_fp32_whatever_a_probe_would_say(monkeypatch):
    """On a busy host without bf16 units the probe's fp32 matmul waited for a core and bf16 measured
    "faster" in 3 of 6 fresh processes: `auto` could choose emulated bf16 for the demo. A CPU that reports
    no bf16 units is not probed; one that cannot tell is."""

    def probe():
        raise AssertionError("probed a CPU without bf16 units")

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", probe)
    assert not native_bf16("cpu") and resolve_train_precision("auto", "cpu") == "no"
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    for speedup, native in ((1.2, True), (0.9, False)):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=speedup: s)
        assert native_bf16("cpu") is native


def test_the_cpus_bf16_units_are_read_from_torch(monkeypatch):
    """x86: AVX512-BF16 or AMX-BF16; Arm: BF16; torch's cpuinfo naming none of them: unknown."""
    for capabilities, units in (
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx512_bf16": False, "amx_bf16": True}, True),
        ({"neon": True, "bf16": True}, True),
        ({"architecture": "riscv64"}, None),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert precision.cpu_bf16_units() is units


def test_only_the_announcing_process_logs_the_choice(cpu_speedup, caplog):
    """Under torchrun every process resolves the precision; only the main one says what it chose."""
    cpu_speedup(0.014)
    with caplog.at_level(logging.INFO, logger="smapctl"):
        assert resolve_train_precision("auto", "cpu", announce=False) == "no"
        assert resolve_train_precision("bf16", "cpu", announce=False) == "bf16"
    assert caplog.text == ""


def test_auto_stays_in_fp32_on_devices_it_cannot_ask():
    assert not native_bf16("meta")
    assert resolve_train_precision("auto", "meta") == "no"


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_one_warning(cpu_speedup, caplog):
    cpu_speedup(1 / 70)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert resolve_train_precision("bf16", "cpu") == "bf16"
    (record,) = caplog.records
    assert "70x slower than fp32" in record.message and "train.precision=auto" in record.message


@pytest.mark.parametrize("bf16_units", [True, False])
def test_explicit_bf16_on_a_gpu_without_bf16_units_is_warned_about(bf16_units, monkeypatch, caplog):
    """A V100 or T4 emulates bf16, and accelerate accepts it: the paper recipes' bf16 ran slowly
    without a word there. torch's `is_bf16_supported()` says True there too, by default counting the
    emulation: only `including_emulation=False` tells the GPU's bf16 units, which `auto` and the warning ask
    for."""

    def is_bf16_supported(including_emulation=True):  # as torch's on a CUDA GPU (emulation: any GPU)
        return bf16_units or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert resolve_train_precision("bf16", "cuda") == "bf16"
        assert resolve_train_precision("auto", "cuda") == ("bf16" if bf16_units else "no")
    warned = [r.message for r in caplog.records]
    assert warned == (
        []
        if bf16_units
        else [
            "train.precision=bf16: this GPU has no bf16 units (it predates Ampere) and emulates bf16, slowly;"
            " use train.precision=fp16 (with a loss scale) or auto (fp32 here)"
        ]
    )


@pytest.mark.parametrize(("speedup", "said"), [(0.4, "2x slower"), (0.25, "4x slower")])
def test_explicit_bf16_on_a_cpu_a_few_times_slower_is_warned_about(cpu_speedup, caplog, speedup, said):
    """Under half fp32's speed is worth a word (the warning's threshold), not only a 70x emulation."""
    cpu_speedup(speedup)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert resolve_train_precision("bf16", "cpu") == "bf16"
    (record,) = caplog.records
    assert said in record.message


@pytest.mark.parametrize(("requested", "speedup"), [("bf16", 4.0), ("bf16", 0.8), ("no", 0.01), ("no", 4.0)])
def test_no_warning_otherwise(cpu_speedup, caplog, requested, speedup):
    cpu_speedup(speedup)
    with caplog.at_level(logging.WARNING, logger="smapctl"):
        assert resolve_train_precision(requested, "cpu") == requested
    assert not caplog.records


def test_fp16_is_refused_on_a_cpu_and_kept_on_a_gpu(cpu_speedup):
    """accelerate has no fp16 autocast on the CPU: it would train in fp32 while the recipe says fp16."""
    cpu_speedup(4.0)
    with pytest.raises(UserError) as e:
        resolve_train_precision("fp16", "cpu")
    assert str(e.value) == (
        "train.precision: fp16 needs a GPU (on a CPU it would silently train in fp32); "
        "use bf16, auto or 'no' (fp32)"
    )
    assert resolve_train_precision("fp16", "cuda") == "fp16"
    assert resolve_train_precision("auto", "cpu") == "bf16"  # auto never picks fp16


def test_recipes_accept_auto():
    assert TrainConfig(precision="auto").precision == "auto"


def test_fp32_is_taken_for_no(tmp_path):
    """`--set train.precision=fp32` was refused ("expected one of 'auto', 'no', ..."), though fp32 is the
    name `tokenize --precision` and every message use: it is accelerate's `no`, also in the recipe the
    run writes."""
    recipe = load(write_recipe(tmp_path), "train.precision=fp32")
    assert recipe.train.precision == "no"
    with pytest.raises(
        UserError, match="train.precision: expected one of 'auto', 'no', 'fp32', 'bf16', 'fp16'"
    ):
        load(write_recipe(tmp_path), "train.precision=fp64")


def test_the_accelerator_gets_the_resolved_precision(cpu_speedup):
    from smapctl.train.runner import make_accelerator

    cpu_speedup(0.01)  # only `no`: accelerate keeps one precision per process, and the suite trains in fp32
    assert make_accelerator(TrainConfig(precision="auto")).mixed_precision == "no"


def test_one_process_trains_in_one_precision_then_another(tmp_path, cpu_speedup):
    """accelerate keeps one precision per process: `auto` chose bf16 (on a GPU, say), and a second
    training in `no` stopped with accelerate's "restart your runtime"."""
    cpu_speedup(3.0)  # auto -> bf16 on any CPU (an emulating one only runs these 16 px steps slowly)
    recipe = write_recipe(tmp_path)
    chosen = {}
    for name, setting in (("fp32", "'no'"), ("auto", "auto"), ("fp32-again", "'no'")):  # ends as the suite
        sets = ("train.max_steps=2", "train.sample_every=100", f"train.precision={setting}")
        final = train_tokenizer(load(recipe, *sets), tmp_path / name)
        chosen[name] = load_meta(final)["trained_precision"]
    assert chosen == {"fp32": "no", "auto": "bf16", "fp32-again": "no"}
