"""FP8 (e4m3) KV cache, torch path: the reference for the Triton and native CPU kernels, and
the CPU path where the native ones do not run.

A layer's scales are [2 (K|V), num_kv_heads] fp32, fixed per (layer, K|V, head) as
DESIGN.md's block format says; a cached value is `fp8(clamp(value / scale, ±448))`.
Attention dequantizes only the blocks this step reads: they are gathered into a compact
cache (what the bf16 path gathers anyway), widened, and the block tables are renumbered
to point into it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import FP8_DTYPE, FP8_MAX
from kernels.paged_attention import paged_attention_torch, plan_attention_torch


def check_kv_scales(kv_scales: torch.Tensor, kv_layer: torch.Tensor) -> list[float]:
    """The layer's scales as a host list (K's heads, then V's), checked: one small copy,
    which the native kernels take as their argument (`kernels.paged_attention_cpu`)."""
    assert kv_layer.dtype == FP8_DTYPE, kv_layer.dtype
    assert kv_scales.dtype == torch.float32 and kv_scales.shape == (2, kv_layer.shape[3]), (
        kv_scales.dtype,
        kv_scales.shape,
    )
    values = kv_scales.flatten().tolist()
    # A zero scale caches NaN (0 / 0) or +-448 for every value; inf caches zeros.
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"FP8 KV scales must be finite and positive, got {kv_scales.tolist()} "
            "([K | V] x KV heads)"
        )
    return values


def write_kv_fp8_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor,
) -> None:
    check_kv_scales(kv_scales, kv_layer)
    block_size = kv_layer.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    for i, x in enumerate((k, v)):
        scaled = (x.float() / kv_scales[i][:, None]).clamp(-FP8_MAX, FP8_MAX)
        kv_layer[blocks, i, offsets] = scaled.to(FP8_DTYPE)


def paged_attention_fp8_torch(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: torch.Tensor,
) -> torch.Tensor:
    check_kv_scales(kv_scales, kv_layer)
    if meta.batch_size == 0:
        return torch.empty_like(q)
    bs = meta.block_size
    used = [-(-n // bs) for n in meta.seq_lens_host]
    width = max(used)
    tables = meta.block_tables[:, :width].long()
    in_use = (
        torch.arange(width, device=tables.device)[None, :]
        < torch.tensor(used, device=tables.device)[:, None]
    )
    blocks, compact = torch.unique(tables[in_use], return_inverse=True)
    remapped = torch.zeros_like(tables)
    remapped[in_use] = compact
    kv = kv_layer[blocks].float() * kv_scales[None, :, None, :, None]
    local = dataclasses.replace(meta, block_tables=remapped.to(torch.int32), plan=None)
    local.plan = plan_attention_torch(local)
    return paged_attention_torch(q, kv.to(q.dtype), local, scale)
