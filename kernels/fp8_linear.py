"""FP8 (e4m3) linear for prefill, torch path: the reference and the CPU path.

    y = (q_x · q_Wᵀ) * s_x[t] * s_W[n]          q_x = fp8(x / s_x),  s_x[t] = amax|x[t, :]| / 448

Weights carry one fp32 scale per output channel (produced by `engine.quant.fp8`);
activations are quantized per token, dynamically, right before the GEMM or inside the
op that produces them (`rms_norm_fp8`, `silu_and_mul_fp8`), which then round their bf16
output first so that the fused op quantizes exactly what the unfused pair would.

On CPU neither `torch._scaled_mm` nor converting fp8 weights per call is usable (measured
on a Zen 3 core for SmolLM2-135M's projections, M = 1: 1.2 s and 0.56 s per forward
against 16 ms for an fp32 GEMM), so a CPU `Fp8Weight` also keeps its fp8 values widened
to fp32 once, at load: the GEMM multiplies exactly the fp8 numbers, in fp32, and applies
both scales on the output like the GPU kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
"""An all-zero row gets a tiny scale rather than 0, so that quantizing it never divides 0/0."""


@dataclass(frozen=True)
class Fp8Rows:
    """Activations their producer (`rms_norm_fp8`, `silu_and_mul_fp8`) already quantized per
    token for the FP8 GEMM that consumes them: the q and scale that quantizing the
    producer's `dtype` output would give, without that output's round trip through memory
    or a quantization pass of its own."""

    q: torch.Tensor
    """[T, K] float8_e4m3fn."""
    scale: torch.Tensor
    """[T, 1] fp32: row t ≈ q[t] * scale[t]."""
    dtype: torch.dtype
    """The activation dtype: what the GEMM returns."""


@dataclass(frozen=True)
class Fp8Weight:
    """A projection weight in FP8 with per-output-channel scales.

    `data` is [out, in] float8_e4m3fn (row-major: each output channel's K values are
    contiguous, the K-major operand FP8 tensor cores want); `scale` is [out] fp32 with
    `W ≈ data * scale[:, None]`. `widened` is `data` as fp32, kept only on CPU.
    """

    data: torch.Tensor
    scale: torch.Tensor
    widened: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.data.dtype == FP8_DTYPE and self.data.dim() == 2, self.data.dtype
        assert self.data.is_contiguous()
        assert self.scale.dtype == torch.float32 and self.scale.shape == self.data.shape[:1]

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.data.shape[1])


def make_fp8_weight(
    data: torch.Tensor, scale: torch.Tensor, device: str | torch.device
) -> Fp8Weight:
    """Place quantized weights on `device`, adding the CPU path's widened copy there."""
    data = data.to(device).contiguous()
    scale = scale.to(device=device, dtype=torch.float32).contiguous()
    widened = data.float() if data.device.type == "cpu" else None
    return Fp8Weight(data, scale, widened)


def quantize_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: x [T, K] -> (q [T, K] fp8, scale [T, 1] fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    q = (xf * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, amax / FP8_MAX


def fp8_linear_torch(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`x` in the activation dtype (quantized here) or already FP8 with `x_scale` [T, 1]."""
    if x_scale is None:
        out_dtype = out_dtype or x.dtype
        x, x_scale = quantize_fp8_torch(x)
    assert x.dtype == FP8_DTYPE and out_dtype is not None, "pre-quantized x needs out_dtype"
    if weight.widened is not None:
        y = (x.float() @ weight.widened.T) * x_scale * weight.scale
    elif x.is_cuda:
        y = torch._scaled_mm(
            x, weight.data.T, x_scale, weight.scale[None, :], out_dtype=torch.float32
        )
    else:
        y = (x.float() @ weight.data.float().T) * x_scale * weight.scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
