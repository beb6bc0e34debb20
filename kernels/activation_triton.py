# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""SwiGLU on a merged gate‖up projection, Triton, with an FP8-output variant.

Rounding follows `kernels.activation.silu_and_mul_torch` (silu rounded to the activation
dtype, then the product). The FP8 variant holds one whole row per program so it can
take the per-token amax of the rounded product and write one byte per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_linear import FP8_DTYPE
from kernels.fp8_linear_triton import row_launch, store_fp8_row
from kernels.triton_runtime import check_device, pdl, pdl_options, pdl_trigger, pdl_wait


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in `dtype`, rounded as `kernels.activation.silu_and_mul_torch` rounds
    it: gate and up in `dtype` (fp32 accumulators are rounded to it first), silu rounded,
    then the product. The INT4 GEMM's SiLU-and-mul epilogue uses it too."""
    g = gate.to(dtype).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)
    return (silu.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _swiglu(x_ptr, cols, mask, inter):
    g = tl.load(x_ptr + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + inter + cols, mask=mask, other=0.0)
    return silu_mul(g, u, g.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    pdl_wait(PDL)
    y = _swiglu(x_ptr + row * stride_x, cols, mask, inter)
    tl.store(out_ptr + row * inter + cols, y, mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, scale_ptr, inter, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    y = _swiglu(x_ptr + row * stride_x, cols, mask, inter)
    store_fp8_row(y.to(tl.float32), mask, q_ptr + row * inter + cols, scale_ptr + row)


def _check(x: torch.Tensor) -> tuple[int, int]:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    check_device(x)
    return x.shape[0], x.shape[1] // 2


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate ‖ up) -> silu(gate) * up, [T, inter]."""
    t, i = _check(x)
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t:
        block = min(2048, triton.next_power_of_2(i))
        grid = (t, triton.cdiv(i, block))
        _silu_and_mul_kernel[grid](
            x, out, i, x.stride(0), BLOCK=block, num_warps=4,
            PDL=pdl(x.device, t), **pdl_options(x.device, t),
        )  # fmt: skip
    return out


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 2I] -> (q [T, inter] fp8, scale [T, 1] fp32), quantized per token."""
    t, i = _check(x)
    q = torch.empty((t, i), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    if t:
        block, warps = row_launch(i)
        _silu_and_mul_fp8_kernel[(t,)](x, q, scale, i, x.stride(0), BLOCK=block, num_warps=warps)
    return q, scale
