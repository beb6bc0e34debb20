"""The torch backend: reference semantics everywhere, and the CPU fast paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul_torch
from kernels.attention_metadata import AttentionMetadata
from kernels.backend import KernelBackend
from kernels.paged_attention import paged_attention_torch, plan_attention_torch, write_kv_torch
from kernels.rmsnorm import rms_norm_torch
from kernels.rope import apply_rope_torch


class TorchBackend(KernelBackend):
    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rms_norm_torch(x, weight, eps, residual)

    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope_torch(q, k, cos, sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_torch(x)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        write_kv_torch(k, v, kv_layer, slot_mapping)

    def plan_attention(self, meta: AttentionMetadata) -> None:
        meta.plan = plan_attention_torch(meta)

    def paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return paged_attention_torch(q, kv_layer, meta, scale)

    def dense_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)
