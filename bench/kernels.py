"""Kernel benchmarks (issue 3): check every variant against an fp64 reference, time it
against its peer in the same run, print one table.

    python bench/kernels.py                 # on a CUDA GPU: full Llama-3-8B shapes
    python bench/kernels.py --sections int4,decode --sweep
    TRITON_INTERPRET=1 python bench/kernels.py --smoke   # CPU: tiny shapes, no timing

Lambdas passed to `time_us` run before the loop moves on, so they may close over loop
variables (hence the file-wide B023 exemption below).

Timing: each measurement captures a CUDA graph of back-to-back calls that rotate through
enough independent input sets to overflow L2 (so weights and KV come from HBM, as in a
real step), replays it, and reports the median per-call time of five replays. The
device-to-device copy bandwidth and every peer (cuBLAS, torch's int4 kernel, SDPA) are
measured in the same process.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import activation_triton, fp8_linear_triton, int4_linear_triton, rmsnorm_triton
from kernels import paged_attention_triton as attention
from kernels.attention_metadata import AttentionMetadata
from kernels.fp8_linear import FP8_DTYPE, FP8_MAX, make_fp8_weight
from kernels.int4_linear import dequantize_int4, int4_group_size, pack_int4
from kernels.triton_runtime import INTERPRET

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
"""Llama-3-8B projections, K x N."""
L2_FLUSH_BYTES = 200 << 20

ROWS: list[tuple[str, str, str, str, str]] = []  # section, case, ours, peer, ratio


def row(section: str, case: str, ours: str, peer: str, ratio: float | str) -> None:
    r = ratio if isinstance(ratio, str) else f"{ratio:.2f}x"
    ROWS.append((section, case, ours, peer, r))
    print(f"  {section:<8} {case:<34} {ours:<22} {peer:<22} {r}", flush=True)


# ----------------------------------------------------------------------------- timing


def time_us(fn: Callable[[int], object], n_sets: int, smoke: bool) -> float:
    """Median microseconds per call of `fn(i)` (i = input set), over graph replays."""
    if smoke:
        t = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t) * 1e6
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    torch.cuda.synchronize()
    est_us = max(start.elapsed_time(end) * 1e3, 1.0)
    calls = max(n_sets, min(64, math.ceil(2000 / est_us)))
    calls = math.ceil(calls / n_sets) * n_sets
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm the graph pool's allocations outside capture
        for i in range(calls):
            fn(i % n_sets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[2]


def sets_for(nbytes: int, smoke: bool) -> int:
    return 1 if smoke else max(1, min(32, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.double()
    assert torch.isfinite(out64).all(), "non-finite output"
    return float((out64 - ref).norm() / ref.norm())


def check(name: str, err: float, bound: float) -> None:
    status = "ok" if err <= bound else "FAIL"
    print(f"    check {name:<44} rel err {err:.2e} (bound {bound:.0e}) {status}", flush=True)
    if err > bound:
        FAILURES.append(f"{name}: {err:.2e} > {bound:.0e}")


FAILURES: list[str] = []
ARGS = argparse.Namespace()


# ------------------------------------------------------------------------- copy peak


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """The better of a 1 GiB cudaMemcpy and an elementwise kernel, read + write, TB/s."""
    n = 1 << (18 if smoke else 28)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    memcpy = time_us(lambda i: dst.copy_(src), 1, smoke)
    kernel = time_us(lambda i: torch.neg(src, out=dst), 1, smoke)
    return 2 * 4 * n / min(memcpy, kernel) / 1e6


# ------------------------------------------------------------------------------ FP8


def bench_fp8(device: torch.device, m: int, smoke: bool, sweep: bool) -> None:
    print(f"FP8 linear, M={m} (activation quantization fused into its producer)", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    configs = [fp8_linear_triton.fp8_gemm_config(m, 4096, 4096)]
    if sweep and not smoke:
        config = fp8_linear_triton.Fp8GemmConfig
        configs += [config(128, 256, 128, 4, 8, 3, True), config(128, 256, 128, 8, 8, 4, True)]
    for name, (k, n) in SHAPES.items():
        if name not in ARGS.shapes:
            continue
        if smoke:
            k, n = k // 64, n // 64
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        w_scale = w.abs().amax(1) / FP8_MAX
        weight = make_fp8_weight((w / w_scale[:, None]).to(FP8_DTYPE), w_scale, device)
        bias = None
        # The producer of this projection's input and the bf16 op it replaces.
        hidden = k if name != "down" else 2 * k
        n_sets = sets_for(m * hidden * 2 + n * k, smoke)
        xs = [
            torch.randn(m, hidden, device=device, generator=gen, dtype=torch.bfloat16)
            for _ in range(n_sets)
        ]
        norm_w = torch.rand(k, device=device, generator=gen).to(torch.bfloat16) + 0.5
        produce_fp8: Callable[[int], tuple[torch.Tensor, ...]]
        produce_bf16: Callable[[int], object]
        if name in ("qkv", "gate_up"):
            produce_fp8 = lambda i: rmsnorm_triton.rms_norm_fp8(xs[i], norm_w, 1e-5)  # noqa: E731
            produce_bf16 = lambda i: rmsnorm_triton.rms_norm(xs[i], norm_w, 1e-5)  # noqa: E731
            producer = "rmsnorm"
        elif name == "down":
            produce_fp8 = lambda i: activation_triton.silu_and_mul_fp8(xs[i])  # noqa: E731
            produce_bf16 = lambda i: activation_triton.silu_and_mul(xs[i])  # noqa: E731
            producer = "swiglu"
        else:
            produce_fp8 = lambda i: fp8_linear_triton.quantize_fp8(xs[i])  # noqa: E731
            produce_bf16 = lambda i: None  # noqa: E731
            producer = "quant"
        q_sets = [produce_fp8(i)[:2] for i in range(n_sets)]
        xq, xsc = q_sets[0]
        ref = (xq.double() @ weight.data.double().T) * xsc.double() * weight.scale.double()
        scale_row = torch.ones(1, n, device=device)
        for cfg in configs:
            out = fp8_linear_triton.fp8_gemm(xq, xsc, weight, bias, torch.bfloat16, cfg)
            tag = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
            check(f"fp8 {name} {tag}", rel_err(out, ref), 8e-3)
        best_us, best_cfg = math.inf, configs[0]
        for cfg in configs:
            us = time_us(
                lambda i: fp8_linear_triton.fp8_gemm(*q_sets[i], weight, bias, torch.bfloat16, cfg),
                n_sets,
                smoke,
            )
            if len(configs) > 1:
                print(f"    sweep {name} {cfg}: {us:.1f} us", flush=True)
            if us < best_us:
                best_us, best_cfg = us, cfg
        w_scale_row = weight.scale[None, :]
        peers = {}
        for fast in (False, True):
            out = torch._scaled_mm(
                xq, weight.data.T, xsc, w_scale_row, out_dtype=torch.bfloat16, use_fast_accum=fast
            )
            check(f"cublas {name} fast={fast}", rel_err(out, ref), 8e-3)
            peers[fast] = time_us(
                lambda i: torch._scaled_mm(
                    q_sets[i][0],
                    weight.data.T,
                    q_sets[i][1],
                    w_scale_row,
                    out_dtype=torch.bfloat16,
                    use_fast_accum=fast,
                ),
                n_sets,
                smoke,
            )
        del scale_row
        t_fp8_prod = time_us(produce_fp8, n_sets, smoke)
        t_bf16_prod = time_us(produce_bf16, n_sets, smoke) if producer != "quant" else 0.0
        flops = 2 * m * n * k
        peer = min(peers.values())
        row(
            "fp8",
            f"{name} {k}x{n} gemm",
            f"{best_us:.0f}us {flops / best_us / 1e6:.0f}TF",
            f"cuBLAS {peer:.0f}us {flops / peer / 1e6:.0f}TF",
            peer / best_us,
        )
        row(
            "fp8",
            f"{name} gemm vs default _scaled_mm",
            f"{best_us:.0f}us",
            f"{peers[False]:.0f}us {flops / peers[False] / 1e6:.0f}TF",
            peers[False] / best_us,
        )
        ours_total = best_us + t_fp8_prod
        peer_total = peer + t_bf16_prod
        row(
            "fp8",
            f"{name} +{producer}(quant) vs +bf16 op",
            f"{ours_total:.0f}us",
            f"{peer_total:.0f}us",
            peer_total / ours_total,
        )
        print(
            f"    cuBLAS precise {peers[False]:.1f}us fast {peers[True]:.1f}us; best ours "
            f"{best_cfg}; producer fp8 {t_fp8_prod:.1f}us bf16 {t_bf16_prod:.1f}us",
            flush=True,
        )


# ------------------------------------------------------------------------------ INT4


def _tinygemm_pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple:
    """torch's CUDA int4 kernel format: uint8 [N, K/2] -> int4pack; (scale, zero) [K/G, N, 2]."""
    q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
    s, z = scales.float(), zeros.float()
    sz = torch.stack([s.T, ((8 - z) * s).T], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def bench_int4(device: torch.device, smoke: bool, sweep: bool) -> None:
    print("INT4 weight-only linear (W4A16) vs bf16 torch.matmul and torch._weight_int4pack_mm")
    gen = torch.Generator(device=device).manual_seed(1)
    ms = [int(v) for v in ARGS.ms.split(",")] if not smoke else [1, 5]
    for name, (k, n) in SHAPES.items():
        if name not in ARGS.shapes:
            continue
        if smoke:
            k, n = k // 16, n // 16
        g = int4_group_size(k)
        q = torch.randint(0, 16, (n, k), device=device, generator=gen, dtype=torch.uint8)
        scales = (torch.rand(n, k // g, device=device, generator=gen) * 2e-3 + 1e-3).to(
            torch.bfloat16
        )
        zeros = torch.randint(0, 16, (n, k // g), device=device, generator=gen).to(torch.bfloat16)
        w_ref = dequantize_int4(q, scales, zeros).double()
        int4_bytes = n * k // 2 + 4 * n * k // g
        n_sets = sets_for(int4_bytes, smoke)
        weights = [pack_int4(q, scales, zeros, g, "triton", device) for _ in range(n_sets)]
        dense = w_ref.to(torch.bfloat16)
        d_sets = sets_for(2 * n * k, smoke)
        denses = [dense.clone() for _ in range(d_sets)]
        tiny = None
        if not smoke:
            tiny = [_tinygemm_pack(q, scales, zeros) for _ in range(n_sets)]
        # Untimed first pass: the first timing after a shape's setup read up to 12% slower than
        # the same kernel timed again later in the process (gate_up M=1: 32.5 vs 29.0 us).
        warm = torch.randn(ms[0], k, device=device, dtype=torch.bfloat16)
        time_us(lambda i: int4_linear_triton.int4_linear(warm, weights[i], None), n_sets, smoke)
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            ref = x.double() @ w_ref.T
            configs: list[int4_linear_triton.Int4GemmConfig | None] = [None]
            if sweep and not smoke:  # every M given (--ms)
                base = int4_linear_triton.int4_gemm_config(m, n, k, 132)
                splits = sorted({max(1, base.split_k // 2), base.split_k, 2 * base.split_k})
                configs += [
                    dataclasses.replace(
                        base,
                        block_n=bn,
                        split_k=sk,
                        num_stages=st,
                        max_registers=base.max_registers if bn == base.block_n else None,
                    )
                    for bn in (64, 128)
                    for sk in splits
                    for st in (3, 4)
                ]
            times: dict[int4_linear_triton.Int4GemmConfig | None, float] = {}
            for cfg in configs:
                out = int4_linear_triton.int4_linear(x, weights[0], None, cfg)
                check(f"int4 {name} m={m} {cfg or 'default'}", rel_err(out, ref), 4e-3)
                times[cfg] = time_us(
                    lambda i: int4_linear_triton.int4_linear(x, weights[i], None, cfg),
                    n_sets,
                    smoke,
                )
            if len(configs) > 1:
                for cfg, us in sorted(times.items(), key=lambda kv: kv[1])[:4]:
                    print(f"    sweep {name} m={m} {cfg}: {us:.1f} us", flush=True)
            ours = times[None]
            t_bf16 = time_us(lambda i: F.linear(x, denses[i % d_sets]), d_sets, smoke)
            peer = f"bf16 {t_bf16:.1f}us"
            if tiny is not None and m in (1, 16):
                out = torch.ops.aten._weight_int4pack_mm(x, tiny[0][0], g, tiny[0][1])
                check(f"tinygemm {name} m={m}", rel_err(out, ref), 4e-3)
                t_tiny = time_us(
                    lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny[i][0], g, tiny[i][1]),
                    n_sets,
                    smoke,
                )
                row(
                    "int4",
                    f"{name} m={m} vs tinygemm",
                    f"{ours:.1f}us",
                    f"tiny {t_tiny:.1f}us",
                    t_tiny / ours,
                )
            gbps = (int4_bytes + 2 * m * (n + k)) / ours / 1e3
            row(
                "int4", f"{name} m={m} vs bf16", f"{ours:.1f}us {gbps:.0f}GB/s", peer, t_bf16 / ours
            )


# ------------------------------------------------------------------------- attention


def _paged_cache(
    device: torch.device,
    batch: int,
    ctx: int,
    hk: int,
    d: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-layer block-major cache (layer 0 used), pages shuffled: (kv_layer, block_table)."""
    page = 16
    pages = batch * (ctx // page)
    cache = torch.empty((pages, 2, 2, page, hk, d), dtype=torch.bfloat16, device=device)
    cache.normal_(generator=gen)
    if dtype == FP8_DTYPE:
        cache = cache.to(FP8_DTYPE)
    kv = cache[:, 0]
    bt = torch.randperm(pages, device=device, generator=gen).view(batch, -1).int()
    return kv, bt


def _meta(
    bt: torch.Tensor, seq_lens: list[int], q_lens: list[int], num_decodes: int
) -> AttentionMetadata:
    device = bt.device
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=bt,
        num_decodes=num_decodes,
        block_size=16,
        query_lens_host=q_lens,
        seq_lens_host=seq_lens,
    )
    meta.plan = attention.plan_attention(meta)
    return meta


def _dense_kv(kv: torch.Tensor, bt: torch.Tensor, seq: int, ctx: int) -> tuple:
    blocks = kv[bt[seq].long()]  # [pages, 2, 16, Hk, D]
    k = blocks[:, 0].flatten(0, 1)[:ctx].transpose(0, 1)
    v = blocks[:, 1].flatten(0, 1)[:ctx].transpose(0, 1)
    return k, v  # [Hk, ctx, D]


def bench_decode(device: torch.device, copy_tbps: float, smoke: bool) -> None:
    print("Paged decode attention (32 q / 8 kv heads, D 128) vs SDPA on contiguous KV")
    hq, hk, d = (32, 8, 128) if not smoke else (4, 2, 64)
    gen = torch.Generator(device=device).manual_seed(2)
    grid = [(1, 1024), (1, 16384), (8, 4096), (16, 4096), (64, 1024), (64, 4096), (32, 16384)]
    if smoke:
        grid = [(2, 64)]
    for fp8 in (False, True):
        for batch, ctx in grid:
            if fp8 and (batch, ctx) not in ((64, 4096), (1, 16384), (2, 64)):
                continue
            dtype = FP8_DTYPE if fp8 else torch.bfloat16
            kv, bt = _paged_cache(device, batch, ctx, hk, d, dtype, gen)
            scales = (torch.rand(2, hk, device=device, generator=gen) + 0.5) if fp8 else None
            q = torch.randn(batch, hq, d, device=device, generator=gen, dtype=torch.bfloat16)
            meta = _meta(bt, [ctx] * batch, [1] * batch, batch)
            out = attention.paged_attention(q, kv, meta, d**-0.5, scales)
            for b in {0, batch - 1}:
                k, v = _dense_kv(kv, bt, b, ctx)
                k, v = k.double(), v.double()
                if scales is not None:
                    k, v = k * scales[0, :, None, None], v * scales[1, :, None, None]
                k, v = k.repeat_interleave(hq // hk, 0), v.repeat_interleave(hq // hk, 0)
                p = torch.softmax((q[b].double()[:, None] @ k.transpose(1, 2)) * d**-0.5, -1)
                ref = (p @ v)[:, 0]
                check(f"decode b={batch} ctx={ctx} fp8={fp8} seq {b}", rel_err(out[b], ref), 8e-3)
            kv_bytes = batch * ctx * hk * d * 2 * kv.element_size()
            us = time_us(
                lambda i: attention.paged_attention(q, kv, meta, d**-0.5, scales), 1, smoke
            )
            tbps = kv_bytes / us / 1e6
            case = f"b={batch} ctx={ctx}{' fp8' if fp8 else ''} {kv_bytes / 2**20:.0f}MiB"
            if not fp8:
                kd = torch.empty(batch, hk, ctx, d, dtype=torch.bfloat16, device=device)
                vd = torch.empty_like(kd)
                for b in range(batch):
                    kd[b], vd[b] = _dense_kv(kv, bt, b, ctx)
                q4 = q[:, :, None]
                t_sdpa = time_us(
                    lambda i: F.scaled_dot_product_attention(
                        q4, kd, vd, scale=d**-0.5, enable_gqa=True
                    ),
                    1,
                    smoke,
                )
                row(
                    "decode",
                    case,
                    f"{us:.1f}us {tbps:.2f}TB/s {tbps / copy_tbps:.0%}",
                    f"sdpa {t_sdpa:.1f}us",
                    t_sdpa / us,
                )
            else:
                row("decode", case, f"{us:.1f}us {tbps:.2f}TB/s {tbps / copy_tbps:.0%}", "-", "-")


def _tiles(meta: AttentionMetadata, block_m: int) -> torch.Tensor:
    """The plan's tile table for another BLOCK_M (sweeps only)."""
    tiles = []
    for b in range(meta.num_decodes, meta.batch_size):
        prefix = meta.seq_lens_host[b] - meta.query_lens_host[b]
        tiles += [(prefix + m0, b, m0) for m0 in range(0, meta.query_lens_host[b], block_m)]
    tiles.sort(reverse=True)
    host = torch.tensor([(b, m0) for _, b, m0 in tiles], dtype=torch.int32)
    return host.to(meta.block_tables.device)


PREFILL_SWEEP = [  # block_m, block_n, warps, stages (the plan's choice: 128, 128, 8, 3)
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 2),
]


def bench_prefill(device: torch.device, smoke: bool, sweep: bool) -> None:
    print("Paged prefill attention (causal, 32 q / 8 kv heads, D 128) vs SDPA (flash), 4k")
    hq, hk, d = (32, 8, 128) if not smoke else (4, 2, 64)
    gen = torch.Generator(device=device).manual_seed(3)
    for ctx, new in ((4096, 4096), (4096, 1024)) if not smoke else ((48, 48), (48, 20)):
        kv, bt = _paged_cache(device, 1, ctx, hk, d, torch.bfloat16, gen)
        q = torch.randn(new, hq, d, device=device, generator=gen, dtype=torch.bfloat16)
        meta = _meta(bt, [ctx], [new], 0)
        k, v = _dense_kv(kv, bt, 0, ctx)
        rows = torch.arange(0, new, max(1, new // 64), device=device)  # a sample of query rows
        kk = k.double().repeat_interleave(hq // hk, 0)
        vv = v.double().repeat_interleave(hq // hk, 0)
        s = (q[rows].double().transpose(0, 1) @ kk.transpose(1, 2)) * d**-0.5
        visible = torch.arange(ctx, device=device)[None, :] <= (ctx - new + rows)[:, None]
        ref = (torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vv).transpose(0, 1)
        flops = 4 * d * hq * sum(ctx - new + r + 1 for r in range(new))
        if sweep and not smoke:
            base = meta.plan
            for bm, bn, warps, stages in PREFILL_SWEEP:
                meta.plan = dataclasses.replace(
                    base,
                    block_m=bm,
                    block_n=bn,
                    prefill_warps=warps,
                    prefill_stages=stages,
                    prefill_tiles=_tiles(meta, bm),
                )
                tag = f"{bm}x{bn} w{warps} s{stages}"
                out = attention.paged_attention(q, kv, meta, d**-0.5)
                check(f"prefill ctx={ctx} new={new} {tag}", rel_err(out[rows], ref), 8e-3)
                us = time_us(lambda i: attention.paged_attention(q, kv, meta, d**-0.5), 1, smoke)
                print(
                    f"    sweep prefill ctx={ctx} new={new} {tag}: "
                    f"{us:.0f} us {flops / us / 1e6:.0f} TF",
                    flush=True,
                )
            meta.plan = base
        # The dispatched kernel (Gluon on Hopper), and the Triton kernel it replaces there.
        triton_meta = dataclasses.replace(meta)
        triton_meta.plan = dataclasses.replace(meta.plan, prefill_gluon=False)
        out = attention.paged_attention(q, kv, meta, d**-0.5)
        check(f"prefill ctx={ctx} new={new}", rel_err(out[rows], ref), 8e-3)
        out = attention.paged_attention(q, kv, triton_meta, d**-0.5)
        check(f"prefill ctx={ctx} new={new} triton kernel", rel_err(out[rows], ref), 8e-3)
        us = time_us(lambda i: attention.paged_attention(q, kv, meta, d**-0.5), 1, smoke)
        us_triton = time_us(
            lambda i: attention.paged_attention(q, kv, triton_meta, d**-0.5), 1, smoke
        )
        case = f"ctx={ctx} new={new}"
        row(
            "prefill",
            f"{case} vs triton kernel",
            f"{us:.0f}us",
            f"triton {us_triton:.0f}us {flops / us_triton / 1e6:.0f}TF",
            us_triton / us,
        )
        if new == ctx:
            qd = q.transpose(0, 1)[None]
            kd, vd = k[None].contiguous(), v[None].contiguous()
            t_sdpa = time_us(
                lambda i: F.scaled_dot_product_attention(
                    qd, kd, vd, is_causal=True, scale=d**-0.5, enable_gqa=True
                ),
                1,
                smoke,
            )
            row(
                "prefill",
                case,
                f"{us:.0f}us {flops / us / 1e6:.0f}TF",
                f"sdpa {flops / t_sdpa / 1e6:.0f}TF",
                t_sdpa / us,
            )
        else:
            row("prefill", case, f"{us:.0f}us {flops / us / 1e6:.0f}TF", "-", "-")


# ------------------------------------------------------------------------ sampling

SAMPLE_VOCAB = 128256
"""Llama-3's vocabulary."""


def bench_sample(device: torch.device, smoke: bool) -> None:
    """The decode step's sampler on a GPU (`engine.sampler.sample_tokens_triton`) against
    its torch reference (`sample_tokens_torch`, which sorts for top-p), same
    host noise, same tokens required."""
    from engine.sampler import (
        SamplerPlan,
        SamplingTensors,
        sample_tokens_torch,
        sample_tokens_triton,
    )

    print("Sampling (temperature 0.8; top-p 0.9; top-k 50) vs the torch path")
    vocab = 1000 if smoke else SAMPLE_VOCAB
    for rows in (1, 3) if smoke else (1, 32):
        # fp32 logits for the check: bf16 ties split the reference's top-p edge in its sort
        # order, where the kernel keeps tied tokens together (kernels.sampling_triton)
        exact = torch.randn(rows, vocab, device=device) * 4
        logits = exact.to(torch.bfloat16)
        sampling = SamplingTensors.empty(rows, vocab, device)
        sampling.temperature.fill_(0.8)
        sampling.noise.exponential_()
        plans = {
            "temperature": SamplerPlan(sample=True),
            "top-p": SamplerPlan(sample=True, top_p=True),
            "top-k + top-p": SamplerPlan(sample=True, top_k=64, top_p=True),
        }
        for name, plan in plans.items():
            sampling.top_k.fill_(50 if plan.top_k else 0)
            sampling.top_p.fill_(0.9 if plan.top_p else 1.0)
            ours = sample_tokens_triton(exact, plan, sampling)
            ref = sample_tokens_torch(exact, plan, sampling)
            check(f"sample {name} b{rows}", float((ours != ref).float().mean()), 0.0)
            us = time_us(lambda i: sample_tokens_triton(logits, plan, sampling), 1, smoke)
            peer = time_us(lambda i: sample_tokens_torch(logits, plan, sampling), 1, smoke)
            row("sample", f"{name} b{rows} V={vocab}", f"{us:.1f}us", f"torch {peer:.1f}us",
                peer / us)  # fmt: skip


# -------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sections", default="fp8,int4,decode,prefill,sample")
    ap.add_argument(
        "--sweep", action="store_true", help="also time alternative INT4 tile configs at each M"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU ok)")
    ap.add_argument("--fp8-m", type=int, default=4096)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="projections to run")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64", help="INT4 batch sizes")
    args = ap.parse_args()
    ARGS.shapes = args.shapes.split(",")
    ARGS.ms = args.ms
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    if smoke:
        assert INTERPRET or torch.cuda.is_available(), "--smoke on CPU needs TRITON_INTERPRET=1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    import triton

    print(
        f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    sections = args.sections.split(",")
    copy_tbps = copy_bandwidth(device, smoke)
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)", flush=True)
    if "fp8" in sections:
        bench_fp8(device, args.fp8_m if not smoke else 64, smoke, args.sweep)
    if "int4" in sections:
        bench_int4(device, smoke, args.sweep)
    if "decode" in sections:
        bench_decode(device, copy_tbps, smoke)
    if "prefill" in sections:
        bench_prefill(device, smoke, args.sweep)
    if "sample" in sections:
        bench_sample(device, smoke)
    print(f"\n{card}, copy {copy_tbps:.2f} TB/s, {' '.join(sys.argv)}")
    print(f"| {'section':<8} | {'case':<34} | {'ours':<22} | {'peer':<22} | ratio |")
    print(f"|{'-' * 10}|{'-' * 36}|{'-' * 24}|{'-' * 24}|-------|")
    for r in ROWS:
        print(f"| {r[0]:<8} | {r[1]:<34} | {r[2]:<22} | {r[3]:<22} | {r[4]:>5} |")
    if FAILURES:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
