# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Where the Triton kernels run, and the few things every launcher needs to know about it.

Kernels run compiled on a CUDA GPU, or on the CPU under Triton's interpreter when
`TRITON_INTERPRET=1` was set before they were defined (the kernel tests' conftest does
that on machines without CUDA). The interpreter's bf16 `tl.dot` is broken, so kernels
take an `UPCAST` constexpr that multiplies in fp32 there; launchers set it from
`INTERPRET`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Read once, like `triton.jit` itself, which decides at decoration time."""


INTERPRET_JIT = tl.constexpr(INTERPRET)
"""`INTERPRET` for branches inside jitted kernels."""


@triton.jit
def to_fp8(x):
    """fp32 -> float8_e4m3fn, round to nearest even (callers clamp to ±448 first).

    The interpreter's own cast truncates and drops the carry into the next binade
    (127.9 -> 64), so there the value is first rounded onto the e4m3 grid in fp32, which
    leaves the cast nothing to round.
    """
    if INTERPRET_JIT:
        exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        magic = 12582912.0  # 1.5 * 2**23: adding it rounds |v| < 2**22 to an integer (RNE)
        x = ((x / step + magic) - magic) * step
    return x.to(tl.float8e4nv)


@triton.constexpr_function
def _prefetch_asm(level: int) -> str:
    return f"{{ prefetch.global.L{level} [$1]; mov.u32 $0, 0; }}"


@triton.jit
def prefetch(ptrs, LEVEL: tl.constexpr):
    """Start moving the lines at `ptrs` into L1 or L2 (nothing under the interpreter)."""
    if not INTERPRET_JIT:
        tl.inline_asm_elementwise(
            _prefetch_asm(LEVEL), "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores (fp32 operands under the interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


def check_device(*tensors: torch.Tensor) -> None:
    """All on one CUDA device, or on the CPU under the interpreter."""
    device = tensors[0].device
    assert all(t.device == device for t in tensors), [t.device for t in tensors]
    if INTERPRET:
        assert device.type == "cpu", "TRITON_INTERPRET=1 runs kernels on CPU tensors"
    else:
        assert device.type == "cuda", f"Triton kernels need CUDA tensors, got {device}"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors; under the interpreter a small stand-in so that split
    heuristics still split at test sizes."""
    if device.type != "cuda":
        return 16
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_COUNTERS = 1 << 16


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """`n` int32 zeros for split-K "last program reduces" counters.

    Kernels return every counter they touch to zero before exiting, so one buffer per
    device serves every launch on a stream and every replay of a captured graph; it is
    never reallocated, so a graph never holds a stale pointer.
    """
    assert n <= _MAX_COUNTERS, f"{n} split-K tiles exceed the {_MAX_COUNTERS} counters"
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


PDL_MAX_ROWS = 4
"""Launches of at most this many token rows use PDL. H100, INT4 engine decode, graph
replay, without -> with PDL: batch 1 (INT4 LM head) 368 -> 390 tok/s, batch 8 2,407 ->
2,375 (-1.3%), batch 32 6,883 -> 6,650 (-3.4%; bf16 4,415 -> 4,288). Batches 2-4 were not
measured; their kernels are as latency-bound as batch 1's."""


def pdl(device: torch.device, rows: int) -> bool:
    """Whether a launch over `rows` token rows uses programmatic dependent launch (PDL,
    sm_90+, small batches).

    A PDL kernel lets the next one start while it still runs: each decode-path kernel
    signals `pdl_trigger` as it begins and, before it reads anything an earlier kernel
    wrote (or writes anything), waits in `pdl_wait` for its predecessor to finish. What
    comes before the wait may only touch constant data: the INT4 GEMM prefetches its
    weights into L2 there, while the norm, RoPE or attention kernel before it runs.
    `BATON_PDL=0` turns it off (for A/B timing). H100, batch-1 INT4 engine with an INT4 LM
    head: 371.6 tok/s without, 401.6 with."""
    return rows <= PDL_MAX_ROWS and _pdl_device(device)


@functools.cache
def _pdl_device(device: torch.device) -> bool:
    if INTERPRET or device.type != "cuda" or os.environ.get("BATON_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(device: torch.device, rows: int) -> dict[str, bool]:
    """Launch options for a kernel that takes `PDL=pdl(device, rows)`."""
    return {"launch_pdl": True} if pdl(device, rows) else {}


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next PDL kernel in the stream launch now (its wait still orders it)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()
