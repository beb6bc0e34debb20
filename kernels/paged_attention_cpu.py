"""Paged attention on the CPU (decode rows and prefill chunks), and KV writes: launchers of
`kernels/cpu/paged_attention.cpp` and `kernels/cpu/kv_cache.cpp` (bf16 cache)."""

from __future__ import annotations

import torch

from kernels import native
from kernels.attention_metadata import AttentionMetadata


def write_kv_cpu(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as `kernels.paged_attention.write_kv_torch`, for bf16 rows and cache."""
    tokens, kv_heads, dim = k.shape
    assert v.shape == k.shape and kv_layer.shape[2:] == (kv_layer.shape[2], kv_heads, dim)
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == dim  # rows may be strided, heads not
    assert kv_layer.stride()[2:] == (kv_heads * dim, dim, 1)
    slots = slot_mapping.to(torch.int64).contiguous()
    native.lib().baton_write_kv_bf16(
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        kv_layer.data_ptr(),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.shape[2],
        slots.data_ptr(),
        tokens,
        kv_heads * dim,
    )


def paged_attention_cpu(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    seqs: int | None = None,
) -> torch.Tensor:
    """Attention of every query row of the step's first `seqs` sequences (all of them by
    default): [rows, num_heads, head_dim]. The contract of `paged_attention_torch` for
    those rows, decode rows and prefill chunks alike. Every row comes out bit for bit as
    the decode step at its position would compute it, so `meta.row_invariant` holds."""
    seqs = meta.batch_size if seqs is None else seqs
    _, heads, dim = q.shape
    kv_heads = kv_layer.shape[3]
    assert heads % kv_heads == 0 and dim % 8 == 0
    assert kv_layer.stride()[2:] == (kv_heads * dim, dim, 1)
    assert meta.block_tables.dtype == meta.seq_lens.dtype == meta.query_start_loc.dtype
    assert meta.seq_lens.dtype == torch.int32
    starts = meta.query_start_loc.contiguous()
    queries = q[: sum(meta.query_lens_host[:seqs])].contiguous()
    out = torch.empty_like(queries)
    tables, seq_lens = meta.block_tables.contiguous(), meta.seq_lens.contiguous()
    native.lib().baton_paged_attention_bf16(
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
        torch.get_num_threads(),
    )
    return out
