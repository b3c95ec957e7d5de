"""The host's memory: process-wide tuning of its allocator, applied once when a `smapctl` command
starts (`tune_host_allocator`), and what fits in it (`machine_memory`, `training_memory_problem`,
`images_fit_in_memory`).

glibc's malloc hands large freed blocks back to the kernel: a block above its (dynamic, at most 32 MiB)
mmap threshold is unmapped on `free`, and the top of the heap is trimmed past `M_TRIM_THRESHOLD`. A
training step frees its activations and allocates them again on the next step, so every step faults
the same pages back in, zero-filled by the kernel. On the CPU this is a large share of a step. Measured
on a 2-core AMD EPYC (Zen 4), SMAP-B training step in bf16 (batch 2):

    glibc defaults:   ~77,000 minor page faults and 0.24 s of kernel time per step, 1.27-1.40 images/s
    this tuning:      ~2,000 page faults and 0.01 s of kernel time per step,      1.52-1.57 images/s

(`benchmarks/README.md` has the effect on every case.) Raising the mmap threshold and the trim threshold
keeps freed memory in the process for the next step, as jemalloc and tcmalloc (which PyTorch's CPU
performance guide recommends) do by design. The peak resident memory stays that of the largest step;
the process does not hand memory back to the system between steps.

Nothing is changed when `SMAPCTL_KEEP_HOST_MEMORY=0` (glibc's defaults, e.g. on a shared machine where
memory should go back to the system between steps), when the C library is not glibc, when the user has
set `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` (theirs win), or when another allocator is
preloaded. Library users who want the same effect call `tune_host_allocator()` at the start of their
program.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap and are reused; older glibc refuses more than 32 MiB.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = 1 << 30

OPT_OUT = "SMAPCTL_KEEP_HOST_MEMORY"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Keep freed host memory in the process (see the module docstring). Returns True when the tuning is
    in effect, False when it was left alone (not glibc, the user's own settings, another allocator).
    Safe to call more than once."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not any(libc.mallopt(_M_MMAP_THRESHOLD, value) == 1 for value in _MMAP_THRESHOLDS):
        return False
    # Setting the trim threshold alone would also freeze the mmap threshold at its 128 KiB default
    # (glibc disables the dynamic threshold on any of these settings), so it comes second.
    return libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1


# ----------------------------------------------------------------------------- what fits in memory


def machine_memory() -> int | None:
    """This machine's memory in bytes, None where it is not known (not a POSIX system)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def training_memory_problem(parameters: int, ema: bool, processes: int = 1) -> str | None:
    """None when training `parameters` fp32 weights on the CPU fits in this machine's memory, else a
    one-line warning. What a run holds whatever its batch: the weights, their gradients, AdamW's two
    moments and (`ema`) the EMA, 16 or 20 bytes a parameter, in each of `processes` processes on the
    machine (llamagen_3b's 3,044M parameters: 45.4 GiB; the kernel kills a run short of memory without a
    word from it). Activations come on top. Not checked where the memory is not known."""
    have = machine_memory()
    need = parameters * 4 * (5 if ema else 4) * processes
    if have is None or need <= have:
        return None
    what = "weights, gradients, AdamW's two moments" + (" and the EMA" if ema else "")
    each = f" in each of {processes} processes" if processes > 1 else ""
    return (
        f"training {parameters:,} parameters in fp32 takes at least {need / 2**30:.1f} GiB of"
        f" memory ({what}{each}), more than this machine's {have / 2**30:.1f} GiB: the run is likely to be"
        " killed for lack of memory"
    )


def images_fit_in_memory(count: int, shape: tuple[int, ...]) -> str | None:
    """None when `count` uint8 images of `shape` (3, H, W) take at most half of this machine's memory,
    else what they take, for a message: `1,281,167 images of 256x256 pixels take 235.6 GiB in memory, more
    than half of this machine's 23.4 GiB`. Not checked (None) where the memory size is not known."""
    need = count * math.prod(shape)
    have = machine_memory()
    if have is None:
        return None
    if need <= have // 2:
        return None
    return (
        f"{count:,} images of {shape[-1]}x{shape[-2]} pixels take {need / 2**30:.1f} GiB in memory, more than"
        f" half of this machine's {have / 2**30:.1f} GiB"
    )
