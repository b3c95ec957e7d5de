"""Whether this machine computes bf16 natively, and what `train.precision: auto` means on it.

bf16 autocast pays only where the hardware multiplies bf16: GPUs since Ampere, and CPUs with AVX512-BF16
or AMX (or bf16 units on Arm). Elsewhere PyTorch's CPU matmul falls back to a generic kernel. Measured
on a 2-core AMD EPYC without bf16 units (Zen 3, AVX2), 2048^3 matmuls: fp32 99 GFLOP/s, bf16 0.28
GFLOP/s, 350x slower (45-70x at this module's probe size); on a Zen 4 host with AVX512-BF16 bf16 ran
4.3x faster than fp32 (`benchmarks/README.md`). So `auto` asks the hardware: on the CPU whether it
reports bf16 units, and if so a short timed matmul; the device's capability on a GPU.

fp16 is a GPU mode: accelerate has no fp16 autocast on the CPU and would train in fp32 while the recipe
says fp16, so `train.precision: fp16` on a CPU is refused (`auto` never picks fp16).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from smapctl.errors import UserError

log = logging.getLogger("smapctl")

# Side of the probe's square matmul: ~34 MFLOP, well under a millisecond in fp32; ~25 ms when bf16 is
# emulated (a quarter of a second for the probe's 10, on a CPU that does not say whether it has bf16 units).
# Large enough that native bf16 beats fp32 by a wide margin, small enough to run at start-up.
_PROBE_SIZE = 256


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (the best of 10 of each, timed
    in turns after warm-up): above 1 where the CPU has bf16 units, far below 1 where bf16 is emulated.
    In turns because a busy core stalls several products in a row: timed 3 fp32 then 3 bf16, a busy
    2-core Zen 5 (AVX512-BF16) measured bf16 slower in 2 of 7 fresh processes, and `auto` chose fp32."""

    def operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)  # its own: the first bf16 `encode` moved a notebook's global RNG
        a = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=g).to(dtype)
        b = torch.randn(_PROBE_SIZE, _PROBE_SIZE, generator=g).to(dtype)
        a @ b
        return a, b

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    fp32, bf16 = operands(torch.float32), operands(torch.bfloat16)
    rounds = [(seconds(*fp32), seconds(*bf16)) for _ in range(10)]
    return min(t for t, _ in rounds) / min(t for _, t in rounds)


# The CPU features of bf16 units, as torch's cpuinfo names them (x86: AVX512-BF16, AMX; Arm: BF16, SVE).
_BF16_UNITS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_bf16_units() -> bool | None:
    """Whether the CPU reports bf16 units (`torch.cpu.get_capabilities`); None when torch cannot tell (an
    architecture it names none of these for)."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except Exception:  # noqa: BLE001 (cpuinfo unavailable: the probe alone decides)
        return None
    known = [name for name in _BF16_UNITS if name in capabilities]
    return any(bool(capabilities[name]) for name in known) if known else None


def bf16_units(device: torch.device | str) -> bool | None:
    """Whether `device` says it has bf16 units: a GPU always says (False before Ampere), a CPU may not
    (None); other devices do not."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_bf16_units() if device.type == "cpu" else None


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run faster than fp32 ones on `device` (CUDA: a bf16-capable GPU). On a CPU:
    one that reports bf16 units and whose probe (`cpu_bf16_speedup`) confirms them. A CPU without them is
    not probed: on a 2-core host without bf16 units whose cores were busy, the probe's fp32 matmul waited
    for a core and bf16 measured 1.18x "faster" in 3 of 6 fresh processes (0.015-0.037x idle), so `auto`
    could train the demo in emulated bf16, many times slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(bf16_units(device))
    if device.type == "cpu":
        return bf16_units(device) is not False and cpu_bf16_speedup() > 1.0
    return False  # other accelerators: `auto` stays in fp32 unless asked for bf16 explicitly


def precision_name(mixed_precision: str) -> str:
    """How messages name accelerate's `mixed_precision` ("no", "bf16", "fp16"): fp32 for "no"."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def resolve_train_precision(requested: str, device: torch.device | str, announce: bool = True) -> str:
    """accelerate's `mixed_precision` for `train.precision`: `auto` is bf16 where the device computes it
    natively, else `no`. An explicit bf16 on a CPU without bf16 units is kept, with a warning; fp16 on a
    CPU is a UserError (it would run in fp32 without a word). `announce`: log the choice and warnings
    (the main process of a multi-process run only)."""
    if requested == "fp16" and torch.device(device).type == "cpu":
        raise UserError(
            "train.precision: fp16 needs a GPU (on a CPU it would silently train in fp32); "
            "use bf16, auto or 'no' (fp32)"
        )
    if requested == "auto":
        chosen = "bf16" if native_bf16(device) else "no"
        if announce:
            log.info("train.precision auto: %s on %s", precision_name(chosen), device)
        return chosen
    if requested == "bf16" and announce:
        gpu = torch.device(device).type == "cuda"
        instead = (
            "train.precision=fp16 (with a loss scale) or auto (fp32 here)"
            if gpu
            else "train.precision=auto (fp32 here)"
        )
        warn_if_bf16_is_slow(device, "train.precision=bf16", instead)
    return requested


def warn_if_bf16_is_slow(device: torch.device | str, what: str, instead: str) -> None:
    """One warning line when `what` asks for bf16 on a CPU that emulates it, or on a GPU without bf16
    units (before Ampere: V100, T4), which accelerate accepts and emulates."""
    if torch.device(device).type == "cuda" and not bf16_units(device):
        log.warning(
            "%s: this GPU has no bf16 units (it predates Ampere) and emulates bf16, slowly; use %s",
            what,
            instead,
        )
        return
    if torch.device(device).type != "cpu":
        return
    if bf16_units(device) is False:  # said by the CPU: the probe can misjudge a busy host (`native_bf16`)
        log.warning(
            "%s: this CPU has no bf16 units and emulates bf16, many times slower than fp32; use %s",
            what,
            instead,
        )
    elif cpu_bf16_speedup() < 0.5:
        log.warning(
            "%s: this CPU runs bf16 matmuls %.0fx slower than fp32; use %s",
            what,
            1 / cpu_bf16_speedup(),
            instead,
        )
