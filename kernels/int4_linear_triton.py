# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""INT4 weight-only linear (W4A16) for decode, Triton.

The packed layout and the arithmetic identity are in `kernels.int4_linear`'s docstring.
The product is computed transposed, out^T = W · x^T, so that the dequantized weight tile
is the *first* tensor-core operand: on Hopper it then stays in registers (wgmma takes A
from registers) and only the small activation tile goes through shared memory. M (the
batch of tokens, 1 to 64 in decode) becomes the MMA's narrow N side; larger M (a decode
replica prefilling a short prompt) runs in 64-row tiles. (An mma.sync variant with the
weight as the B operand measured the same at M = 1 and up to 2x slower at M >= 16.)

Per 128-wide K block a program loads one [BLOCK_N, 16] int32 tile (16-byte loads, 512
contiguous bytes a warp), dequantizes each nibble plane t

    w_t = bf16x2(((word >> 4p) & 0x000F000F) | 0x43004300) - (128 + z)   = q - z, exactly

(one shift, one and-or and one bf16x2 subtract per two weights, in inline PTX on Hopper),
sets a group's planes side by side, [BLOCK_N, G] (register moves only: every thread
already holds its columns of each plane), and multiplies that by x[:, group]^T in one
tensor-core product: one wait per group instead of a chain of eight dependent 16-deep
MMAs. Then, per group, acc += s * part. A group's scale and zero are one 4-byte word
(`kernels.int4_linear`), which Triton's software pipeline copies ahead with the weight
tile (cp.async); as two 2-byte loads, prefetched into L2 a block or two ahead, they were
the loop's dependency chain (H200, `bench/kernels.py --sections int4`, M = 1, 64-channel
tiles with the register caps below: qkv 9.7 -> 8.5 us, o_proj 7.9 -> 7.2, gate_up 26.6 ->
25.6, down 15.7 -> 15.3).

Small M leaves few output tiles, so K is split (SPLIT_K programs per tile); each writes
an fp32 partial and the last one to finish a tile (an acq_rel counter) sums the partials
in split order, adds the bias, writes the output and re-arms the counter. One launch,
deterministic, graph-safe. At M = 1 (or 2 with few splits) the last program loads only the
rows that exist and issues every split's load before the first add: one wait, not several
(the reduction is the launch's latency tail: 1.5-2.7 us of o_proj's 9.6 at M = 1).

With `swiglu` the weight is an MLP's [gate ‖ up] in `kernels.int4_linear.swiglu_order`
(16 gate rows, then the same channels' 16 up rows), so every tile holds whole pairs and
the store writes silu(gate) * up, rounded as the separate kernel rounds it: one launch
fewer per layer (H200, INT4 engine with an INT4 LM head: batch 1 2,410 -> 2,371 us a
step, batch 32 3,982 -> 3,921).

The epilogue can also carry an RMSNorm across two GEMMs (`kernels.pending_norm`): with
NORM_OUT (o_proj, down_proj) it adds the residual, writes s and gamma * s, and each tile's
sums of s^2 per row; with NORM_IN (qkv, gate_up, reading gamma * s) it scales each output
row by rsqrt(mean(s^2) + eps) from those sums. The norm kernel between them is gone.

On sm_90, at small M, the kernel is a programmatic dependent launch (`triton_runtime.pdl`):
it starts while the kernel before it (a norm, RoPE, attention) still runs, pulls its first
K-block of weights into L2 with one bulk prefetch per 16-channel group, then waits for
x. More than one block measured slower (L2 contention with the running kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.activation_triton import silu_mul
from kernels.int4_linear import K_BLOCK, N_TILE, Int4Weight
from kernels.pending_norm import PendingNorm
from kernels.triton_runtime import (
    INTERPRET,
    check_device,
    mma,
    num_sms,
    pdl,
    pdl_options,
    pdl_trigger,
    pdl_wait,
    tile_counters,
)

_TILE_WORDS = tl.constexpr(N_TILE * 16)  # int32 words in one packed 16 x 128 tile


@triton.constexpr_function
def _plane_asm(t: int) -> str:
    # Elements (j, j+1) of the word tile arrive as $1, $2 and of the zero tile as $3, $4.
    # Plane t's pair sits in word j + t // 4 at nibbles t % 4 and 4 + t % 4, i.e. in the
    # low/high 16-bit halves: and-or makes them bf16 128 + q, one bf16x2 sub makes q - z.
    src = "$1" if t < 4 else "$2"
    return (
        f"{{ .reg .b32 w; shr.u32 w, {src}, {4 * (t % 4)}; "
        "lop3.b32 w, w, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 $0, w, $3; }"
    )


@triton.jit
def _dequant_plane(words, words_odd, zeros, t: tl.constexpr, j, ASM: tl.constexpr):
    """bf16 q - z for plane t, [BLOCK_N, 16]: row n, column j <-> k = 16t + j.

    `zeros` is [BLOCK_N, 1] int32 z; with ASM it is broadcast and holds the bf16 bits of
    128 + z twice (one per 16-bit half).
    """
    if ASM:
        return tl.inline_asm_elementwise(
            _plane_asm(t), "=r,r,r,r,r", [words, zeros], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    # The same numbers without inline PTX (the interpreter, pre-Hopper GPUs): `words` and
    # `words_odd` hold, at column j, words j - j % 2 and j - j % 2 + 1 of the tile.
    src = words if t < 4 else words_odd
    q = (src >> (4 * (t % 4) + 16 * (j % 2))[None, :]) & 0xF
    return (q - zeros).to(tl.float32).to(tl.bfloat16)


@triton.jit
def _cat_columns(a, b):
    """[R, W] and [R, W] -> [R, 2W], a's columns first."""
    ab = tl.permute(tl.join(a, b), (0, 2, 1))  # [R, 2, W]
    return tl.reshape(ab, (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _dequant_group(words, words_odd, zeros, T0: tl.constexpr, PLANES: tl.constexpr, j, ASM):
    """Planes T0 .. T0 + PLANES - 1 (4 or 8) side by side, [BLOCK_N, 16 * PLANES]: column c
    <-> k = 16 * T0 + c of the block, so one MMA covers the group."""
    w = _cat_columns(
        _cat_columns(
            _dequant_plane(words, words_odd, zeros, T0, j, ASM),
            _dequant_plane(words, words_odd, zeros, T0 + 1, j, ASM),
        ),
        _cat_columns(
            _dequant_plane(words, words_odd, zeros, T0 + 2, j, ASM),
            _dequant_plane(words, words_odd, zeros, T0 + 3, j, ASM),
        ),
    )
    if PLANES == 8:
        w = _cat_columns(w, _dequant_group(words, words_odd, zeros, T0 + 4, 4, j, ASM))
    return w


@triton.constexpr_function
def _bulk_prefetch_asm(runs: int) -> str:
    # Thread 0 of the program asks the TMA unit to pull `runs` byte ranges into L2: $1 the
    # first, $2 the distance between them, $3 their size, $4 how many exist.
    body = ""
    for i in range(runs):
        body += (
            f"setp.gt.and.s32 q, $4, {i}, p; @q cp.async.bulk.prefetch.L2.global [a], $3; "
            "add.s64 a, a, $2; "
        )
    return (
        "{ .reg .pred p, q; .reg .b32 t; .reg .b64 a; mov.u32 t, %tid.x; "
        f"setp.eq.u32 p, t, 0; mov.b64 a, $1; {body}mov.u32 $0, 0; }}"
    )


@triton.jit
def _prefetch_weights(first_run, stride, size, runs, RUNS: tl.constexpr):
    """Bulk-prefetch `runs` (<= RUNS) equal byte ranges `stride` apart into L2."""
    tl.inline_asm_elementwise(
        _bulk_prefetch_asm(RUNS),
        "=r,l,l,r,r",
        [first_run, stride, size, runs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _int4_gemm_kernel(
    x_ptr, qw_ptr, sz_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, stride_xm, stride_om, blocks_per_split,
    res_ptr, sum_ptr, gamma_ptr, ssq_in_ptr, ssq_out_ptr, P_IN, eps,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM_IN: tl.constexpr, NORM_OUT: tl.constexpr, P_IN_P2: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    k_blocks = tl.cdiv(K, 128)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = offs_n % N  # out-of-range channels read channel n - N; dropped at the store
    j = tl.arange(0, 16)
    w_row = ((rn // 16) * k_blocks).to(tl.int64) * _TILE_WORDS + (rn % 16) * 16
    if ASM:
        w_ptrs = qw_ptr + w_row[:, None] + j[None, :]
    else:
        w_ptrs = qw_ptr + w_row[:, None] + (j - j % 2)[None, :]
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    m_mask = offs_m[None, :] < M

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, k_blocks)
    if PDL:
        # Until the kernel before finishes (x is its output), pull this program's first
        # K-block of weights into L2: one packed tile per 16-channel group. (H100, batch-1
        # engine, INT4 with an INT4 LM head: no prefetch 374.1 tok/s, one block 386.1, two
        # 367.3, four 367.1; without PDL 366.8.)
        tile_bytes: tl.constexpr = _TILE_WORDS * 4
        group0 = pid_n * (BLOCK_N // 16)
        runs = tl.minimum(BLOCK_N // 16, tl.cdiv(N, 16) - group0)
        start = (group0.to(tl.int64) * k_blocks + first) * _TILE_WORDS
        one = tl.zeros([1], dtype=tl.int64)
        _prefetch_weights(
            qw_ptr + start + one,
            one + k_blocks * tile_bytes,
            (one + tile_bytes).to(tl.int32),
            (one + runs).to(tl.int32),
            BLOCK_N // 16,
        )
    pdl_wait(PDL)
    for b in range(first, last):
        words = tl.load(w_ptrs + b * _TILE_WORDS)  # [BLOCK_N, 16] int32
        words_odd = words
        if not ASM:
            words_odd = tl.load(w_ptrs + b * _TILE_WORDS + 1)
        for g in tl.static_range(128 // GROUP):
            # the group's scale and zero, one word (`kernels.int4_linear`: pipelined with
            # the weights, where two 2-byte loads stalled every block)
            sz = tl.load(sz_ptr + (b * (128 // GROUP) + g) * N + rn)
            if ASM:
                z = tl.broadcast_to(((sz >> 16) * 0x10001)[:, None], (BLOCK_N, 16))
            else:
                z = ((sz >> 16) & 0xF)[:, None]
            w = _dequant_group(words, words_odd, z, g * (GROUP // 16), GROUP // 16, j, ASM)
            k = b * 128 + g * GROUP + tl.arange(0, GROUP)
            if EVEN_K:
                xt = tl.load(x_rows + k[:, None], mask=m_mask, other=0.0)
            else:
                xt = tl.load(x_rows + k[:, None], mask=m_mask & (k[:, None] < K), other=0.0)
            part = mma(w, xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), UPCAST)
            acc += (sz << 16).to(tl.float32, bitcast=True)[:, None] * part

    if SPLIT:
        # Partials are [split_k, M, N] fp32; the last program of this tile sums them in
        # split order (deterministic, whichever finished last).
        split_k = tl.num_programs(1)
        out_mask = (offs_n[:, None] < N) & m_mask
        slot = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_k * M * N + slot, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == split_k - 1:
            if UNROLL:  # few rows and splits: every load in flight at once, one wait
                live = pid_m * BLOCK_M + tl.arange(0, ROWS)  # the rows that exist
                live_slot = live.to(tl.int64)[None, :] * N + offs_n[:, None]
                live_mask = (offs_n[:, None] < N) & (live[None, :] < M)
                total = tl.load(part_ptr + live_slot, mask=live_mask, cache_modifier=".cg")
                for p in tl.static_range(1, SPLIT_K):
                    total += tl.load(
                        part_ptr + p * M * N + live_slot, mask=live_mask, cache_modifier=".cg"
                    )
                _store_out(
                    total, bias_ptr, out_ptr, live, rn, N, M, stride_om, HAS_BIAS, SWIGLU,
                    res_ptr, sum_ptr, gamma_ptr, ssq_in_ptr, ssq_out_ptr, P_IN, eps, K,
                    NORM_IN, NORM_OUT, P_IN_P2,
                )  # fmt: skip
            else:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for p in range(split_k):
                    acc += tl.load(part_ptr + p * M * N + slot, mask=out_mask, cache_modifier=".cg")
                _store_out(
                    acc, bias_ptr, out_ptr, offs_m, rn, N, M, stride_om, HAS_BIAS, SWIGLU,
                    res_ptr, sum_ptr, gamma_ptr, ssq_in_ptr, ssq_out_ptr, P_IN, eps, K,
                    NORM_IN, NORM_OUT, P_IN_P2,
                )  # fmt: skip
            tl.atomic_xchg(count_ptr + tile, 0)
    else:
        _store_out(
            acc, bias_ptr, out_ptr, offs_m, rn, N, M, stride_om, HAS_BIAS, SWIGLU,
            res_ptr, sum_ptr, gamma_ptr, ssq_in_ptr, ssq_out_ptr, P_IN, eps, K,
            NORM_IN, NORM_OUT, P_IN_P2,
        )  # fmt: skip


@triton.jit
def _store_out(
    acc, bias_ptr, out_ptr, offs_m, rn, N, M, stride_om,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    res_ptr, sum_ptr, gamma_ptr, ssq_in_ptr, ssq_out_ptr, P_IN, eps, K,
    NORM_IN: tl.constexpr, NORM_OUT: tl.constexpr, P_IN_P2: tl.constexpr,
):  # fmt: skip
    """out[offs_m, this tile's channels] = acc^T (+ bias), rows < M and channels in range.

    NORM_IN: x was gamma * s of a `PendingNorm`; each row is first scaled by rsqrt(mean(s^2)
    + eps) from its [M, P_IN] partial sums of s^2. SWIGLU: acc's channels are in
    `swiglu_order` and out gets silu(gate) * up. NORM_OUT: out gets gamma * s with s = (the
    projection, rounded) + residual, s goes to sum_ptr, and this tile's sum of s^2 per row to
    column program_id(0) of the [M, num_programs(0)] partials."""
    BN: tl.constexpr = acc.shape[0]
    dtype = out_ptr.dtype.element_ty
    if NORM_IN:
        p = tl.arange(0, P_IN_P2)
        sums = tl.load(ssq_in_ptr + offs_m.to(tl.int64)[None, :] * P_IN + p[:, None],
                       mask=(p[:, None] < P_IN) & (offs_m[None, :] < M), other=0.0)  # fmt: skip
        acc = acc * tl.rsqrt(tl.sum(sums, axis=0) / K + eps)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[:, None]
    if SWIGLU:
        # Rows 32p .. 32p + 15 are gate channels, 32p + 16 .. 32p + 31 the same channels' up.
        pairs = tl.permute(tl.reshape(acc, (BN // 32, 2, 16, acc.shape[1])), (0, 2, 3, 1))
        gate, up = tl.split(pairs)
        y = tl.reshape(silu_mul(gate, up, dtype), (BN // 2, acc.shape[1]))
        offs_n = tl.program_id(0) * (BN // 2) + tl.arange(0, BN // 2)
        n_out = N // 2
    else:
        y = acc.to(dtype)
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_out = N
    mask = (offs_n[:, None] < n_out) & (offs_m[None, :] < M)
    if NORM_OUT:
        # s as rms_norm's residual add makes it: the projection rounded, then the add
        # rounded; its sum of squares from the rounded s.
        rows = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        res = tl.load(res_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        s = (y.to(tl.float32) + res).to(dtype)
        tl.store(sum_ptr + rows, s, mask=mask)
        sf = tl.where(mask, s.to(tl.float32), 0.0)
        tl.store(ssq_out_ptr + offs_m.to(tl.int64) * tl.num_programs(0) + tl.program_id(0),
                 tl.sum(sf * sf, axis=0), mask=offs_m < M)  # fmt: skip
        y = (sf * tl.load(gamma_ptr + rn).to(tl.float32)[:, None]).to(dtype)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, y, mask=mask)


@dataclass(frozen=True)
class Int4GemmConfig:
    block_n: int
    block_m: int
    split_k: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None
    """ptxas's cap (Triton's `maxnreg`)."""


MAX_REGISTERS_SMALL_M = 112
"""The register cap of a 16-row tile when its programs do not all fit an SM at >= 80."""


def int4_gemm_config(m: int, n: int, k: int, sms: int) -> Int4GemmConfig:
    """Tiles by batch size, then K is split until there are about `per_sm` programs per
    SM (bandwidth needs many loads in flight; each split costs an fp32 partial). Swept on
    an H100 over the Llama-3-8B projections: 64-channel tiles beat 128-channel ones at
    every M but 64 with N = 28672, where one wave of 128-channel tiles wins. One 64-row
    tile of a weight of at most 4096 x 4096 splits less (o_proj, M = 64: 4 splits of 8
    K-blocks 14.4 us, 6 of 6 with a last of 2 16.2 us, bf16 15.0 us; not at M = 100).

    16-row tiles (M <= 16) cap the registers: at the number that lets every program of
    the launch sit on an SM at once where that is >= 80, else at 112 (fewer programs an
    SM, none spilling: with the scale-and-zero words pipelined, a 72 cap spilled 4-10
    registers, and caps of 96-112 beat it on gate_up and down at M = 1, 26.9 -> 25.2-25.9
    and 15.2 -> 14.8 us; H200 scratch sweeps, session 21). Where N is
    large, 128-channel tiles of 4 warps capped at 128 registers beat them (H200, M = 1):
    the INT4 LM head 80.5-88.8 against 92.5-93.4 us, a plain gate_up 22.1 against 26.2, the
    engine's gate_up with its norm and SiLU epilogues 23.3 against 25.4-26.1 (uncapped, the
    SiLU epilogue took 167 registers, three programs an SM: 25.6)."""
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n, warps, stages, per_sm = 64, 4, 3, 7.0
    large_n = triton.cdiv(n, 64) > 2 * sms  # the LM head, gate_up: 128-channel tiles
    if block_m == 16:
        per_sm = 7.0 if m <= 4 else 4.0  # gate_up at M = 4: one split of 32 blocks lost 12%
        block_n = 128 if large_n else 64
    elif block_m == 32:
        stages, per_sm = 4, 2.5
        block_n = 128 if large_n else 64
    elif block_m == 64:
        per_sm = 2.0 if m <= 64 and n * k <= 4096 * 4096 else 3.0
        if large_n:
            block_n, per_sm = 128, 1.5
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    k_blocks = triton.cdiv(k, K_BLOCK)
    split = max(1, min(k_blocks, round(per_sm * sms / tiles)))
    if block_m == 32:  # equal splits: the K-block count's divisor nearest the target
        split = min((d for d in range(1, k_blocks + 1) if k_blocks % d == 0),
                    key=lambda d: (abs(d - per_sm * sms / tiles), d))  # fmt: skip
    split = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no empty splits
    max_registers = None
    if block_m == 16 and block_n == 128:
        max_registers = 128  # four programs an SM; the SiLU epilogue took 167 uncapped
    if block_m == 16 and block_n == 64:
        per_sm_needed = triton.cdiv(tiles * split, sms)
        fit = 65536 // (32 * warps * per_sm_needed) // 8 * 8
        max_registers = min(fit, MAX_REGISTERS_SMALL_M) if fit >= 80 else MAX_REGISTERS_SMALL_M
    stages = 1 if INTERPRET else stages
    return Int4GemmConfig(block_n, block_m, split, warps, stages, max_registers)


@functools.cache
def _use_asm(device: torch.device) -> bool:
    """The inline-PTX dequantization needs bf16x2 arithmetic (sm_90)."""
    return not INTERPRET and torch.cuda.get_device_capability(device)[0] >= 9


def int4_linear(
    x: torch.Tensor | PendingNorm,
    weight: Int4Weight,
    bias: torch.Tensor | None,
    config: Int4GemmConfig | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) -> [M, N] in x's dtype; with `swiglu`, the weight's rows are a
    [gate ‖ up] projection in `kernels.int4_linear.swiglu_order` and the result is
    silu(gate) * up, [M, N/2] (SiLU-and-mul in the epilogue: one kernel, not two). A
    `PendingNorm` x is normed in the epilogue (its rows scaled by their rsqrt)."""
    if isinstance(x, PendingNorm):
        return _launch(x.scaled, weight, bias, config, swiglu, x, None)[0]
    return _launch(x, weight, bias, config, swiglu, None, None)[0]


def int4_linear_add_norm(
    x: torch.Tensor,
    weight: Int4Weight,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    eps: float,
    config: Int4GemmConfig | None = None,
) -> tuple[PendingNorm, torch.Tensor]:
    """s = x @ W.T + residual (each rounded, as `rms_norm`'s residual add rounds), and
    rms_norm(s) * gamma left pending: (PendingNorm, s), one launch."""
    n = weight.out_features
    assert residual.shape == (x.shape[0], n) and residual.is_contiguous(), residual.shape
    assert residual.dtype == gamma.dtype == x.dtype and gamma.shape == (n,), gamma.shape
    assert gamma.is_contiguous()
    s = torch.empty_like(residual)
    scaled, sumsq = _launch(x, weight, None, config, False, None, (residual, s, gamma))
    assert sumsq is not None
    return PendingNorm(scaled, sumsq, eps), s


def _launch(
    x: torch.Tensor,
    weight: Int4Weight,
    bias: torch.Tensor | None,
    config: Int4GemmConfig | None,
    swiglu: bool,
    norm_in: PendingNorm | None,
    norm_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel launch behind `int4_linear` and `int4_linear_add_norm`: (out, the partial
    sums of s^2 where `norm_out` = (residual, s, gamma))."""
    assert weight.layout == "triton", weight.layout
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    k_blocks = triton.cdiv(k, K_BLOCK)
    assert x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, (x.shape, x.stride(), k)
    assert x.dtype in (torch.bfloat16, torch.float16), f"INT4 kernel takes bf16/fp16, got {x.dtype}"
    assert weight.qweight.shape == (n // N_TILE, k_blocks, N_TILE, 16), weight.qweight.shape
    assert weight.qweight.dtype == torch.int32 and weight.qweight.is_contiguous()
    groups = k_blocks * K_BLOCK // g
    assert weight.scales.shape == (groups, n), weight.scales.shape  # scale-and-zero words
    assert weight.scales.dtype == torch.int32 and weight.scales.is_contiguous()
    assert g in (64, 128), g
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), bias.shape
    check_device(x, weight.qweight, weight.scales)
    m = x.shape[0]
    cfg = config or int4_gemm_config(m, n, k, num_sms(x.device))
    if swiglu:
        assert bias is None, "a gated projection has no bias"
        assert n % 32 == 0 and cfg.block_n % 32 == 0, (n, cfg.block_n)
    assert norm_out is None or (bias is None and not swiglu)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    out = torch.empty((m, n // 2 if swiglu else n), dtype=x.dtype, device=x.device)
    sumsq = None
    if norm_out is not None:
        sumsq = torch.empty((m, grid[0]), dtype=torch.float32, device=x.device)
    if norm_in is not None:
        assert norm_in.sumsq.shape[0] == m and norm_in.sumsq.is_contiguous()
        assert norm_in.sumsq.dtype == torch.float32
    if m == 0:
        return out, sumsq
    rows = min(cfg.block_m, triton.next_power_of_2(m))
    unroll = cfg.split_k > 1 and rows * cfg.block_n * cfg.split_k <= 1024
    if cfg.split_k > 1:
        partials = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, grid[0] * grid[2])
    else:
        partials = counters = out  # unused
    options = {} if cfg.max_registers is None or INTERPRET else {"maxnreg": cfg.max_registers}
    _int4_gemm_kernel[grid](
        x, weight.qweight, weight.scales, out if bias is None else bias, out,
        partials, counters,
        m, n, k, x.stride(0), out.stride(0), triton.cdiv(k_blocks, cfg.split_k),
        *(norm_out or (out, out, out)), out if norm_in is None else norm_in.sumsq,
        out if sumsq is None else sumsq, 1 if norm_in is None else norm_in.sumsq.shape[1],
        0.0 if norm_in is None else norm_in.eps,
        NORM_IN=norm_in is not None, NORM_OUT=norm_out is not None,
        P_IN_P2=1 if norm_in is None else triton.next_power_of_2(norm_in.sumsq.shape[1]),
        GROUP=g, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, ROWS=rows, SPLIT=cfg.split_k > 1,
        SPLIT_K=cfg.split_k if unroll else 0, UNROLL=unroll, EVEN_K=k % K_BLOCK == 0,
        HAS_BIAS=bias is not None, ASM=_use_asm(x.device), UPCAST=INTERPRET,
        PDL=pdl(x.device, m), SWIGLU=swiglu,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options, **pdl_options(x.device, m),
    )  # fmt: skip
    return out, sumsq
