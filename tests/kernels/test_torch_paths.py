"""The torch backend's CPU paths for the quantized ops (the embedded default's kernels)."""

import math

import pytest
import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.backend import get_backend
from kernels.fp8_linear import FP8_DTYPE, make_fp8_weight, quantize_fp8_torch
from kernels.int4_linear import dequantize_int4, pack_int4, unpack_int4
from kernels.kv_cache_fp8 import paged_attention_fp8_torch, write_kv_fp8_torch
from tests.kernels.bounds import FP8_ROUND, ROUND, assert_within

ops = get_backend("torch")


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_int4_cpu_kernel_matches_fp64(m, x_dtype):
    n, k, g = 64, 576, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // g) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // g)).to(torch.bfloat16)
    weight = pack_int4(q, scales, zeros, g, "cpu")
    x = torch.randn(m, k).to(x_dtype)
    out = ops.int4_linear(x, weight, None)
    assert out.dtype == x_dtype and out.shape == (m, n)
    w = dequantize_int4(q, scales, zeros).double()
    xb = x.to(torch.bfloat16).double()  # the CPU kernel takes bf16 activations
    ref = xb @ w.T
    # torch's kernel folds the zero into a bf16 offset (8 - z) * s: one more rounding.
    size = xb.abs() @ w.abs().T
    assert_within(out, ref, ROUND * ref.abs() + 2**-8 * size, "int4 cpu")


def test_int4_reference_path_reads_the_gpu_layout():
    n, k, g = 32, 256, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // g).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // g)).to(torch.bfloat16)
    weight = pack_int4(q, scales, zeros, g, "triton")
    x = torch.randn(3, k).to(torch.bfloat16)
    ref = x.double() @ dequantize_int4(*unpack_int4(weight)).double().T
    assert_within(ops.int4_linear(x, weight, None), ref, ROUND * ref.abs() + 1e-6, "int4 ref")


def test_fp8_cpu_path_multiplies_the_fp8_numbers():
    w = torch.randn(48, 128)
    scale = w.abs().amax(1) / 448
    weight = make_fp8_weight((w / scale[:, None]).to(FP8_DTYPE), scale, "cpu")
    assert weight.widened is not None and weight.widened.dtype == torch.float32
    x = torch.randn(9, 128).to(torch.bfloat16)
    xq, xs = quantize_fp8_torch(x)
    ref = (xq.double() @ weight.data.double().T) * xs.double() * scale.double()
    out = ops.fp8_linear(x, weight, None)
    size = (xq.double().abs() @ weight.data.double().abs().T) * xs.double() * scale.double()
    assert_within(out, ref, ROUND * ref.abs() + 2**-20 * size, "fp8 cpu")
    q2, s2, _ = ops.rms_norm_fp8(x, torch.ones(128, dtype=torch.bfloat16), 1e-6)
    assert q2.dtype == FP8_DTYPE and s2.shape == (9, 1)


def test_fp8_kv_cache_torch_path():
    hq, hk, d, page, seq = 4, 2, 32, 8, 21
    pages = math.ceil(seq / page)
    cache = torch.zeros(pages + 2, 2, page, hk, d, dtype=FP8_DTYPE)
    scales = torch.tensor([[0.5, 2.0], [1.5, 0.25]])
    table = torch.tensor([[3, 0, 1]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, p // page]) * page + p % page for p in range(seq)])
    k, v = torch.randn(seq, hk, d), torch.randn(seq, hk, d)
    write_kv_fp8_torch(k.to(torch.bfloat16), v.to(torch.bfloat16), cache, slots, scales)
    got_k = cache[slots // page, 0, slots % page].double() * scales[0, :, None]
    assert_within(
        got_k,
        k.to(torch.bfloat16).double(),
        FP8_ROUND * k.abs().double() + 2**-9 * scales[0, :, None],
        "fp8 K",
    )
    meta = AttentionMetadata(
        slots[-1:],
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([seq], dtype=torch.int32),
        table,
        1,
        page,
        [1],
        [seq],
    )
    q = torch.randn(1, hq, d).to(torch.bfloat16)
    out = paged_attention_fp8_torch(q, cache, meta, d**-0.5, scales)
    kk = (cache[slots // page, 0, slots % page].double() * scales[0, :, None]).repeat_interleave(
        2, 1
    )
    vv = (cache[slots // page, 1, slots % page].double() * scales[1, :, None]).repeat_interleave(
        2, 1
    )
    p = torch.softmax(torch.einsum("hd,shd->hs", q[0].double(), kk) * d**-0.5, dim=-1)
    ref = torch.einsum("hs,shd->hd", p, vv)
    size = torch.einsum("hs,shd->hd", p, vv.abs())
    assert_within(out[0], ref, 4 * ROUND * size, "fp8 kv attention")


def _one_sequence(seq: int, qlen: int, table: torch.Tensor, page: int, row_invariant: bool):
    slots = torch.tensor([int(table[0, p // page]) * page + p % page for p in range(seq)])
    return AttentionMetadata(
        slots[seq - qlen :],
        torch.tensor([0, qlen], dtype=torch.int32),
        torch.tensor([seq], dtype=torch.int32),
        table,
        1 if qlen == 1 else 0,
        page,
        [qlen],
        [seq],
        row_invariant=row_invariant,
    )


@pytest.mark.parametrize("cached", [0, 13])
def test_row_invariant_chunk_attends_each_row_as_its_decode_step(cached):
    """A chunk of 7 rows after `cached` tokens gives, bit for bit, what 7 decode steps give
    (fp32, the batch-invariant engine's path); a plain chunk does not promise that."""
    hq, hk, d, page, qlen = 4, 2, 32, 8, 7
    seq = cached + qlen
    table = torch.tensor([[4, 1, 3]], dtype=torch.int32)
    kv = torch.randn(6, 2, page, hk, d)
    q = torch.randn(qlen, hq, d)
    meta = _one_sequence(seq, qlen, table, page, row_invariant=True)
    ops.plan_attention(meta)
    chunk = ops.paged_attention(q, kv, meta, d**-0.5)
    for r in range(qlen):
        step = _one_sequence(cached + r + 1, 1, table, page, row_invariant=True)
        ops.plan_attention(step)
        assert torch.equal(chunk[r : r + 1], ops.paged_attention(q[r : r + 1], kv, step, d**-0.5))
    plain = _one_sequence(seq, qlen, table, page, row_invariant=False)
    ops.plan_attention(plain)
    assert_within(ops.paged_attention(q, kv, plain, d**-0.5), chunk.double(), 1e-5, "chunk")


def test_fp8_kv_cache_torch_path_edges():
    """An empty step attends to nothing (and writes nothing); scales that would cache NaN,
    saturated or zeroed values are refused."""
    cache = torch.zeros(4, 2, 8, 2, 32, dtype=FP8_DTYPE)
    scales = torch.ones(2, 2)
    empty = torch.empty(0, 2, 32, dtype=torch.bfloat16)
    write_kv_fp8_torch(empty, empty, cache, torch.empty(0, dtype=torch.long), scales)
    none = torch.empty(0, dtype=torch.int32)
    meta = AttentionMetadata(
        torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32), none,
        torch.empty(0, 1, dtype=torch.int32), 0, 8, [], [],
    )  # fmt: skip
    q = torch.empty(0, 4, 32, dtype=torch.bfloat16)
    assert paged_attention_fp8_torch(q, cache, meta, 0.125, scales).shape == (0, 4, 32)
    k = torch.ones(1, 2, 32, dtype=torch.bfloat16)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        broken = scales.clone()
        broken[1, 0] = bad
        with pytest.raises(ValueError, match="FP8 KV scales must be finite and positive"):
            write_kv_fp8_torch(k, k, cache, torch.tensor([0]), broken)
        with pytest.raises(ValueError, match="FP8 KV scales must be finite and positive"):
            paged_attention_fp8_torch(q, cache, meta, 0.125, broken)
    assert not cache.float().any()
