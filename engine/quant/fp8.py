"""FP8 (e4m3) weights with one fp32 scale per output channel: the prefill pool's format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.linear import LinearFormat, QuantizedWeight, check_activation_dtype, register_format
from kernels.backend import KernelBackend
from kernels.fp8_linear import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    Fp8Rows,
    Fp8Weight,
    make_fp8_weight,
)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] full precision -> (q [out, in] float8_e4m3fn, scale [out] fp32), W ≈ q * s."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(AMAX_FLOOR) / FP8_MAX
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


@dataclass(frozen=True)
class Fp8Channels(QuantizedWeight):
    """A weight already in FP8 (`q` [out, in] float8_e4m3fn, `scale` [out] fp32, W ≈ q * s),
    as a calibrated quantizer (`engine.quant.gptq`) leaves it."""

    q: torch.Tensor
    scale: torch.Tensor
    format: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.q.dtype != FP8_DTYPE or self.q.dim() != 2:
            raise ValueError(
                f"FP8 weights are 2-D {FP8_DTYPE}, got {self.q.dtype} {self.q.dim()}-D"
            )
        if self.scale.shape != self.q.shape[:1]:
            raise ValueError(f"one scale per output channel: {tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    @classmethod
    def cat(cls, parts: list[Fp8Channels]) -> Fp8Channels:
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


def _check_row_bytes(shape: tuple[int, ...], dtype: torch.dtype, ops: KernelBackend) -> None:
    """Refuse, at load, a weight whose rows or output rows the backend's GEMM cannot move."""
    n, k = shape
    align, out_bytes = ops.fp8_row_bytes, n * dtype.itemsize
    if k % align or out_bytes % align:
        raise ValueError(
            f"the {ops.name} backend's FP8 GEMM needs rows of a multiple of {align} bytes: "
            f"in_features {k} (1 byte each) and out_features {n} ({dtype.itemsize} bytes each "
            f"in {str(dtype).removeprefix('torch.')}); pad the projection or use another format"
        )


class Fp8Format(LinearFormat):
    """W8A8 FP8: per-channel weight scales, per-token dynamic activation scales."""

    name = "fp8"
    scheme: ClassVar[str] = "fp8-e4m3-w-channel-a-token"

    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Fp8Weight:
        check_activation_dtype(self, dtype, ops)
        _check_row_bytes(weight.shape, dtype, ops)
        return make_fp8_weight(*quantize_fp8_per_channel(weight), device)

    def prepare_quantized(
        self, weight: QuantizedWeight, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Fp8Weight:
        check_activation_dtype(self, dtype, ops)
        assert isinstance(weight, Fp8Channels)  # Linear hands a format only its own kind
        _check_row_bytes(weight.shape, dtype, ops)
        return make_fp8_weight(weight.q, weight.scale.float(), device)

    def apply(
        self,
        ops: KernelBackend,
        stored: Fp8Weight,
        x: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return ops.fp8_linear(x, stored, bias)

    def takes_fp8_rows(self, ops: KernelBackend) -> bool:
        return True

    def apply_fp8_rows(
        self, ops: KernelBackend, stored: Fp8Weight, x: Fp8Rows, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return ops.fp8_linear(x.q, stored, bias, x.scale, x.dtype)


register_format("fp8", Fp8Format)
