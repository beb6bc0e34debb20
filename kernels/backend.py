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


class KernelBackend(ABC):
    """The ops of a Llama-family decoder layer over a paged KV cache.

    Tensors are flattened over the step's tokens: `x` is [num_tokens, hidden], `q` is
    [num_tokens, num_heads, head_dim], `k`/`v` are [num_tokens, num_kv_heads, head_dim].
    `kv_layer` is one layer's view of the paged cache, [num_blocks, 2, block_size,
    num_kv_heads, head_dim] (K at index 0, V at 1); its block stride may exceed the block's
    size because the cache is block-major across layers (see engine.kv_format).
    """

    name: ClassVar[str]

    @abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float,
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
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store this step's K/V rows into their cache slots."""

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
