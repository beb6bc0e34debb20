"""Error bounds and output poisoning shared by the kernel tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ROUND = 2.0**-7 if INTERPRET else 2.0**-8
"""Worst relative error of one fp32 -> bf16 rounding: half an ulp compiled, a whole ulp in
the interpreter (whose casts truncate)."""
FP8_ROUND = 2.0**-4
"""The same for fp32 -> float8_e4m3fn (3 mantissa bits; `kernels.triton_runtime.to_fp8`
rounds to nearest even under the interpreter too)."""
FP8_SUBNORMAL = 2.0**-9
"""Spacing of e4m3 subnormals, in units of the scale."""


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every tensor allocated inside (by a launcher) starts as NaN (-1 for integers), so an
    output element the kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    torch.empty = lambda *a, **k: poison(empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]


def assert_within(
    out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor | float, what: str
) -> None:
    """Elementwise |out - ref| <= bound, and out finite everywhere."""
    out64 = out.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output (unwritten or overflow)"
    excess = (out64 - ref.double()).abs() - bound
    worst = int(excess.flatten().argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: {int((excess > 0).sum())}/{excess.numel()} elements out of bound; worst at "
        f"{worst}: out {out64.flatten()[worst]:.6g} ref {ref.flatten()[worst]:.6g} "
        f"excess {excess.flatten()[worst]:.3g}"
    )


def fp8_bound(y: torch.Tensor, scale: torch.Tensor, y_slack: float = 0.0) -> torch.Tensor:
    """How far q * scale may sit from y after per-token e4m3 quantization, when the kernel
    quantized a y' with |y' - y| <= y_slack * |y|."""
    slack = y_slack + FP8_ROUND * (1 + y_slack)
    return slack * y.abs().double() + FP8_SUBNORMAL * scale.double()
