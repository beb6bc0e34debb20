"""The interface model code calls for every kernel, and the registry of implementations.

    ops = get_backend("torch")      # or "triton" on a GPU
    h, residual = ops.rms_norm(x, w, eps, residual)

A backend is stateless apart from caches; per-step state lives in `AttentionMetadata`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import Fp8Weight
from kernels.int4_linear import Int4Weight
from kernels.int8_linear import Int8Weight, int8_linear
from kernels.pending_norm import PendingNorm


class KernelBackend(ABC):
    """The ops of a Llama-family decoder layer over a paged KV cache.

    Tensors are flattened over the step's tokens: `x` is [num_tokens, hidden], `q` is
    [num_tokens, num_heads, head_dim], `k`/`v` are [num_tokens, num_kv_heads, head_dim].
    `kv_layer` is one layer's view of the paged cache, [num_blocks, 2, block_size,
    num_kv_heads, head_dim] (K at index 0, V at 1); its block stride may exceed the block's
    size because the cache is block-major across layers (see engine.kv_format).
    """

    name: ClassVar[str]
    quantized_activation_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )
    """Activation dtypes `fp8_linear` and `int4_linear` take."""
    int4_layout: ClassVar[str | None] = None
    """The INT4 packing `int4_linear` needs (kernels.int4_linear), or None: either works."""
    fused_int4_swiglu: ClassVar[bool] = False
    """Whether `int4_linear_swiglu` exists (a projection with SiLU-and-mul in its epilogue)."""
    fused_int4_norm: ClassVar[bool] = False
    """Whether `int4_linear_add_norm` exists and the INT4 projections take a `PendingNorm`
    (an RMSNorm split between the GEMM before it and the GEMM after it)."""
    fp8_row_bytes: ClassVar[int] = 1
    """What the rows of `fp8_linear`'s operands and output must be a multiple of, in bytes
    (in_features FP8 values; out_features values of the activation dtype)."""

    @abstractmethod
    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With `s = x + residual` (or `x`): returns (rmsnorm(s) * weight, s)."""

    @abstractmethod
    def apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE; `cos`/`sin` are [num_tokens, head_dim // 2] for these tokens."""

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate ‖ up) -> silu(gate) * up, [T, I]."""

    @abstractmethod
    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store this step's K/V rows into their cache slots."""

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
        """`apply_rope` on q and k, then `write_kv` of the rotated k and v; returns the
        rotated q. A backend may fuse the two (the Triton one does)."""
        q, k = self.apply_rope(q, k, cos, sin)
        self.write_kv(k, v, kv_layer, slot_mapping)
        return q

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
        """A layer's attention from its unrotated projections: `rope_write_kv`, then
        `paged_attention` of the rotated q; over an fp8 cache (`kv_scales`), `apply_rope`,
        `write_kv_fp8` and `paged_attention_fp8`. A backend may fuse them (the Triton one
        does in decode-only steps: its decode kernel rotates q and writes the new K/V
        itself)."""
        if kv_scales is not None:
            q, k = self.apply_rope(q, k, cos, sin)
            self.write_kv_fp8(k, v, kv_layer, meta.slot_mapping, kv_scales)
            return self.paged_attention_fp8(q, kv_layer, meta, scale, kv_scales)
        q = self.rope_write_kv(q, k, v, cos, sin, kv_layer, meta.slot_mapping)
        return self.paged_attention(q, kv_layer, meta, scale)

    @abstractmethod
    def plan_attention(self, meta: AttentionMetadata) -> None:
        """Build per-step attention state once; every layer then reuses `meta.plan`."""

    @abstractmethod
    def paged_attention(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of each sequence's new queries over its cached keys.

        Returns [num_tokens, num_heads, head_dim]. Query row r of sequence b sits at position
        `seq_lens[b] - query_len[b] + r` and sees keys at positions <= its own.
        """

    @abstractmethod
    def dense_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x @ weight.T (+ bias), weight [out, in] in the activation dtype."""

    # FP8 prefill (kernels.fp8_linear): activations are quantized per token, either by the
    # op that produces them (the `*_fp8` variants, which return (q, scale, ...)) or inside
    # `fp8_linear` when handed activations in the model dtype.

    @abstractmethod
    def quantize_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, K] -> (q [T, K] float8_e4m3fn, scale [T, 1] fp32) with x ≈ q * scale."""

    @abstractmethod
    def rms_norm_fp8(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`rms_norm` with its output quantized per token: (q, scale, s)."""

    @abstractmethod
    def silu_and_mul_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`silu_and_mul` with its output quantized per token: (q, scale)."""

    @abstractmethod
    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: Fp8Weight,
        bias: torch.Tensor | None,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """x @ W.T (+ bias) with FP8 weights and per-token FP8 activations.

        `x` is [T, in] in the model dtype (quantized here; the output takes its dtype), or
        float8_e4m3fn with `x_scale` [T, 1] from a `*_fp8` op (then `out_dtype` is required).
        """

    @abstractmethod
    def int4_linear(
        self, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [T, in] @ W.T (+ bias) with group-quantized INT4 weights; output in x's dtype."""

    def int4_linear_add_norm(
        self,
        x: torch.Tensor,
        weight: Int4Weight,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
    ) -> tuple[PendingNorm, torch.Tensor]:
        """`rms_norm(int4_linear(x, W), gamma, eps, residual)` with the norm left pending for
        the next INT4 projection (where `fused_int4_norm`): (pending rows, their sum s)."""
        raise NotImplementedError(f"the {self.name} backend has no fused INT4 RMSNorm")

    def int4_linear_normed(
        self, x: PendingNorm, weight: Int4Weight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`int4_linear` of the rows a `PendingNorm` stands for (where `fused_int4_norm`)."""
        raise NotImplementedError(f"the {self.name} backend has no fused INT4 RMSNorm")

    def int4_linear_swiglu(self, x: torch.Tensor | PendingNorm, weight: Int4Weight) -> torch.Tensor:
        """`silu_and_mul(int4_linear(x, W))` in one kernel, W a [gate ‖ up] projection whose
        rows are in `kernels.int4_linear.swiglu_order` (where `fused_int4_swiglu`)."""
        raise NotImplementedError(f"the {self.name} backend has no fused INT4 SiLU-and-mul")

    def int8_linear(self, x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
        """x [T, in] @ W.T with per-channel INT8 weights; output in x's dtype. One
        implementation for every backend: the native CPU kernel, else dequantize-and-matmul."""
        return int8_linear(x, weight)

    # FP8 KV cache (DESIGN.md "KV block format"): `kv_scales` is this layer's [2, num_kv_heads]
    # fp32 (K|V, head) scales, cached value = fp8(value / scale).

    @abstractmethod
    def write_kv_fp8(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor,
    ) -> None:
        """`write_kv` into a float8_e4m3fn cache, dividing by the per-head scales."""

    @abstractmethod
    def paged_attention_fp8(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor,
    ) -> torch.Tensor:
        """`paged_attention` over a float8_e4m3fn cache written by `write_kv_fp8`."""


_BACKENDS: dict[str, str] = {
    "torch": "kernels.torch_backend:TorchBackend",
    "triton": "kernels.triton_backend:TritonBackend",
}
_INSTANCES: dict[str, KernelBackend] = {}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> KernelBackend:
    """The backend called `name`; imported on first use so torch-only installs never load Triton."""
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r}; choose one of {', '.join(available_backends())}"
        )
    if name not in _INSTANCES:
        module_name, cls_name = _BACKENDS[name].split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        _INSTANCES[name] = cls()
    return _INSTANCES[name]
