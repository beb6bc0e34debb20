# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Temperature, top-k and top-p sampling of a batch of rows without sorting, Triton.

The same tokens as `engine.sampler.sample_tokens`' torch path (the reference): scaled
logits s = x / T; top-k keeps the tokens whose s is at least the k-th largest; p =
softmax over the kept; top-p keeps the smallest set of most probable tokens whose mass
reaches top_p; the token is the argmax of p / E over the kept, E ~ Exp(1) the row's
noise (the exponential race).

Both cuts are thresholds on s. Token i survives top-k iff fewer than k tokens have a
larger s, and top-p iff the mass of the tokens with a larger s is below top_p; both
counts fall as s rises, so each cut is "s >= v" for one v, found by searching the 2^32
orderings of fp32 values (`_key`: s's bits as a signed integer ordered like s) instead
of sorting the row: each pass splits the remaining interval at 16 points and counts (or
weighs) the tokens above each, 8 passes in all. Every pass is one launch over (row,
chunk) programs; the row's last program to finish adds the chunks' sums in chunk order
and narrows the interval for the next pass, so a row's result depends neither on the
batch nor on which program finished last. Ties behave as in the reference: every
token tied with the k-th largest survives top-k. At the top-p edge, tokens of equal p
are kept or dropped together (the reference's sort keeps some of them, in whatever order
its sort left them).

Launches: the row range (and the top-k search's start), [8 top-k passes], the kept mass
(and the top-p search's start), [8 top-p passes], the race per chunk, its row maximum
(`kernels.argmax_triton`). Each of the first four kinds ends with its row's last program
(an acq_rel counter, as in the INT4 split-K) reducing the chunks for the next launch, so
no program reads more than its own chunk and a few numbers of its row.

torch's path sorts the whole vocabulary for top-p and reduces a 128k row in one block for
the softmax and the race. H200, 128,256 tokens, bf16 logits, graphs (`python3
bench/kernels.py --sections sample`, session 22), kernel against torch: batch 1
temperature alone 19.7 against 76.4 us, top-p 58.8 against 153.5, top-k and top-p 97.4
against 240.2; batch 32: 40.5 against 115.0, 217.9 against 804.3, 362.6 against 840.1.
The search passes are most of it, each bound by its chain of dependent loads at batch 1
(~6 us a pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.argmax_triton import row_max_kernel
from kernels.triton_runtime import check_device, tile_counters

BLOCK = 256
"""Tokens a program handles at once."""


def chunk_for(rows: int) -> int:
    """Tokens per program. A pass at batch 1 is latency-bound (more programs, shorter
    chains), at batch 32 throughput-bound (fewer programs, fewer partials). An H200 sweep
    of chunk x block x warps (128,256 tokens, top-p alone, a version of the search that
    skipped tokens outside the interval): batch 1 54-58 us with 512-1,024 tokens a
    program, 61-79 with 2,048; batch 32 215-226 with 2,048 (blocks of 256-512, 4 warps),
    234-304 with 512-1,024; 8 warps slower at batch 32."""
    return 1024 if rows <= 8 else 2048


POINTS = 16
"""Points a search pass tests: each pass narrows the interval 16-fold."""
PASSES = 8
"""16^8 = 2^32 keys: the searched interval is one key wide after the last pass."""


@triton.jit
def _key(s):
    """fp32 -> int32 ordered as the floats are (negative floats' magnitude bits flipped)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _scaled(x_ptr, row, stride_x, cols, n, temp):
    """The scaled logits of `cols` (-inf past the row) and their keys."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    s = tl.math.div_rn(x.to(tl.float32), temp)  # IEEE division, as torch's
    return s, _key(s)


@triton.jit
def _last_of_row(count_ptr, row, chunks):
    """After this program's partials are stored: whether it is its row's last program to
    finish (which then reads every chunk's partials, and re-arms the counter)."""
    tl.debug_barrier()  # every thread's partials are written before the release below
    last = tl.atomic_add(count_ptr + row, 1, sem="acq_rel") == chunks - 1
    return last


@triton.jit
def _start(state_ptr, row, low, top, active):
    """A search's first interval (lo, hi]: from below every key to the largest, or, for a
    row the cut does not apply to, the one-key interval that keeps every token."""
    hi = tl.where(active, _key(top).to(tl.int64), low + 1)
    tl.store(state_ptr + row * 2, low)
    tl.store(state_ptr + row * 2 + 1, hi)


@triton.jit
def _points(lo, hi, POINTS: tl.constexpr):
    j = tl.arange(0, POINTS).to(tl.int64)
    return lo + (hi - lo) * (j + 1) // POINTS


@triton.jit
def _range_kernel(
    x_ptr, temp_ptr, topk_ptr, cmax_ptr, cmin_ptr, top_ptr, low_ptr, state_ptr, count_ptr,
    n, stride_x, chunks,
    TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, C_P2: tl.constexpr,
):  # fmt: skip
    """The row's largest scaled logit and the key below its smallest; the top-k search's
    first interval."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    if temp > 0:  # greedy rows are the argmax's
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        low = tl.full([BLOCK], 2147483647, tl.int32)
        for b in range(0, CHUNK, BLOCK):
            cols = c * CHUNK + b + tl.arange(0, BLOCK)
            s, key = _scaled(x_ptr, row, stride_x, cols, n, temp)
            top = tl.maximum(top, s)
            low = tl.minimum(low, tl.where(cols < n, key, 2147483647))
        tl.store(cmax_ptr + row * chunks + c, tl.max(top, axis=0))
        tl.store(cmin_ptr + row * chunks + c, tl.min(low, axis=0))
        if _last_of_row(count_ptr, row, chunks):
            cc = tl.arange(0, C_P2)
            live = cc < chunks
            row_top = tl.max(
                tl.load(cmax_ptr + row * chunks + cc, mask=live, other=float("-inf"),
                        cache_modifier=".cg"), axis=0,
            )  # fmt: skip
            row_low = tl.min(
                tl.load(cmin_ptr + row * chunks + cc, mask=live, other=2147483647,
                        cache_modifier=".cg"), axis=0,
            ).to(tl.int64) - 1  # fmt: skip
            tl.store(top_ptr + row, row_top)
            tl.store(low_ptr + row, row_low)
            if TOP_K:
                k = tl.load(topk_ptr + row)
                _start(state_ptr, row, row_low, row_top, (k > 0) & (k < n))
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _search_kernel(
    x_ptr, temp_ptr, limit_ptr, top_ptr, low_ptr, z_ptr, state_ptr, part_ptr, count_ptr,
    n, stride_x, chunks,
    MASS: tl.constexpr, TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    C_P2: tl.constexpr, POINTS: tl.constexpr,
):  # fmt: skip
    """One pass of a search, top-k (counts) or, with MASS, top-p (probabilities over the
    tokens top-k kept): each program weighs its tokens above each point of the row's
    interval; the row's last program adds the chunks up and narrows the interval."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    here = state_ptr + MASS * tl.num_programs(0) * 2  # this search's (lo, hi] per row
    temp = tl.load(temp_ptr + row)
    lo = tl.load(here + row * 2)
    hi = tl.load(here + row * 2 + 1)
    if (temp > 0) & (hi - lo > 1):
        top = tl.load(top_ptr + row)
        if MASS:
            z = tl.load(z_ptr + row)
            cut = tl.load(low_ptr + row)
            if TOP_K:
                cut = tl.load(state_ptr + row * 2 + 1)
        pts = _points(lo, hi, POINTS).to(tl.int32)  # lo >= key(-inf) - 1: int32 fits
        # (Column tiles [BLOCK, 1] from the load on: comparing them with the points
        # [1, POINTS] broadcasts without moving data between threads.)
        above = tl.zeros([BLOCK, POINTS], dtype=tl.float32)
        for b in range(0, CHUNK, BLOCK):
            cols = c * CHUNK + b + tl.arange(0, BLOCK)[:, None]
            s, key = _scaled(x_ptr, row, stride_x, cols, n, temp)
            if MASS:
                w = tl.where((cols < n) & (key >= cut), tl.exp(s - top) / z, 0.0)
            else:
                w = tl.where(cols < n, 1.0, 0.0)
            above += tl.where(key > pts[None, :], w, 0.0)
        j = tl.arange(0, POINTS)
        acc = tl.sum(above, axis=0)
        tl.store(part_ptr + (row * chunks + c) * POINTS + j, acc)
        if _last_of_row(count_ptr, row, chunks):
            cc = tl.arange(0, C_P2)
            offs = (row * chunks + cc[:, None]) * POINTS + j[None, :]
            parts = tl.load(part_ptr + offs, mask=(cc < chunks)[:, None], other=0.0,
                            cache_modifier=".cg")  # fmt: skip
            counted = tl.sum(parts, axis=0)  # in chunk order: the same sums every time
            limit = tl.load(limit_ptr + row).to(tl.float32)
            # Counts fall as the point rises and the last point (hi) is under the limit:
            # the cut lies above the last point that reaches it, at or below the next.
            failed = tl.minimum(tl.sum((counted >= limit).to(tl.int32), axis=0), POINTS - 1)
            wide = _points(lo, hi, POINTS)
            new_lo = tl.sum(tl.where(j == failed - 1, wide, 0), axis=0)
            tl.store(here + row * 2, tl.where(failed > 0, new_lo, lo))
            tl.store(here + row * 2 + 1, tl.sum(tl.where(j == failed, wide, 0), axis=0))
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _mass_kernel(
    x_ptr, temp_ptr, topp_ptr, top_ptr, low_ptr, state_ptr, zsum_ptr, z_ptr, count_ptr,
    n, stride_x, chunks,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    C_P2: tl.constexpr,
):  # fmt: skip
    """The softmax's denominator over the tokens top-k keeps, sum exp(s - max), added in
    chunk order; the top-p search's first interval."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    if temp > 0:
        top = tl.load(top_ptr + row)
        low = tl.load(low_ptr + row)
        cut = low
        if TOP_K:
            cut = tl.load(state_ptr + row * 2 + 1)
        z = tl.zeros([BLOCK], dtype=tl.float32)
        for b in range(0, CHUNK, BLOCK):
            cols = c * CHUNK + b + tl.arange(0, BLOCK)
            s, key = _scaled(x_ptr, row, stride_x, cols, n, temp)
            z += tl.where((cols < n) & (key >= cut), tl.exp(s - top), 0.0)
        tl.store(zsum_ptr + row * chunks + c, tl.sum(z, axis=0))
        if _last_of_row(count_ptr, row, chunks):
            cc = tl.arange(0, C_P2)
            parts = tl.load(zsum_ptr + row * chunks + cc, mask=cc < chunks, other=0.0,
                            cache_modifier=".cg")  # fmt: skip
            tl.store(z_ptr + row, tl.sum(parts, axis=0))
            if TOP_P:
                _start(state_ptr + tl.num_programs(0) * 2, row, low, top,
                       tl.load(topp_ptr + row) < 1.0)  # fmt: skip
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _race_kernel(
    x_ptr, temp_ptr, top_ptr, low_ptr, z_ptr, state_ptr, noise_ptr, drawn_ptr, host_ptr,
    val_ptr, idx_ptr, n, stride_x, stride_noise, stride_drawn, chunks,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, DRAWN: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Each chunk's largest p / E over the kept tokens and its first index (0 for the
    dropped, as their p is 0 in the reference)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    best = float("-inf")
    first = 0
    if temp > 0:
        top = tl.load(top_ptr + row)
        z = tl.load(z_ptr + row)
        cut = tl.load(low_ptr + row)
        if TOP_K:
            cut = tl.maximum(cut, tl.load(state_ptr + row * 2 + 1))
        if TOP_P:
            cut = tl.maximum(cut, tl.load(state_ptr + (tl.num_programs(0) + row) * 2 + 1))
        use_host = True
        if DRAWN:
            use_host = tl.load(host_ptr + row) != 0
        best_v = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK], dtype=tl.int32)
        for b in range(0, CHUNK, BLOCK):
            cols = c * CHUNK + b + tl.arange(0, BLOCK)
            s, key = _scaled(x_ptr, row, stride_x, cols, n, temp)
            valid = cols < n
            kept = valid & (key >= cut)
            if use_host:
                e = tl.load(noise_ptr + row * stride_noise + cols, mask=kept, other=1.0)
            else:
                e = tl.load(drawn_ptr + row * stride_drawn + cols, mask=kept, other=1.0)
            value = tl.where(kept, tl.exp(s - top) / z / e, 0.0)
            value = tl.where(valid, value, float("-inf"))
            better = value > best_v  # strictly: the earlier block keeps a tie
            best_i = tl.where(better, cols, best_i)
            best_v = tl.where(better, value, best_v)
        best = tl.max(best_v, axis=0)
        first = tl.min(tl.where(best_v == best, best_i, n), axis=0)
    tl.store(val_ptr + row * chunks + c, best)
    tl.store(idx_ptr + row * chunks + c, first)


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    noise: torch.Tensor,
    drawn: torch.Tensor | None = None,
    host_noise: torch.Tensor | None = None,
    chunk: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """logits [B, V] -> [B] int64: each row with temperature > 0 sampled under its top-k
    (`top_k` [B] int64, 0 or >= V: off; None: no row uses it) and top-p (`top_p` [B]
    fp32, 1: off; None: no row uses it), racing `noise` [B, V] fp32, or `drawn` [B, V] in
    the rows where `host_noise` [B] is False. Rows with temperature <= 0 return garbage
    (the caller takes their argmax). No host sync; graph-safe."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (logits.shape, logits.stride())
    assert logits.dtype in (torch.bfloat16, torch.float16, torch.float32), logits.dtype
    rows, n = logits.shape
    assert 0 < n < 2**31, n
    for vec, dtype in ((temperature, torch.float32), (top_k, torch.int64), (top_p, torch.float32)):
        assert vec is None or (vec.shape == (rows,) and vec.dtype == dtype), vec
    assert noise.shape == (rows, n) and noise.stride(1) == 1 and noise.dtype == torch.float32
    assert (drawn is None) == (host_noise is None)
    if drawn is not None and host_noise is not None:
        assert drawn.shape == (rows, n) and drawn.stride(1) == 1 and drawn.dtype == torch.float32
        assert host_noise.shape == (rows,) and host_noise.dtype == torch.bool
    chunk, block = chunk or chunk_for(rows), block or BLOCK
    assert block <= chunk and chunk % block == 0
    check_device(logits, temperature, noise)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(n, chunk)
    c_p2 = triton.next_power_of_2(chunks)
    dev = logits.device

    def f32(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=dev)

    cmax, zsum, val, part = (f32(rows, chunks), f32(rows, chunks), f32(rows, chunks),
                             f32(rows, chunks, POINTS))  # fmt: skip
    top, z = f32(rows), f32(rows)
    cmin = torch.empty((rows, chunks), dtype=torch.int32, device=dev)
    idx = torch.empty((rows, chunks), dtype=torch.int32, device=dev)
    low = torch.empty(rows, dtype=torch.int64, device=dev)
    state = torch.empty((2, rows, 2), dtype=torch.int64, device=dev)  # top-k, top-p (lo, hi]
    count = tile_counters(dev, rows)
    grid = (rows, chunks)
    tiles = {"CHUNK": chunk, "BLOCK": block, "num_warps": 4}
    has_k, has_p = top_k is not None, top_p is not None
    x, stride = logits, logits.stride(0)
    _range_kernel[grid](
        x, temperature, temperature if top_k is None else top_k, cmax, cmin, top, low, state,
        count, n, stride, chunks, TOP_K=has_k, C_P2=c_p2, **tiles,
    )  # fmt: skip

    def search(limit: torch.Tensor, mass: bool) -> None:
        for _ in range(PASSES):
            _search_kernel[grid](
                x, temperature, limit, top, low, z, state, part, count, n, stride, chunks,
                MASS=mass, TOP_K=has_k, C_P2=c_p2, POINTS=POINTS, **tiles,
            )  # fmt: skip

    if top_k is not None:
        search(top_k, False)
    _mass_kernel[grid](
        x, temperature, temperature if top_p is None else top_p, top, low, state, zsum, z,
        count, n, stride, chunks, TOP_K=has_k, TOP_P=has_p, C_P2=c_p2, **tiles,
    )  # fmt: skip
    if top_p is not None:
        search(top_p, True)
    drawn_t = noise if drawn is None else drawn
    _race_kernel[grid](
        x, temperature, top, low, z, state, noise, drawn_t,
        temperature if host_noise is None else host_noise, val, idx,
        n, stride, noise.stride(0), drawn_t.stride(0), chunks,
        TOP_K=has_k, TOP_P=has_p, DRAWN=drawn is not None, **tiles,
    )  # fmt: skip
    row_max_kernel[(rows,)](val, idx, out, chunks, BLOCK=c_p2, num_warps=1, PDL=False)
    return out
