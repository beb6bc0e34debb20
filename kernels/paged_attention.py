"""Paged attention, torch path: the reference for the Triton kernels and the CPU fast path.

Each sequence's keys and values are gathered block by block through its block table
(never by copying the whole cache), cut to its exact length, and attended with
`scaled_dot_product_attention`. One call per sequence: a batched call over padded keys
rounds differently from the unpadded one, and per-sequence calls keep every request's
numbers independent of what it is batched with. New queries see the cached prefix:

    query rows  q0..q(Q-1) at positions P..P+Q-1      (P = seq_len - Q cached tokens)
    key j is visible to q_r  iff  j <= P + r
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionMetadata


@dataclass
class _SequencePlan:
    row_start: int
    query_len: int
    seq_len: int
    blocks: torch.Tensor  # [ceil(seq_len / block_size)] block ids
    mask: torch.Tensor | None  # [Q, seq_len] bool when a prefill chunk follows cached tokens


@dataclass
class TorchAttentionPlan:
    sequences: list[_SequencePlan]
    block_ids: tuple[int, int] | None  # the lowest and highest block id the step reads


def plan_attention_torch(meta: AttentionMetadata) -> TorchAttentionPlan:
    bs = meta.block_size
    device = meta.block_tables.device
    starts = meta.query_start_loc.tolist()
    plans = []
    for b in range(meta.batch_size):
        qlen, slen = meta.query_lens_host[b], meta.seq_lens_host[b]
        if meta.row_invariant and qlen > 1:
            # Row r as the decode step at its position would attend: the same call on the
            # same keys, so the result does not depend on the chunk it came in.
            for r in range(qlen):
                seen = slen - qlen + r + 1
                blocks = meta.block_tables[b, : -(-seen // bs)].long()
                plans.append(_SequencePlan(starts[b] + r, 1, seen, blocks, None))
            continue
        mask = None
        if 1 < qlen < slen:
            q_pos = torch.arange(slen - qlen, slen, device=device)
            mask = torch.arange(slen, device=device)[None, :] <= q_pos[:, None]
        blocks = meta.block_tables[b, : -(-slen // bs)].long()
        plans.append(_SequencePlan(starts[b], qlen, slen, blocks, mask))
    width = -(-max(meta.seq_lens_host, default=0) // bs)
    if width > meta.block_tables.shape[1]:
        raise IndexError(
            f"a sequence of {max(meta.seq_lens_host)} tokens needs {width} blocks of "
            f"{bs}; block_tables {tuple(meta.block_tables.shape)} holds "
            f"{meta.block_tables.shape[1]} a row"
        )
    # Once per step, for the native kernels' bounds check (`paged_attention_cpu`).
    ids = torch.cat([p.blocks for p in plans]) if plans else None
    block_ids = (int(ids.min()), int(ids.max())) if ids is not None and ids.numel() else None
    return TorchAttentionPlan(plans, block_ids)


def paged_attention_torch(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    plan = meta.plan
    assert isinstance(plan, TorchAttentionPlan), "call plan_attention before paged_attention"
    out = torch.empty_like(q)
    keys, values = kv_layer[:, 0], kv_layer[:, 1]
    for p in plan.sequences:
        # 4-D [1, H, L, D] operands: SDPA's CPU kernels round 3-D inputs differently, and
        # this is the call Hugging Face makes, so fp32 results match it bit for bit.
        k = keys[p.blocks].flatten(0, 1)[: p.seq_len].transpose(0, 1)[None]
        v = values[p.blocks].flatten(0, 1)[: p.seq_len].transpose(0, 1)[None]
        rows = slice(p.row_start, p.row_start + p.query_len)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None],
            k,
            v,
            attn_mask=p.mask,
            # A lone query sees every key; a whole prompt is plain causal attention.
            is_causal=p.mask is None and p.query_len > 1,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def write_kv_torch(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = kv_layer.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_layer[blocks, 0, offsets] = k.to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = v.to(kv_layer.dtype)
