"""Paged attention, torch path: the reference for the Triton kernels and the CPU fast path.

Keys and values are gathered block by block through the block table (never by copying the
whole cache), then attended with `scaled_dot_product_attention`. Decodes are batched in one
call with a padding mask; each prefill chunk is one call with a causal mask shifted by its
cached prefix:

    query rows  q0..q(Q-1) at positions P..P+Q-1      (P = seq_len - Q cached tokens)
    key j is visible to q_r  iff  j <= P + r
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionMetadata


@dataclass
class _PrefillPlan:
    row_start: int
    query_len: int
    seq_len: int
    blocks: torch.Tensor  # [num_blocks] block ids covering seq_len
    mask: torch.Tensor | None  # [Q, seq_len] bool, None when there is no cached prefix


@dataclass
class TorchAttentionPlan:
    decode_blocks: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[_PrefillPlan]


def plan_attention_torch(meta: AttentionMetadata) -> TorchAttentionPlan:
    bs = meta.block_size
    device = meta.block_tables.device
    decode_blocks = decode_mask = None
    if meta.num_decodes:
        lens = meta.seq_lens_host[: meta.num_decodes]
        nblk = -(-max(lens) // bs)
        decode_blocks = meta.block_tables[: meta.num_decodes, :nblk].long()
        key_pos = torch.arange(nblk * bs, device=device)
        decode_mask = (key_pos[None, :] < meta.seq_lens[: meta.num_decodes, None])[:, None, None]
    prefills = []
    starts = meta.query_start_loc.tolist()
    for b in range(meta.num_decodes, meta.batch_size):
        qlen, slen = meta.query_lens_host[b], meta.seq_lens_host[b]
        mask = None
        if slen != qlen:
            q_pos = torch.arange(slen - qlen, slen, device=device)
            mask = torch.arange(slen, device=device)[None, :] <= q_pos[:, None]
        blocks = meta.block_tables[b, : -(-slen // bs)].long()
        prefills.append(_PrefillPlan(starts[b], qlen, slen, blocks, mask))
    return TorchAttentionPlan(decode_blocks, decode_mask, prefills)


def paged_attention_torch(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    plan = meta.plan
    assert isinstance(plan, TorchAttentionPlan), "call plan_attention before paged_attention"
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if plan.decode_blocks is not None:
        kv = kv_layer[plan.decode_blocks]  # [B, nblk, 2, bs, Hk, D]
        k = kv[:, :, 0].flatten(1, 2).transpose(1, 2)  # [B, Hk, L, D]
        v = kv[:, :, 1].flatten(1, 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), k, v, attn_mask=plan.decode_mask, scale=scale, enable_gqa=True
        )
        out[:nd] = o.squeeze(2)
    for p in plan.prefills:
        kv = kv_layer[p.blocks]  # [nblk, 2, bs, Hk, D]
        k = kv[:, 0].flatten(0, 1)[: p.seq_len].transpose(0, 1)  # [Hk, L, D]
        v = kv[:, 1].flatten(0, 1)[: p.seq_len].transpose(0, 1)
        rows = slice(p.row_start, p.row_start + p.query_len)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k, v, attn_mask=p.mask, is_causal=p.mask is None,
            scale=scale, enable_gqa=True,
        )
        out[rows] = o.transpose(0, 1)
    return out


def write_kv_torch(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = kv_layer.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_layer[blocks, 0, offsets] = k.to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v.to(kv_layer.dtype)
