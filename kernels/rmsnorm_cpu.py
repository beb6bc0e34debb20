"""RMSNorm (+ residual) on the CPU: launcher of `kernels/cpu/rmsnorm.cpp` (bf16)."""

from __future__ import annotations

import torch

from kernels import native


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.rmsnorm.rms_norm_torch`, for bf16 rows (`native.handles`)."""
    assert x.dim() == 2 and weight.shape == (x.shape[1],)
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if residual is not None:
        assert residual.shape == x.shape
        residual = residual.contiguous()
    native.lib().baton_rms_norm_bf16(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        summed.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
        torch.get_num_threads(),
    )
    return out, summed
