"""SwiGLU on the CPU: launcher of `kernels/cpu/activation.cpp` (bf16)."""

from __future__ import annotations

import torch

from kernels import native


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate ‖ up) -> silu(gate) * up, [T, I], for bf16 x (`native.handles`)."""
    tokens, width = x.shape
    inter = width // 2
    assert width % 16 == 0
    x = x.contiguous()
    out = torch.empty((tokens, inter), dtype=x.dtype)
    native.lib().baton_silu_and_mul_bf16(
        x.data_ptr(), out.data_ptr(), tokens, inter, torch.get_num_threads()
    )
    return out
