# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""RMSNorm with a fused residual add (and optionally per-token FP8 output), Triton.

One program per token holds the whole row, so the residual add, the reduction, the
weight and (for `rms_norm_fp8`) the quantization amax all happen on one read of x and
residual. Rounding follows `kernels.rmsnorm.rms_norm_torch` step by step (add in the
activation dtype, normalize in fp32, cast, multiply by the weight, cast), and the FP8
variant quantizes that rounded row, so fused and unfused paths agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_linear import FP8_DTYPE
from kernels.fp8_linear_triton import row_launch, store_fp8_row
from kernels.triton_runtime import check_device, pdl, pdl_options, pdl_trigger, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, scale_ptr,
    N, stride_x, stride_res, eps,
    HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * N + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype)
    if FP8_OUT:
        store_fp8_row(y.to(tl.float32), mask, out_ptr + row * N + cols, scale_ptr + row)
    else:
        tl.store(out_ptr + row * N + cols, y, mask=mask)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    fp8_out: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    t, n = x.shape
    assert weight.shape == (n,) and weight.dtype == x.dtype and weight.is_contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, residual.shape
        assert residual.stride(1) == 1, residual.stride()
        check_device(x, weight, residual)
    else:
        check_device(x, weight)
    out = torch.empty((t, n), dtype=FP8_DTYPE if fp8_out else x.dtype, device=x.device)
    scale = torch.empty((t, 1), dtype=torch.float32, device=x.device) if fp8_out else None
    summed = torch.empty_like(out, dtype=x.dtype) if residual is not None else x
    if t:
        block, warps = row_launch(n)
        _rms_norm_kernel[(t,)](
            x, x if residual is None else residual, weight, out, summed,
            out if scale is None else scale,
            n, x.stride(0), 0 if residual is None else residual.stride(0), eps,
            HAS_RESIDUAL=residual is not None, FP8_OUT=fp8_out, BLOCK=block, num_warps=warps,
            PDL=pdl(x.device, t), **pdl_options(x.device, t),
        )  # fmt: skip
    return out, scale, summed


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    out, _, summed = _launch(x, weight, eps, residual, fp8_out=False)
    return out, summed


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, scale, summed = _launch(x, weight, eps, residual, fp8_out=True)
    assert scale is not None
    return out, scale, summed
