"""The Triton backend: every op of `KernelBackend` as a Triton kernel (dense GEMMs: cuBLAS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import activation_triton, fp8_linear_triton, int4_linear_triton, rmsnorm_triton
from kernels import paged_attention_triton as attention
from kernels.attention_metadata import AttentionMetadata
from kernels.backend import KernelBackend
from kernels.fp8_linear import Fp8Weight
from kernels.int4_linear import Int4Weight
from kernels.pending_norm import PendingNorm
from kernels.rope_triton import apply_rope, apply_rope_write_kv


class TritonBackend(KernelBackend):
    name = "triton"
    int4_layout = "triton"
    fused_int4_swiglu = True
    fused_int4_norm = True
    fp8_row_bytes = 16  # the FP8 GEMM moves its tiles with TMA descriptors
    quantized_activation_dtypes = (torch.bfloat16, torch.float16)

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rmsnorm_triton.rms_norm(x, weight, eps, residual)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, cos, sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return activation_triton.silu_and_mul(x)

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        attention.write_kv(k, v, kv_layer, slot_mapping)

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        # A cache in q's dtype: an fp8 cache's write needs its scales (`rope_attention`).
        return apply_rope_write_kv(q, k, v, cos, sin, kv_layer, slot_mapping)

    def rope_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention.can_fuse_rope(q, kv_layer, meta):
            rope = attention.DecodeRope(k, v, cos, sin)
            return attention.paged_attention(q, kv_layer, meta, scale, kv_scales, rope=rope)
        return super().rope_attention(q, k, v, cos, sin, kv_layer, meta, scale, kv_scales)

    def plan_attention(self, meta: AttentionMetadata) -> None:
        meta.plan = attention.plan_attention(meta)

    def paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return attention.paged_attention(q, kv_layer, meta, scale)

    def dense_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def quantize_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_linear_triton.quantize_fp8(x)

    def rms_norm_fp8(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return rmsnorm_triton.rms_norm_fp8(x, weight, eps, residual)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return activation_triton.silu_and_mul_fp8(x)

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: Fp8Weight,
        bias: torch.Tensor | None,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        return fp8_linear_triton.fp8_linear(x, weight, bias, x_scale, out_dtype)

    def int4_linear(
        self, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return int4_linear_triton.int4_linear(x, weight, bias)

    def int4_linear_swiglu(self, x: torch.Tensor | PendingNorm, weight: Int4Weight) -> torch.Tensor:
        return int4_linear_triton.int4_linear(x, weight, None, swiglu=True)

    def int4_linear_normed(
        self, x: PendingNorm, weight: Int4Weight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return int4_linear_triton.int4_linear(x, weight, bias)

    def int4_linear_add_norm(
        self,
        x: torch.Tensor,
        weight: Int4Weight,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
    ) -> tuple[PendingNorm, torch.Tensor]:
        return int4_linear_triton.int4_linear_add_norm(x, weight, residual, gamma, eps)

    def write_kv_fp8(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor,
    ) -> None:
        attention.write_kv(k, v, kv_layer, slot_mapping, kv_scales)

    def paged_attention_fp8(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor,
    ) -> torch.Tensor:
        return attention.paged_attention(q, kv_layer, meta, scale, kv_scales)
