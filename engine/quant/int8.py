"""INT8 weight-only, symmetric per output channel: the decode pool's LM head on CPUs.

    s[n] = max_k |W[n, k]| / 127        q[n, k] = round(W[n, k] / s[n])  in [-127, 127]

The LM head is the one projection INT4 groups hurt badly (SmolLM2: +15% perplexity with an
INT4 head, bench/RESULTS.md), and the largest one: in bf16 it was a third of a CPU decode
step on a machine without bf16 arithmetic.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from engine.linear import LinearFormat, register_format
from kernels.backend import KernelBackend
from kernels.int8_linear import Int8Weight


def quantize_int8(weight: torch.Tensor, device: str | torch.device = "cpu") -> Int8Weight:
    """Symmetric per-output-channel int8 of a [N, K] weight."""
    if weight.dim() != 2:
        raise ValueError(f"INT8 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous().to(device), scales.contiguous().to(device))


class Int8Format(LinearFormat):
    """W8: int8 weights with per-channel fp32 scales; activations in the model dtype."""

    name = "int8"
    scheme: ClassVar[str] = "int8-w8-channel"

    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Int8Weight:
        return quantize_int8(weight, device)

    def apply(
        self, ops: KernelBackend, stored: Int8Weight, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        y = ops.int8_linear(x, stored)
        return y if bias is None else y + bias


register_format("int8", Int8Format)
