"""INT4 weight-only quantization: the decode pool's format.

Per group of G input channels (G = 128, or 64 where K is not a multiple of 128):

    lo = min(min w, 0)   hi = max(max w, 0)
    s = max(r hi - r lo, 1e-5) / 15         (rounded to bf16 first, as stored)
    z = clamp(round(-r lo / s), 0, 15)      q = clamp(round(w / s) + z, 0, 15)
    W ≈ (q - z) * s

The range holds 0, as GPTQ's quantizer makes it: z is an integer in [0, 15], so 0 is
always on the grid, and a grid fitted to a group of one sign (or a constant group) alone
could not reach the group's values.

with r = 1 (round-to-nearest, `quantize_int4`) or a per-group clip ratio r <= 1 that a
calibrated quantizer chose (`engine.quant.awq.search_clip`). A calibrated quantizer may
also pick q itself against the group's grid (`int4_grid`; GPTQ, `engine.quant.gptq`) and
hand the format an `Int4Groups`, which it packs as it is.

The packed layout belongs to the kernel (`kernels.int4_linear`): the format picks the one
the fastest kernel on the device reads (`default_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.linear import LinearFormat, QuantizedWeight, check_activation_dtype, register_format
from kernels.backend import KernelBackend
from kernels.int4_linear import (
    Int4Weight,
    default_layout,
    dequantize_int4,
    int4_group_size,
    pack_int4,
    swiglu_fits,
    swiglu_order,
)
from kernels.pending_norm import PendingNorm


@dataclass(frozen=True)
class Int4Groups(QuantizedWeight):
    """Canonical quantized form: q [N, K] uint8 in [0, 15], scales/zeros [N, K/G] bf16."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    format: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.scales.shape != (n, k // self.group_size) or self.zeros.shape != self.scales.shape:
            raise ValueError(
                f"INT4 groups of {self.group_size} over {tuple(self.q.shape)} need scales and "
                f"zeros of shape {(n, k // self.group_size)}, got {tuple(self.scales.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    @classmethod
    def cat(cls, parts: list[Int4Groups]) -> Int4Groups:
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("cannot merge INT4 weights of different group sizes")
        return cls(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            parts[0].group_size,
        )

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.q, self.scales, self.zeros)


def int4_grid(
    weight: torch.Tensor, group_size: int | None = None, ratios: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-group (scales, zeros) [N, K/G] bf16 of `weight` [N, K], each group's range
    shrunk by `ratios` [N, K/G] where given."""
    if weight.dim() != 2:
        raise ValueError(f"INT4 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = group_size or int4_group_size(k)
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of the group size {g}")
    w = weight.float().reshape(n, k // g, g)
    w_min, w_max = w.amin(dim=-1).clamp_max(0), w.amax(dim=-1).clamp_min(0)
    if ratios is not None:
        w_min, w_max = w_min * ratios, w_max * ratios
    scales = ((w_max - w_min).clamp_min(1e-5) / 15).to(torch.bfloat16)
    zeros = (-w_min / scales.float()).round().clamp(0, 15)
    return scales, zeros.to(torch.bfloat16)


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 15) for w [N, K'] whose K' columns share one group
    (scales, zeros [N]) or span whole groups (scales, zeros [N, K'/G])."""
    s, z = scales.to(w.dtype), zeros.to(w.dtype)
    if s.dim() == 2:
        g = w.shape[1] // s.shape[1]
        s, z = s.repeat_interleave(g, dim=1), z.repeat_interleave(g, dim=1)
    else:
        s, z = s[:, None], z[:, None]
    return ((w / s).round() + z).clamp(0, 15)


def quantize_int4(
    weight: torch.Tensor, group_size: int | None = None, ratios: torch.Tensor | None = None
) -> Int4Groups:
    """Asymmetric round-to-nearest per group of `group_size` input channels."""
    scales, zeros = int4_grid(weight, group_size, ratios)
    q = round_to_grid(weight.float(), scales, zeros)
    return Int4Groups(q.to(torch.uint8), scales, zeros, weight.shape[1] // scales.shape[1])


class Int4Format(LinearFormat):
    """W4A16: asymmetric INT4 groups, bf16 activations."""

    name = "int4"
    scheme: ClassVar[str] = "int4-w4a16-asym"

    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Int4Weight:
        return self.prepare_quantized(quantize_int4(weight), dtype, device, ops)

    def prepare_quantized(
        self, weight: QuantizedWeight, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Int4Weight:
        check_activation_dtype(self, dtype, ops)
        assert isinstance(weight, Int4Groups)  # Linear hands a format only its own kind
        layout = ops.int4_layout or default_layout(device)
        return pack_int4(weight.q, weight.scales, weight.zeros, weight.group_size, layout, device)

    def apply(
        self,
        ops: KernelBackend,
        stored: Int4Weight,
        x: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return ops.int4_linear(x, stored, bias)

    def prepare_gated(
        self,
        weight: torch.Tensor | QuantizedWeight,
        dtype: torch.dtype,
        device: str,
        ops: KernelBackend,
    ) -> Int4Weight | None:
        """The [gate ‖ up] rows quantized as `prepare` would (per row, so the order does
        not change them), then reordered for the SiLU-and-mul epilogue."""
        rows = weight.shape[0]
        layout = ops.int4_layout or default_layout(device)
        if not ops.fused_int4_swiglu or layout != "triton" or not swiglu_fits(rows):
            return None
        # Linear hands a format only its own kind of quantized weight
        groups = weight if isinstance(weight, QuantizedWeight) else quantize_int4(weight)
        assert isinstance(groups, Int4Groups)
        order = swiglu_order(rows).to(groups.q.device)
        reordered = Int4Groups(
            groups.q[order], groups.scales[order], groups.zeros[order], groups.group_size
        )
        return self.prepare_quantized(reordered, dtype, device, ops)

    def apply_gated(
        self, ops: KernelBackend, stored: Int4Weight, x: torch.Tensor | PendingNorm
    ) -> torch.Tensor:
        return ops.int4_linear_swiglu(x, stored)

    def takes_pending_norm(self, ops: KernelBackend) -> bool:
        return ops.fused_int4_norm

    def apply_normed(
        self, ops: KernelBackend, stored: Int4Weight, x: PendingNorm, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return ops.int4_linear_normed(x, stored, bias)

    def apply_add_norm(
        self,
        ops: KernelBackend,
        stored: Int4Weight,
        x: torch.Tensor,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
    ) -> tuple[PendingNorm, torch.Tensor]:
        return ops.int4_linear_add_norm(x, stored, residual, gamma, eps)


register_format("int4", Int4Format)
