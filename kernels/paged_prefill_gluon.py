# mypy: disable-error-code="no-untyped-def"
# (@gluon.jit functions take and return Gluon values, which have no Python annotations)
"""Paged prefill attention for Hopper (sm_90), warp-specialized, in Gluon.

The same attention as `kernels.paged_attention_triton`'s prefill (causal flash attention
over a ragged batch, a cached prefix read through the block table, GQA), with the same
tile table (`TritonAttentionPlan.prefill_tiles`, longest first, heads fastest) and the
same arithmetic: its output equals that kernel's bit for bit on the tests' batches.

What differs is the schedule, FlashAttention-3's, which Triton's own pipeliner does not
produce on Hopper (`tl.range(warp_specialize=True)` leaves the SASS unchanged there):

- a **producer** warp issues every copy: the query tile once, then for each key tile one
  TMA copy per page of K and of V ([PAGE, D] boxes of the cache seen as a 2-D tensor of
  token rows) into a ring of STAGES shared-memory slots, completing on an mbarrier;
- two **consumer** warpgroups of 64 query rows each, each with its own barriers, so one's
  softmax runs while the other's MMAs do;
- inside a consumer, the softmax of key tile j + 1 runs while P_j V_j multiplies: S_{j+1}
  and P_j V_j are issued back to back, the wait for S_{j+1} leaves P_j V_j in flight.

The last key tile of a program can reach past the sequence (the pages' tail slots and,
through masked block-table reads, page 0): those keys are masked out of S, but a NaN in
their V rows would still poison P V (0 x NaN). The producer therefore lands that tile on
a barrier of its own, zeroes the V rows past the sequence, fences, and only then marks
the slot ready.

H200, 32 query / 8 KV heads, D 128, pages of 16, bf16, causal 4k prompt: 244 us, 564
TFLOP/s, against 373 us for the Triton kernel and 534 TFLOP/s for SDPA (flash, contiguous
KV) in the same run. Each of the three parts above paid: one 8-warp consumer group 308 us,
two consumers 267, the in-consumer overlap with 3 slots 242 (with 2 slots, 308: K_{j+1}
and V_j hold both and the producer cannot run ahead). bench/RESULTS.md, "Kernels",
session 23.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kernels.triton_runtime import INTERPRET

log = logging.getLogger(__name__)

TRITON_RELEASES = ("3.6.",)
"""Triton releases this kernel was compiled and tested with. Gluon is experimental and its
API moves between releases, so on any other `supports` answers False and prefill keeps
the Triton kernel (with one warning)."""

BLOCK_M = 128
"""Query rows a program attends (two consumers of 64); the plan's tile table must use it."""
BLOCK_N = 128
STAGES = 3
_CONSUMER_WARPS = gl.constexpr(4)
"""Warps of each consumer partition and of the launch (one warpgroup)."""


@gluon.jit
def _load_kv_tile(
    desc_kv, bt_ptr, bar, k_buf, v_buf, bt_row, n_pages, kv_col, j, blk_rows, kv_rows
):
    """One key tile's K and V pages into a slot, completing on `bar`."""
    PAGE: gl.constexpr = desc_kv.block_type.shape[0]
    PAGES: gl.constexpr = k_buf.shape[0] // PAGE
    mbarrier.expect(bar, 2 * PAGES * desc_kv.block_type.nbytes)
    for i in gl.static_range(PAGES):
        idx = j * PAGES + i
        row = gl.load(bt_ptr + bt_row + idx, mask=idx < n_pages, other=0) * blk_rows
        tma.async_copy_global_to_shared(desc_kv, [row, kv_col], bar, k_buf.slice(i * PAGE, PAGE))
        tma.async_copy_global_to_shared(
            desc_kv, [row + kv_rows, kv_col], bar, v_buf.slice(i * PAGE, PAGE)
        )


@gluon.jit
def _producer(
    desc_q, desc_kv, bt_ptr, q_smem, k_bufs, v_bufs, q_bar, tail_bar, kv_ready, kv_empty,
    bt_row, n_pages, q_row, q_col, kv_col, n_tiles, seq_len, blk_rows, kv_rows,
):  # fmt: skip
    STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])

    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [q_row, q_col], q_bar, q_smem)
    for j in range(n_tiles):
        s = j % STAGES
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        k_buf = k_bufs.index(s)
        v_buf = v_bufs.index(s)
        if (j + 1) * BLOCK_N <= seq_len:
            _load_kv_tile(desc_kv, bt_ptr, kv_ready.index(s), k_buf, v_buf, bt_row, n_pages,
                          kv_col, j, blk_rows, kv_rows)  # fmt: skip
        else:  # a program's last tile, past the sequence's end: zero V there first
            _load_kv_tile(desc_kv, bt_ptr, tail_bar, k_buf, v_buf, bt_row, n_pages, kv_col, j,
                          blk_rows, kv_rows)  # fmt: skip
            mbarrier.wait(tail_bar, 0)
            for i in gl.static_range(BLOCK_N // 8):  # 8 rows: one swizzle atom
                first = j * BLOCK_N + i * 8
                if first + 8 > seq_len:
                    rows_v = v_buf.slice(i * 8, 8)
                    r = first + gl.arange(0, 8, layout=gl.SliceLayout(1, rows_layout))
                    v = rows_v.load(rows_layout)
                    rows_v.store(gl.where((r < seq_len)[:, None], v, gl.zeros_like(v)))
            fence_async_shared()
            mbarrier.arrive(kv_ready.index(s), count=1)


@gluon.jit
def _softmax_step(
    qk, m_i, l_i, j, n_full, pos, seq_len, qk_scale, p_layout: gl.constexpr, dtype: gl.constexpr
):
    """One online-softmax step (m_i in log2 units) -> (P as the PV MMA's A operand, m, l, alpha)."""
    BLOCK_N: gl.constexpr = qk.shape[1]
    if j >= n_full:  # the tiles that cross the diagonal or the sequence's end
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
        toks = j * BLOCK_N + cols
        visible = (toks[None, :] <= pos[:, None]) & (toks < seq_len)[None, :]
        qk = gl.where(visible, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op, m_new, l_i, alpha


@gluon.jit
def _consumer(
    q_smem, k_bufs, v_bufs, q_bar, kv_ready, kv_empty, out_ptr, stride_ot,
    out_row, out_col, q_len, m0, prefix, seq_len, n_tiles, n_full, qk_scale,
):  # fmt: skip
    ROWS: gl.constexpr = q_smem.shape[0]
    D: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    STAGES: gl.constexpr = k_bufs.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    pos = prefix + m0 + gl.arange(0, ROWS, layout=row_s)  # row r sees keys <= pos[r]

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_ready.index(0), 0)
    k_0 = k_bufs.index(0).permute((1, 0))
    qk = warpgroup_mma(q_smem, k_0, zero_s, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    p_op, m_i, l_i, alpha = _softmax_step(
        qk, m_i, l_i, 0, n_full, pos, seq_len, qk_scale, p_layout, q_smem.dtype
    )
    for j in range(n_tiles - 1):
        s = j % STAGES
        s1 = (j + 1) % STAGES
        mbarrier.wait(kv_ready.index(s1), ((j + 1) // STAGES) & 1)
        qk = warpgroup_mma(
            q_smem, k_bufs.index(s1).permute((1, 0)), zero_s, use_acc=False, is_async=True
        )
        acc = warpgroup_mma(p_op, v_bufs.index(s), acc, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # P_j V_j still running
        p_next, m_i, l_i, alpha = _softmax_step(
            qk, m_i, l_i, j + 1, n_full, pos, seq_len, qk_scale, p_layout, q_smem.dtype
        )
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        mbarrier.arrive(kv_empty.index(s), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = p_next
    last = (n_tiles - 1) % STAGES
    acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(kv_empty.index(last), count=1)

    l_o = gl.convert_layout(l_i, row_o)
    o = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    r = gl.arange(0, ROWS, layout=row_o)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    dst = out_ptr + (out_row + r).to(gl.int64)[:, None] * stride_ot + out_col + d[None, :]
    gl.store(dst, o.to(out_ptr.dtype.element_ty), mask=((m0 + r) < q_len)[:, None])


@gluon.jit
def _prefill_ws_kernel(
    desc_q, desc_kv, bt_ptr, tiles_ptr, q_start_ptr, seq_lens_ptr, out_ptr,
    stride_ot, stride_bt, blk_rows, kv_rows, sm_scale,
    HQ: gl.constexpr, GQA: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    # Heads vary fastest, so every head's longest tile starts first (as in the Triton kernel).
    tile = gl.program_id(0) // HQ
    head = gl.program_id(0) % HQ
    seq = gl.load(tiles_ptr + 2 * tile)
    m0 = gl.load(tiles_ptr + 2 * tile + 1)
    q_start = gl.load(q_start_ptr + seq)
    q_len = gl.load(q_start_ptr + seq + 1) - q_start
    seq_len = gl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    PAGE: gl.constexpr = desc_kv.block_type.shape[0]
    D: gl.constexpr = desc_kv.block_type.shape[1]
    # Keys below `full` are visible to every row of the tile; the tiles from there to `end`
    # are masked.
    full = ((prefix + m0) // BLOCK_N) * BLOCK_N
    end = gl.minimum(prefix + m0 + BLOCK_M, seq_len)
    n_tiles = (end + BLOCK_N - 1) // BLOCK_N
    n_pages = (seq_len + PAGE - 1) // PAGE

    layout: gl.constexpr = desc_q.layout
    dtype: gl.constexpr = desc_q.dtype
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    tail_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(tail_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot

    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    HALF: gl.constexpr = BLOCK_M // 2
    n_full = full // BLOCK_N
    q_row = q_start + m0
    first_half = (q_smem.slice(0, HALF), k_bufs, v_bufs, q_bar, kv_ready, kv_empty, out_ptr,
                  stride_ot, q_row, head * D, q_len, m0, prefix, seq_len, n_tiles, n_full,
                  qk_scale)  # fmt: skip
    second_half = (q_smem.slice(HALF, HALF), k_bufs, v_bufs, q_bar, kv_ready, kv_empty, out_ptr,
                   stride_ot, q_row + HALF, head * D, q_len, m0 + HALF, prefix, seq_len, n_tiles,
                   n_full, qk_scale)  # fmt: skip
    loads = (desc_q, desc_kv, bt_ptr, q_smem, k_bufs, v_bufs, q_bar, tail_bar, kv_ready, kv_empty,
             seq * stride_bt, n_pages, q_row, head * D, (head // GQA) * D, n_tiles, seq_len,
             blk_rows, kv_rows)  # fmt: skip
    gl.warp_specialize(
        [(_consumer, first_half), (_consumer, second_half), (_producer, loads)],
        [_CONSUMER_WARPS, 1],
        [240, 56],  # registers: the consumers' S, P and O tiles; the producer's zeroing
    )


@functools.cache
def tested_triton(version: str) -> bool:
    """Whether `version` is one of TRITON_RELEASES; warns once when it is not."""
    if version.startswith(TRITON_RELEASES):
        return True
    log.warning(
        "Triton %s is not a release the Gluon prefill attention was tested with (%s): "
        "prefill attention runs the Triton kernel (about 1.5x slower on Hopper)",
        version,
        ", ".join(r + "x" for r in TRITON_RELEASES),
    )
    return False


def supports(q: torch.Tensor, kv_layer: torch.Tensor, block_m: int) -> bool:
    """Whether this kernel runs the prefill of `paged_attention(q, kv_layer, ...)` here:
    compiled on sm_90 (not the interpreter) by a tested Triton release, a bf16/fp16 cache,
    head_dim 64 or 128, pages of 8 to 128 tokens that tile BLOCK_N, the plan's tiles of
    BLOCK_M rows, and the strides TMA takes (16-byte aligned, one row of every KV head
    contiguous)."""
    if INTERPRET or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if not tested_triton(triton.__version__):
        return False
    _, _, page, hk, d = kv_layer.shape
    stok = kv_layer.stride(2)
    return (
        block_m == BLOCK_M
        and kv_layer.dtype == q.dtype
        and q.dtype in (torch.bfloat16, torch.float16)
        and d in (64, 128)
        and page in (8, 16, 32, 64, 128)
        and kv_layer.stride(4) == 1
        and kv_layer.stride(3) == d
        and stok == hk * d
        and kv_layer.stride(0) % stok == 0
        and kv_layer.stride(1) % stok == 0
        and q.stride(0) * q.element_size() % 16 == 0
        and q.data_ptr() % 16 == 0
        and kv_layer.data_ptr() % 16 == 0
        and kv_layer.shape[0] * kv_layer.stride(0) // stok < 2**31
    )


def prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    tiles: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Writes the prefill rows of `out` [T, Hq, D]; `tiles` is the plan's (sequence, first
    row) table of BLOCK_M-row tiles. Callers check `supports` first."""
    t, hq, d = q.shape
    blocks, _, page, hk, _ = kv_layer.shape
    stok = kv_layer.stride(2)
    blk_rows, kv_rows = kv_layer.stride(0) // stok, kv_layer.stride(1) // stok
    rows = (blocks - 1) * blk_rows + kv_rows + page  # the last block's V is the last row read
    bits = q.element_size() * 8
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=2)
    q2 = q.as_strided((t, hq * d), (q.stride(0), 1))
    desc_q = TensorDescriptor(q2, [t, hq * d], [q.stride(0), 1], [BLOCK_M, d], layout)
    kv2 = kv_layer.as_strided((rows, hk * d), (stok, 1))
    desc_kv = TensorDescriptor(kv2, [rows, hk * d], [stok, 1], [page, d], layout)
    _prefill_ws_kernel[(tiles.shape[0] * hq,)](
        desc_q, desc_kv, block_tables, tiles, query_start_loc, seq_lens, out,
        out.stride(0), block_tables.stride(0), blk_rows, kv_rows, scale,
        HQ=hq, GQA=hq // hk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES,
        num_warps=_CONSUMER_WARPS,
    )  # fmt: skip
