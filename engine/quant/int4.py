"""INT4 weight-only quantization, round-to-nearest: the decode pool's format.

Per group of G input channels (G = 128, or 64 where K is not a multiple of 128):

    s = max(w_max - w_min, 1e-5) / 15       (rounded to bf16 first, as stored)
    z = clamp(round(-w_min / s), 0, 15)     q = clamp(round(w / s) + z, 0, 15)
    W ≈ (q - z) * s

The packed layout belongs to the kernel (`kernels.int4_linear`): the format picks the one
the fastest kernel on the device reads (`default_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.linear import LinearFormat, check_activation_dtype, register_format
from kernels.backend import KernelBackend
from kernels.int4_linear import (
    Int4Weight,
    default_layout,
    dequantize_int4,
    int4_group_size,
    pack_int4,
)


@dataclass(frozen=True)
class Int4Groups:
    """Canonical quantized form: q [N, K] uint8 in [0, 15], scales/zeros [N, K/G] bf16."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.q, self.scales, self.zeros)


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> Int4Groups:
    """Asymmetric round-to-nearest per group of `group_size` input channels."""
    if weight.dim() != 2:
        raise ValueError(f"INT4 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = group_size or int4_group_size(k)
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of the group size {g}")
    w = weight.float().reshape(n, k // g, g)
    w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((w_max - w_min).clamp_min(1e-5) / 15).to(torch.bfloat16)
    s = scales.float()
    zeros = (-w_min / s).round().clamp(0, 15)
    q = ((w / s[..., None]).round() + zeros[..., None]).clamp(0, 15)
    return Int4Groups(q.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.bfloat16), g)


class Int4Format(LinearFormat):
    """W4A16: asymmetric INT4 groups, bf16 activations."""

    name = "int4"
    scheme: ClassVar[str] = "int4-w4a16-asym"

    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Int4Weight:
        check_activation_dtype(self, dtype, ops)
        groups = quantize_int4(weight)
        layout = ops.int4_layout or default_layout(device)
        return pack_int4(groups.q, groups.scales, groups.zeros, groups.group_size, layout, device)

    def apply(
        self,
        ops: KernelBackend,
        stored: Int4Weight,
        x: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return ops.int4_linear(x, stored, bias)


register_format("int4", Int4Format)
