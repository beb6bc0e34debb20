"""Row-wise argmax: the Triton kernel on a GPU, torch's elsewhere (same indices)."""

from __future__ import annotations

import torch


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] int64, each row's first index of its maximum (finite rows)."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        # Imported here: a CPU-only install never loads Triton (as kernels.backend).
        from kernels.argmax_triton import argmax_rows as triton_argmax

        return triton_argmax(x)
    return x.argmax(dim=-1)
