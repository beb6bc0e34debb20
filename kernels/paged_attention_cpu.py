"""Paged attention on the CPU (decode rows and prefill chunks), and KV writes: launchers of
`kernels/cpu/paged_attention.cpp` and `kernels/cpu/kv_cache.cpp`, for a bf16 cache or, given
its `kv_scales`, a float8_e4m3fn one (`kernels.kv_cache_fp8`)."""

from __future__ import annotations

import ctypes

import torch

from kernels import native
from kernels.attention_metadata import AttentionMetadata
from kernels.kv_cache_fp8 import check_kv_scales
from kernels.paged_attention import TorchAttentionPlan


def check_slots(slots: torch.Tensor, kv_layer: torch.Tensor) -> None:
    """Every slot lies in the layer's cache: the native kernels write through raw pointers,
    where a slot past the end would land in the next layer's blocks."""
    capacity = kv_layer.shape[0] * kv_layer.shape[2]
    if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < capacity:
        raise IndexError(
            f"KV slot_mapping holds slots in [{int(slots.min())}, {int(slots.max())}]; the "
            f"layer's cache has {capacity} ({kv_layer.shape[0]} blocks of {kv_layer.shape[2]})"
        )


def check_block_ids(meta: AttentionMetadata, blocks: int) -> None:
    """The blocks the step reads (found once per step by `plan_attention_torch`) lie in a
    cache of `blocks` blocks: the native kernels read through raw pointers."""
    plan = meta.plan
    assert isinstance(plan, TorchAttentionPlan), "call plan_attention before paged_attention"
    if plan.block_ids is not None and not 0 <= plan.block_ids[0] <= plan.block_ids[1] < blocks:
        low, high = plan.block_ids
        raise IndexError(
            f"block_tables name blocks in [{low}, {high}] for the tokens the step reads; the "
            f"layer's cache has {blocks} blocks"
        )


def _check_rows(name: str, t: torch.Tensor, dim: int) -> None:
    # Rows may be strided (k and v are views of the fused QKV output); heads are not.
    assert t.stride(2) == 1 and t.stride(1) == dim, (
        f"{name} {tuple(t.shape)} has strides {t.stride()}; the native kernel needs each "
        f"token's heads packed: strides (any, {dim}, 1)"
    )


def _check_cache(kv_layer: torch.Tensor, kv_heads: int, dim: int) -> None:
    want = (kv_heads * dim, dim, 1)
    assert kv_layer.stride()[2:] == want, (
        f"kv_layer {tuple(kv_layer.shape)} has strides {kv_layer.stride()}; the native "
        f"kernels need each slot's heads packed: strides (any, any, {kv_heads * dim}, {dim}, 1)"
    )


def _host_scales(kv_scales: torch.Tensor, kv_layer: torch.Tensor) -> ctypes.Array[ctypes.c_float]:
    values = check_kv_scales(kv_scales, kv_layer)
    return (ctypes.c_float * len(values))(*values)


def write_kv_cpu(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Same contract as `kernels.paged_attention.write_kv_torch` for bf16 rows into a bf16
    cache; with `kv_scales`, as `kernels.kv_cache_fp8.write_kv_fp8_torch` (the same bytes)
    into a float8_e4m3fn one."""
    tokens, kv_heads, dim = k.shape
    assert v.shape == k.shape and kv_layer.shape[3:] == (kv_heads, dim), (
        f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, and kv_layer "
        f"{tuple(kv_layer.shape)} hold their (kv_heads, head_dim) = {(kv_heads, dim)}"
    )
    _check_rows("k", k, dim)
    _check_rows("v", v, dim)
    _check_cache(kv_layer, kv_heads, dim)
    slots = slot_mapping.to(torch.int64).contiguous()
    check_slots(slots, kv_layer)
    rows = (k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), kv_layer.data_ptr())
    layout = (kv_layer.stride(0), kv_layer.stride(1), kv_layer.shape[2], slots.data_ptr(), tokens)
    if kv_scales is None:
        native.lib().baton_write_kv_bf16(*rows, *layout, kv_heads * dim)
    else:
        scales = _host_scales(kv_scales, kv_layer)
        native.lib().baton_write_kv_fp8(*rows, *layout, kv_heads, dim, scales)


def paged_attention_cpu(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    seqs: int | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query row of the step's first `seqs` sequences (all of them by
    default): [rows, num_heads, head_dim]. The contract of `paged_attention_torch` for
    those rows, decode rows and prefill chunks alike (with `kv_scales`, of
    `paged_attention_fp8_torch` over a float8_e4m3fn cache). Every row comes out bit for
    bit as the decode step at its position would compute it, so `meta.row_invariant`
    holds."""
    seqs = meta.batch_size if seqs is None else seqs
    _, heads, dim = q.shape
    kv_heads = kv_layer.shape[3]
    assert heads % kv_heads == 0 and dim % 8 == 0 and kv_layer.shape[4] == dim, (
        f"q {tuple(q.shape)} against kv_layer {tuple(kv_layer.shape)}: the native kernel needs "
        f"query heads a multiple of the {kv_heads} KV heads and one head_dim, a multiple of 8"
    )
    _check_cache(kv_layer, kv_heads, dim)
    assert (
        meta.block_tables.dtype
        == meta.seq_lens.dtype
        == meta.query_start_loc.dtype
        == (torch.int32)
    ), (
        f"block_tables, seq_lens and query_start_loc must be int32, got "
        f"{meta.block_tables.dtype}, {meta.seq_lens.dtype} and {meta.query_start_loc.dtype}"
    )
    check_block_ids(meta, kv_layer.shape[0])
    scales = None if kv_scales is None else _host_scales(kv_scales, kv_layer)
    starts = meta.query_start_loc.contiguous()
    queries = q[: sum(meta.query_lens_host[:seqs])].contiguous()
    out = torch.empty_like(queries)
    tables, seq_lens = meta.block_tables.contiguous(), meta.seq_lens.contiguous()
    args = (
        queries.data_ptr(),
        out.data_ptr(),
        kv_layer.data_ptr(),
        kv_layer.stride(0),
        kv_layer.stride(1),
        tables.data_ptr(),
        tables.stride(0),
        starts.data_ptr(),
        seq_lens.data_ptr(),
        seqs,
        heads,
        kv_heads,
        dim,
        kv_layer.shape[2],
        scale,
    )
    if scales is None:
        native.lib().baton_paged_attention_bf16(*args, torch.get_num_threads())
    else:
        native.lib().baton_paged_attention_fp8(*args, scales, torch.get_num_threads())
    return out
