# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Paged attention over the block-major cache, Triton: KV write, decode, prefill.

Semantics are `kernels.paged_attention` (the torch reference). Keys and values are read
through the block table one token row at a time (a row is one head's `head_dim` values,
contiguous), so pages of any size and any block stride work; nothing is ever gathered
into a contiguous copy.

Decode (one query per sequence) is split-KV "flash decoding": program (seq, kv head,
split) attends all `GQA` query heads of its KV head (padded to 16 rows for the tensor
cores) over its slice of the context. The split count is chosen per step so that the grid
fills the GPU; the splits merge by log-sum-exp in the last split program to finish (an
acq_rel counter, as in the INT4 split-K) or, past MERGE_IN_KERNEL_MAX splits, in a second
kernel. As a programmatic dependent launch (sm_90) it starts while the kernels before it
finish, prefetching its keys and values into L2 until it may read q. FP8 caches widen
to fp16 (one instruction per pair) and multiply in fp16.

In a decode-only step over a bf16/fp16 cache the decode kernel also does the layer's RoPE
and KV write (`KernelBackend.rope_attention`, `DecodeRope`): each program rotates its q
heads itself, and the split whose range ends with the new token rotates that token's k,
stores k and v in its slot, attends the cached rows before it and then the new row from
registers. H200, INT4 engine with an INT4 LM head: batch 1 2,376 -> 2,317 us a step,
batch 32 3,915 -> 3,858 us (a first version that stored the row and read it back after
a barrier: -7 us at batch 1, +139 at batch 32).

Prefill is flash attention over a ragged batch: program (query tile, head) streams key
tiles from position 0 (the cached prefix) up to its diagonal; only the tiles that cross
the diagonal are masked:

    keys   0 ......... P+m0 ...... P+m0+BLOCK_M      (P = cached prefix, m0 = tile's first row)
           [ unmasked tiles ][ masked tiles ]

Programs run longest tile first, every head of a tile before the next tile (causal work
per tile grows with m0; this order packs the grid's tail with short tiles), and each
tile's page numbers are fetched one key tile early so that the K/V copies run
`num_stages - 1` key tiles ahead of the MMAs.

On Hopper, prefill over a bf16/fp16 cache runs the warp-specialized Gluon kernel of
`kernels.paged_prefill_gluon` instead (same tiles, same arithmetic; 1.5x this one at 4k);
this kernel remains the path for FP8 caches, other GPUs and the interpreter.

FP8 caches hold fp8(value / scale) per (K|V, head); the K scale folds into the softmax
scale and the V scale into the output, so the tiles themselves are only widened.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
import triton.language as tl

from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import FP8_DTYPE, FP8_MAX
from kernels.rope_triton import check_rope_inputs, cos_sin, rotate_rows
from kernels.triton_runtime import (
    INTERPRET,
    check_device,
    mma,
    num_sms,
    pdl,
    pdl_options,
    pdl_trigger,
    pdl_wait,
    prefetch,
    tile_counters,
    to_fp8,
)

log = logging.getLogger(__name__)

_LOG2E = tl.constexpr(1.4426950408889634)
_FP8_MAX = tl.constexpr(FP8_MAX)


# --------------------------------------------------------------------------- KV write


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, scale_ptr,
    stride_k, stride_v, stride_block, stride_kv, stride_tok, page_size,
    HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = cache_ptr + (slot // page_size) * stride_block + (slot % page_size) * stride_tok
    cols = tl.arange(0, BLOCK)
    mask = cols < HD
    k = tl.load(k_ptr + t * stride_k + cols, mask=mask)
    v = tl.load(v_ptr + t * stride_v + cols, mask=mask)
    if FP8:
        heads = HD // D
        k_scale = tl.load(scale_ptr + cols // D, mask=mask, other=1.0)
        v_scale = tl.load(scale_ptr + heads + cols // D, mask=mask, other=1.0)
        k = to_fp8(tl.clamp(k.to(tl.float32) / k_scale, -_FP8_MAX, _FP8_MAX))
        v = to_fp8(tl.clamp(v.to(tl.float32) / v_scale, -_FP8_MAX, _FP8_MAX))
    tl.store(dst + cols, k, mask=mask)
    tl.store(dst + stride_kv + cols, v, mask=mask)


def _check_cache(kv_layer: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    assert kv_layer.dim() == 5 and kv_layer.shape[1] == 2, kv_layer.shape
    assert kv_layer.shape[3:] == (num_kv_heads, head_dim), (kv_layer.shape, num_kv_heads)
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == head_dim, kv_layer.stride()
    assert kv_layer.stride(2) == num_kv_heads * head_dim, "a token's heads must be contiguous"


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Store k, v [T, Hk, D] at their slots; an fp8 cache needs `kv_scales` [2, Hk]."""
    t, hk, d = k.shape
    assert v.shape == k.shape and v.dtype == k.dtype, (v.shape, k.shape)
    for x in (k, v):
        assert x.stride(2) == 1 and x.stride(1) == d, f"heads must be dense: {x.stride()}"
    _check_cache(kv_layer, hk, d)
    assert slot_mapping.shape == (t,) and slot_mapping.dtype in (torch.int32, torch.int64)
    fp8 = kv_layer.dtype == FP8_DTYPE
    if fp8:
        assert kv_scales is not None and kv_scales.shape == (2, hk), "fp8 cache needs kv_scales"
        assert kv_scales.dtype == torch.float32 and kv_scales.is_contiguous()
        check_device(k, v, kv_layer, slot_mapping, kv_scales)
    else:
        assert kv_layer.dtype == k.dtype, (kv_layer.dtype, k.dtype)
        check_device(k, v, kv_layer, slot_mapping)
    if t == 0:
        return
    _write_kv_kernel[(t,)](
        k, v, kv_layer, slot_mapping, kv_scales if fp8 else slot_mapping,
        k.stride(0), v.stride(0), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.shape[2],
        HD=hk * d, D=d, BLOCK=triton.next_power_of_2(hk * d), FP8=fp8, num_warps=4,
    )  # fmt: skip


# ------------------------------------------------------------------- shared tile math


@triton.jit
def _page_rows(pages, toks, kv_head, stride_block, stride_tok, PAGE: tl.constexpr, D: tl.constexpr):
    """Cache offsets of token rows `toks` (of one KV head) on their pages `pages`."""
    return pages.to(tl.int64) * stride_block + (toks % PAGE) * stride_tok + kv_head * D


@triton.jit
def _kv_rows(
    bt_row_ptr, toks, tmask, kv_head, stride_block, stride_tok, PAGE: tl.constexpr, D: tl.constexpr
):
    """Cache offsets of token rows `toks` (of one KV head) through a block-table row."""
    pages = tl.load(bt_row_ptr + toks // PAGE, mask=tmask, other=0)
    return _page_rows(pages, toks, kv_head, stride_block, stride_tok, PAGE, D)


@triton.jit
def _attend(
    q, acc, m_i, l_i, cache_ptr, rows, tmask, visible, qk_scale, stride_kv,
    D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over a key/value tile; m_i is in log2 units.

    Every tile a loop visits holds a key visible to every row that has seen none yet (the
    first tile of a row's range), so m_i is finite from the first step on.
    """
    d = tl.arange(0, D)
    if MASKED:
        k = tl.load(cache_ptr + rows[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
    else:
        k = tl.load(cache_ptr + rows[None, :] + d[:, None])
    s = mma(q, k.to(q.dtype), tl.zeros((q.shape[0], k.shape[1]), tl.float32), UPCAST)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(
            cache_ptr + stride_kv + rows[:, None] + d[None, :], mask=tmask[:, None], other=0.0
        )
    else:
        v = tl.load(cache_ptr + stride_kv + rows[:, None] + d[None, :])
    acc = mma(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attend_one(q, acc, m_i, l_i, k, v, qk_scale):
    """`_attend` over one key/value row k, v [D] held in registers (no MMA)."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1)
    m_new = tl.maximum(m_i, s * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new)
    l_i = l_i * alpha + p
    pv = p.to(q.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return acc * alpha[:, None] + pv, m_new, l_i


# ------------------------------------------------------------------------------ decode


@triton.jit
def _merge_splits(
    part_o_ptr, part_lse_ptr, rows, rmask, splits, S_P2: tl.constexpr, D: tl.constexpr
):
    """Merge the split partials of [H] query rows (`rows`: first partial of each row)."""
    s = tl.arange(0, S_P2)
    valid = rmask[:, None] & (s < splits)[None, :]
    lse = tl.load(part_lse_ptr + rows[:, None] + s[None, :], mask=valid, other=float("-inf"),
                  cache_modifier=".cg")  # fmt: skip
    w = tl.exp2(lse - tl.max(lse, axis=1)[:, None])  # split 0 is never empty: max finite
    w = w / tl.sum(w, axis=1)[:, None]
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + (rows[:, None, None] + s[None, :, None]) * D + d[None, None, :],
                mask=valid[:, :, None], other=0.0, cache_modifier=".cg")  # fmt: skip
    return tl.sum(o * w[:, :, None], axis=1)


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, scale_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    count_ptr, stride_qt, stride_ot, stride_bt, stride_block, stride_kv, stride_tok, sm_scale,
    k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, stride_kt, stride_vt, stride_cos,
    HK: tl.constexpr, GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, MERGE_HERE: tl.constexpr,
    S_P2: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    ROPE: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    # Lengths and block tables are the step's inputs, written before its first kernel.
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    if PDL:
        # While the kernels before (the QKV projection, RoPE) finish, pull this split's
        # keys and values into L2; only the newest row changes meanwhile, and L2 sees it.
        # (H100, batch-1 INT4 engine, INT4 LM head, same process: 381.9 / 383.9 tok/s
        # without, 388.1 / 391.7 with.)
        lines = (tl.arange(0, 2) * (D // 2))[None, :]
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            rows = _kv_rows(bt_row, toks, toks < end, kv_head, stride_block, stride_tok, PAGE, D)
            prefetch(cache_ptr + rows[:, None] + lines, 2)
            prefetch(cache_ptr + stride_kv + rows[:, None] + lines, 2)
    d = tl.arange(0, D)
    if ROPE:  # cos and sin, like the lengths, are the step's inputs
        c, s = cos_sin(cos_ptr, sin_ptr, b, stride_cos, q_ptr.dtype.element_ty, D)
    pdl_wait(PDL)

    h = tl.arange(0, BLOCK_H)
    hmask = h < GQA
    heads = kv_head * GQA + h
    if ROPE:
        # q, k and v are this token's unrotated projections: q and the new token's k are
        # rotated here. The split whose range ends with the new token (position
        # seq_len - 1) stores its k and v in their cache slot for later steps, attends the
        # cached rows before it, then that key and value from registers: nothing waits
        # for the store, and the loop over cached rows is the plain one.
        q = rotate_rows(q_ptr + b.to(tl.int64) * stride_qt, heads, hmask, c, s, D)
        head = kv_head + tl.arange(0, 1)
        cols = head[:, None] * D + d[None, :]
        k_new = rotate_rows(k_ptr + b.to(tl.int64) * stride_kt, head, head >= 0, c, s, D)
        v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vt + cols)
        if FP8:  # cached as `write_kv` caches them; attended as read back from the cache
            k_new = to_fp8(tl.clamp(k_new.to(tl.float32) / tl.load(scale_ptr + kv_head),
                                    -_FP8_MAX, _FP8_MAX))  # fmt: skip
            v_new = to_fp8(tl.clamp(v_new.to(tl.float32) / tl.load(scale_ptr + HK + kv_head),
                                    -_FP8_MAX, _FP8_MAX))  # fmt: skip
        owner = (start < end) & (end == seq_len)
        if owner:
            slot = tl.load(slot_ptr + b).to(tl.int64)
            row = cache_ptr + (slot // PAGE) * stride_block + (slot % PAGE) * stride_tok + cols
            tl.store(row, k_new)
            tl.store(row + stride_kv, v_new)
            end -= 1
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * D + d[None, :],
                    mask=hmask[:, None], other=0.0)  # fmt: skip
    qk_scale = sm_scale * _LOG2E
    if FP8:
        # fp8 widens to fp16 in one instruction per pair; the MMAs then run in fp16.
        q = q.to(tl.float16)
        qk_scale *= tl.load(scale_ptr + kv_head)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        rows = _kv_rows(bt_row, toks, tmask, kv_head, stride_block, stride_tok, PAGE, D)
        acc, m_i, l_i = _attend(
            q, acc, m_i, l_i, cache_ptr, rows, tmask, tmask[None, :], qk_scale, stride_kv,
            D, True, UPCAST,
        )  # fmt: skip
    if ROPE:  # noqa: SIM102 (a constexpr test around a runtime one)
        if owner:  # the new token: one more online-softmax step, from registers
            acc, m_i, l_i = _attend_one(
                q, acc, m_i, l_i, tl.reshape(k_new, (D,)), tl.reshape(v_new, (D,)), qk_scale
            )
    if FP8:
        acc *= tl.load(scale_ptr + HK + kv_head)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_row = out_ptr + b.to(tl.int64) * stride_ot
    if not SPLIT:
        tl.store(out_row + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=hmask[:, None])  # fmt: skip
    else:
        slot = (b * (HK * GQA) + heads).to(tl.int64) * splits + split
        tl.store(part_o_ptr + slot[:, None] * D + d[None, :], o, mask=hmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + slot, lse, mask=hmask)
        if MERGE_HERE:
            # The last split of this (sequence, KV head) to finish merges all of them.
            tl.debug_barrier()
            group = b * HK + kv_head
            if tl.atomic_add(count_ptr + group, 1, sem="acq_rel") == splits - 1:
                g = tl.arange(0, triton.next_power_of_2(GQA))
                rows = (b * (HK * GQA) + kv_head * GQA + g).to(tl.int64) * splits
                merged = _merge_splits(part_o_ptr, part_lse_ptr, rows, g < GQA, splits, S_P2, D)
                tl.store(out_row + (kv_head * GQA + g)[:, None] * D + d[None, :],
                         merged.to(out_ptr.dtype.element_ty), mask=(g < GQA)[:, None])  # fmt: skip
                tl.atomic_xchg(count_ptr + group, 0)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ot, HQ, splits, S_P2: tl.constexpr, D: tl.constexpr
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    one = tl.arange(0, 1)
    rows = (b * HQ + h + one).to(tl.int64) * splits
    o = _merge_splits(part_o_ptr, part_lse_ptr, rows, one < 1, splits, S_P2, D)
    d = tl.arange(0, D)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + (h + one)[:, None] * D + d[None, :],
             o.to(out_ptr.dtype.element_ty))  # fmt: skip


# ----------------------------------------------------------------------------- prefill


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, tiles_ptr, q_start_ptr, seq_lens_ptr, scale_ptr, out_ptr,
    stride_qt, stride_ot, stride_bt, stride_block, stride_kv, stride_tok, sm_scale,
    HQ: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Heads vary fastest, so every head's longest tile starts first (see the docstring).
    tile = tl.program_id(0) // HQ
    head = tl.program_id(0) % HQ
    kv_head = head // GQA
    seq = tl.load(tiles_ptr + 2 * tile)
    m0 = tl.load(tiles_ptr + 2 * tile + 1)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    r = m0 + tl.arange(0, BLOCK_M)
    rmask = r < q_len
    d = tl.arange(0, D)
    q_rows = (q_start + r).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * D + d[None, :],
                mask=rmask[:, None], other=0.0)  # fmt: skip
    qk_scale = sm_scale * _LOG2E
    if FP8:
        q = q.to(tl.float16)
        qk_scale *= tl.load(scale_ptr + kv_head)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    pos = prefix + r  # query positions; row r sees keys <= pos[r]

    # Keys below prefix + m0 are visible to every row of the tile.
    full = ((prefix + m0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(prefix + m0 + BLOCK_M, seq_len)
    # Page numbers are loaded one key tile ahead: a tile's K/V copies then depend on no
    # load of their own iteration, and the pipeliner issues them num_stages - 1 tiles ahead
    # of the MMAs (with an in-iteration block-table load it kept them one tile ahead).
    toks = tl.arange(0, BLOCK_N)
    pages = tl.load(bt_row + toks // PAGE, mask=toks < full, other=0)
    for n0 in range(0, full, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        rows = _page_rows(pages, toks, kv_head, stride_block, stride_tok, PAGE, D)
        ahead = toks + BLOCK_N
        pages = tl.load(bt_row + ahead // PAGE, mask=ahead < full, other=0)
        acc, m_i, l_i = _attend(
            q, acc, m_i, l_i, cache_ptr, rows, None, None, qk_scale, stride_kv,
            D, False, UPCAST,
        )  # fmt: skip
    toks = full + tl.arange(0, BLOCK_N)
    pages = tl.load(bt_row + toks // PAGE, mask=toks < seq_len, other=0)
    for n0 in range(full, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tmask = toks < seq_len
        rows = _page_rows(pages, toks, kv_head, stride_block, stride_tok, PAGE, D)
        ahead = toks + BLOCK_N
        pages = tl.load(bt_row + ahead // PAGE, mask=ahead < seq_len, other=0)
        visible = (toks[None, :] <= pos[:, None]) & tmask[None, :]
        acc, m_i, l_i = _attend(
            q, acc, m_i, l_i, cache_ptr, rows, tmask, visible, qk_scale, stride_kv,
            D, True, UPCAST,
        )  # fmt: skip
    if FP8:
        acc *= tl.load(scale_ptr + HQ // GQA + kv_head)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out_ptr + q_rows[:, None] * stride_ot + head * D + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


# -------------------------------------------------------------------- plan and launch


@dataclass(frozen=True)
class TritonAttentionPlan:
    """Per-step launch state shared by every layer (built on the host, no device sync)."""

    num_decodes: int
    decode_max_len: int
    prefill_tiles: torch.Tensor | None  # [num_tiles, 2] int32: (sequence, first query row)
    decode_block_n: int
    block_m: int  # prefill tiles, num_warps and num_stages (tuned on an H100)
    block_n: int
    prefill_warps: int
    prefill_stages: int
    prefill_gluon: bool = True
    """Run prefill through `kernels.paged_prefill_gluon` where it `supports` the call (the
    bench turns it off to time this module's kernel beside it)."""


MERGE_IN_KERNEL_MAX = 16
"""Up to this many splits the last split merges them; beyond, a second kernel does."""


def _decode_splits(batch: int, kv_heads: int, max_len: int, sms: int, block_n: int) -> int:
    """Splits so that the (sequence, head, split) programs number about four an SM.

    The power of two at or below 4 * SMs / (batch x KV heads), at most one key tile a
    split, and at most 64. Past MERGE_IN_KERNEL_MAX splits (which then cost a second
    kernel) each split gets at least two key tiles, and never fewer than
    MERGE_IN_KERNEL_MAX splits where that many fit. A sweep of every split count in
    {1, 2, 4, ..., 64} at batch 1-64 x context 1k-16k (H200, 32 query / 8 KV heads,
    bench/RESULTS.md "Kernels", session 23) found these best or within 0.03x of the best
    at every point; the rule before it (about two programs an SM, any count) ran up to
    1.4x slower than it at batch 2-8 (batch 4, 2k: 9 splits 1.60x SDPA, 16 splits 1.15x).
    """
    want = max(1, 4 * sms // max(1, batch * kv_heads))
    splits = 1 << (want.bit_length() - 1)
    tiles = max(1, max_len // block_n)
    if splits > MERGE_IN_KERNEL_MAX:
        splits = max(min(MERGE_IN_KERNEL_MAX, tiles), min(splits, tiles // 2))
    return max(1, min(splits, tiles, 64))


def plan_attention(meta: AttentionMetadata) -> TritonAttentionPlan:
    decode_n, block_m, block_n, warps, stages = (
        (16, 16, 16, 4, 1) if INTERPRET else (64, 128, 128, 8, 3)
    )
    device = meta.block_tables.device
    nd = meta.num_decodes
    tiles = []
    for b in range(nd, meta.batch_size):
        prefix = meta.seq_lens_host[b] - meta.query_lens_host[b]
        tiles += [(prefix + m0, b, m0) for m0 in range(0, meta.query_lens_host[b], block_m)]
    tiles.sort(reverse=True)  # longest first (the kernel runs all heads of a tile together)
    prefill_tiles = None
    if tiles:
        host = torch.tensor([(b, m0) for _, b, m0 in tiles], dtype=torch.int32)
        prefill_tiles = host.to(device, non_blocking=True)
    max_len = max(meta.seq_lens_host[:nd]) if nd else 0
    return TritonAttentionPlan(
        nd, max_len, prefill_tiles, decode_n, block_m, block_n, warps, stages
    )


@dataclass(frozen=True)
class DecodeRope:
    """What a decode-only step's attention needs to apply RoPE and write the new K/V itself
    (`KernelBackend.rope_attention`): the unrotated k, v [T, Hk, D] and cos/sin [T, D/2]."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def can_fuse_rope(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether `paged_attention(..., rope=...)` takes this step: decodes only (one new token
    each, the row its split kernel knows), a cache in q's dtype or fp8."""
    plan = meta.plan
    assert isinstance(plan, TritonAttentionPlan), "call plan_attention first"
    decodes_only = plan.prefill_tiles is None and q.shape[0] == plan.num_decodes
    return decodes_only and kv_layer.dtype in (q.dtype, FP8_DTYPE)


def _check_rope(q: torch.Tensor, rope: DecodeRope, meta: AttentionMetadata) -> None:
    check_rope_inputs(q, rope.k, rope.v, rope.cos, rope.sin)
    assert meta.slot_mapping.shape == (q.shape[0],) and meta.slot_mapping.is_contiguous()
    check_device(q, rope.k, rope.v, rope.cos, rope.sin, meta.slot_mapping)


@functools.cache
def _gluon_prefill() -> ModuleType | None:
    """`kernels.paged_prefill_gluon`, or None where this Triton has no Gluon to build it."""
    try:
        from kernels import paged_prefill_gluon
    except ImportError as exc:  # a Triton release before Gluon
        log.warning("prefill attention runs the Triton kernel: no Gluon here (%s)", exc)
        return None
    return paged_prefill_gluon


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: torch.Tensor | None = None,
    rope: DecodeRope | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]; see `KernelBackend.paged_attention`. With `rope` (where
    `can_fuse_rope`), q is unrotated and the decode kernel applies RoPE to q and to the
    step's k, and stores k and v in their slots (`meta.slot_mapping`) before reading them:
    `KernelBackend.rope_attention` in one launch."""
    plan = meta.plan
    assert isinstance(plan, TritonAttentionPlan), "call plan_attention before paged_attention"
    _, hq, d = q.shape
    hk = kv_layer.shape[3]
    _check_cache(kv_layer, hk, d)
    assert q.stride(2) == 1 and q.stride(1) == d, q.stride()
    assert hq % hk == 0 and d & (d - 1) == 0, (hq, hk, d)
    assert q.dtype in (torch.bfloat16, torch.float16), q.dtype
    fp8 = kv_layer.dtype == FP8_DTYPE
    if fp8:
        assert kv_scales is not None and kv_scales.shape == (2, hk) and kv_scales.is_contiguous()
        assert kv_scales.dtype == torch.float32
    else:
        assert kv_layer.dtype == q.dtype, (kv_layer.dtype, q.dtype)
    bt, seq_lens = meta.block_tables, meta.seq_lens
    assert bt.dtype == seq_lens.dtype == meta.query_start_loc.dtype == torch.int32
    assert bt.stride(1) == 1 and seq_lens.is_contiguous() and meta.query_start_loc.is_contiguous()
    check_device(q, kv_layer, bt, seq_lens)
    if rope is not None:
        _check_rope(q, rope, meta)
        assert can_fuse_rope(q, kv_layer, meta), "RoPE fuses into decode-only steps"
    out = torch.empty((q.shape[0], hq, d), dtype=q.dtype, device=q.device)
    scales = kv_scales if fp8 else seq_lens  # unused placeholder pointer when not fp8
    strides = (bt.stride(0), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2))
    gqa = hq // hk
    nd = plan.num_decodes
    if nd:
        # An fp8 tile of as many keys is half the bytes for the same softmax and MMA
        # work: twice the keys a tile keep the bytes a step, in two stages (H200 sweep of
        # keys a tile x warps x stages, bench/RESULTS.md, session 27).
        block_n = plan.decode_block_n * (2 if fp8 and not INTERPRET else 1)
        stages = 1 if INTERPRET else 2 if fp8 else 3
        splits = _decode_splits(nd, hk, plan.decode_max_len, num_sms(q.device), block_n)
        merge_here = splits <= MERGE_IN_KERNEL_MAX
        part_o = part_lse = counters = out
        if splits > 1:
            part_o = torch.empty((nd, hq, splits, d), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((nd, hq, splits), dtype=torch.float32, device=q.device)
            counters = tile_counters(q.device, nd * hk)
        s_p2 = triton.next_power_of_2(splits)
        k, v, cos, sin = (q, q, seq_lens, seq_lens) if rope is None else (
            rope.k, rope.v, rope.cos, rope.sin)  # fmt: skip
        _decode_kernel[(nd, hk, splits)](
            q, kv_layer, bt, seq_lens, scales, out, part_o, part_lse, counters,
            q.stride(0), out.stride(0), *strides, scale,
            k, v, cos, sin, meta.slot_mapping, k.stride(0), v.stride(0), cos.stride(0),
            HK=hk, GQA=gqa, BLOCK_H=max(16, triton.next_power_of_2(gqa)), D=d,
            PAGE=meta.block_size, BLOCK_N=block_n, SPLIT=splits > 1,
            MERGE_HERE=merge_here, S_P2=s_p2, FP8=fp8, UPCAST=INTERPRET,
            num_warps=4, num_stages=stages, PDL=pdl(q.device, nd),
            ROPE=rope is not None, **pdl_options(q.device, nd),
        )  # fmt: skip
        if not merge_here:
            _decode_merge_kernel[(nd, hq)](
                part_o, part_lse, out, out.stride(0), hq, splits, S_P2=s_p2, D=d, num_warps=4
            )
    if plan.prefill_tiles is None:
        return out
    gluon = _gluon_prefill() if plan.prefill_gluon and not fp8 and q.is_cuda else None
    if gluon is not None and gluon.supports(q, kv_layer, plan.block_m):
        gluon.prefill_attention(
            q, kv_layer, bt, plan.prefill_tiles, meta.query_start_loc, seq_lens, scale, out
        )
    else:
        _prefill_kernel[(plan.prefill_tiles.shape[0] * hq,)](
            q, kv_layer, bt, plan.prefill_tiles, meta.query_start_loc, seq_lens, scales, out,
            q.stride(0), out.stride(0), *strides, scale,
            HQ=hq, GQA=gqa, D=d, PAGE=meta.block_size, BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n, FP8=fp8, UPCAST=INTERPRET,
            num_warps=plan.prefill_warps, num_stages=plan.prefill_stages,
        )  # fmt: skip
    return out
