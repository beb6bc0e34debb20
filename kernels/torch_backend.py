"""The torch backend: reference semantics everywhere, and the CPU fast paths.

With bf16 activations on a CPU that `kernels.native` serves (x86 with AVX2 and a C++
compiler), the per-token ops of a decoder layer run as native kernels: one call each
instead of five to twenty torch ops, which is most of a small model's decode step.
fp32 stays on torch, whose arithmetic the Hugging Face comparisons match bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import native
from kernels.activation import silu_and_mul_torch
from kernels.activation_cpu import silu_and_mul_cpu
from kernels.attention_metadata import AttentionMetadata
from kernels.backend import KernelBackend
from kernels.fp8_linear import FP8_DTYPE, Fp8Weight, fp8_linear_torch, quantize_fp8_torch
from kernels.int4_linear import Int4Weight, int4_linear_torch
from kernels.kv_cache_fp8 import paged_attention_fp8_torch, write_kv_fp8_torch
from kernels.paged_attention import paged_attention_torch, plan_attention_torch, write_kv_torch
from kernels.paged_attention_cpu import paged_attention_cpu, write_kv_cpu
from kernels.rmsnorm import rms_norm_torch
from kernels.rmsnorm_cpu import rms_norm_cpu
from kernels.rope import apply_rope_torch
from kernels.rope_cpu import apply_rope_cpu


class TorchBackend(KernelBackend):
    name = "torch"

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if native.handles(x, weight):
            return rms_norm_cpu(x, weight, eps, residual)
        return rms_norm_torch(x, weight, eps, residual)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if native.handles(q, k) and q.shape[-1] % 16 == 0:
            return apply_rope_cpu(q, k, cos, sin)
        return apply_rope_torch(q, k, cos, sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if native.handles(x) and x.shape[-1] % 16 == 0:
            return silu_and_mul_cpu(x)
        return silu_and_mul_torch(x)

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if native.handles(k, v, kv_layer):
            write_kv_cpu(k, v, kv_layer, slot_mapping)
        else:
            write_kv_torch(k, v, kv_layer, slot_mapping)

    def plan_attention(self, meta: AttentionMetadata) -> None:
        meta.plan = plan_attention_torch(meta)

    def paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if not native.handles(q, kv_layer):
            return paged_attention_torch(q, kv_layer, meta, scale)
        return paged_attention_cpu(q, kv_layer, meta, scale)

    def dense_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def quantize_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_torch(x)

    def rms_norm_fp8(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, summed = rms_norm_torch(x, weight, eps, residual)
        return (*quantize_fp8_torch(h), summed)

    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_torch(silu_and_mul_torch(x))

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: Fp8Weight,
        bias: torch.Tensor | None,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        return fp8_linear_torch(x, weight, bias, x_scale, out_dtype)

    def int4_linear(
        self, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return int4_linear_torch(x, weight, bias)

    def write_kv_fp8(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor,
    ) -> None:
        if native.handles(k, v) and native.handles(kv_layer, dtype=FP8_DTYPE):
            write_kv_cpu(k, v, kv_layer, slot_mapping, kv_scales)
        else:
            write_kv_fp8_torch(k, v, kv_layer, slot_mapping, kv_scales)

    def paged_attention_fp8(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor,
    ) -> torch.Tensor:
        if native.handles(q) and native.handles(kv_layer, dtype=FP8_DTYPE):
            return paged_attention_cpu(q, kv_layer, meta, scale, kv_scales=kv_scales)
        return paged_attention_fp8_torch(q, kv_layer, meta, scale, kv_scales)
