"""The native CPU kernels (kernels/cpu/*.cpp) against float64 references.

On x86-64 the library must build (`make` installs g++), so nothing here is ever skipped:
a missing compiler fails `test_library_builds_and_is_the_cpu_default` with its reason.
Elsewhere the kernels do not exist, and tests/kernels/conftest.py does not collect this
module.
"""

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.quant.int8 import quantize_int8
from kernels import native
from kernels.activation_cpu import silu_and_mul_cpu
from kernels.backend import get_backend
from kernels.int4_linear import default_layout, dequantize_int4, pack_int4
from kernels.int8_linear import ACTIVATION_GROUP, dequantize_int8, int8_linear
from kernels.paged_attention import plan_attention_torch, write_kv_torch
from kernels.paged_attention_cpu import paged_attention_cpu, write_kv_cpu
from kernels.rmsnorm import rms_norm_torch
from kernels.rmsnorm_cpu import rms_norm_cpu
from kernels.rope_cpu import apply_rope_cpu
from tests.kernels import test_paged_attention
from tests.kernels.bounds import ROUND, assert_within, poisoned_outputs
from tests.kernels.test_paged_attention import _batch, _kv_rows, _reference

BF16 = torch.bfloat16


def test_library_builds_and_is_the_cpu_default():
    assert native.unavailable_reason() is None
    assert native.library() is not None
    assert default_layout("cpu") == "avx2"


def _int4_weight(n, k, g):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // g) * 0.02 + 1e-3).to(BF16)
    zeros = torch.randint(0, 16, (n, k // g)).to(BF16)
    return pack_int4(q, scales, zeros, g, "avx2"), dequantize_int4(q, scales, zeros).double()


def _activation_rounding(x, w, g):
    """Worst error of int8 activations per (row, group): sum_k |W[n, k]| * step / 2."""
    m, k = x.shape
    step = x.double().abs().view(m, k // g, g).amax(-1) / 127  # [M, K/G]
    w_abs = w.abs().view(w.shape[0], k // g, g).sum(-1)  # [N, K/G]
    return step @ w_abs.T / 2


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(64, 576), (40, 1536), (6, 256)])
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
def test_int4_linear_within_activation_rounding(m, n, k, x_dtype):
    g = 128 if k % 128 == 0 else 64
    weight, w = _int4_weight(n, k, g)
    x = torch.randn(m, k).to(x_dtype)
    with poisoned_outputs():
        out = get_backend("torch").int4_linear(x, weight, None)
    assert out.dtype == x_dtype and out.shape == (m, n)
    ref = x.double() @ w.T
    size = x.double().abs() @ w.abs().T
    out_round = ROUND * ref.abs() if x_dtype == BF16 else 0
    bound = _activation_rounding(x, w, g) + 2**-20 * size + out_round
    assert_within(out, ref, bound, f"int4 avx2 m={m} n={n} k={k}")


# M=2, 3: row pairs from packed nibbles; M=7: tiles of 3 rows from unpacked nibbles
@pytest.mark.parametrize("m", [2, 3, 7])
@pytest.mark.parametrize("n", [96, 6])  # whole tiles of 4 channels, and a tail of 2
def test_int4_linear_rows_do_not_depend_on_the_batch_or_threads(n, m):
    weight, _ = _int4_weight(n, 576, 64)
    x = torch.randn(m, 576).to(BF16)
    ops = get_backend("torch")
    batched = ops.int4_linear(x, weight, None)
    alone = torch.cat([ops.int4_linear(row, weight, None) for row in x.split(1)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = ops.int4_linear(x, weight, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, alone) and torch.equal(batched, two)


def test_int4_linear_groups_up_to_256_wide():
    """The kernel's int16 group sums hold 8 blocks of 32 at the largest products (q = 15,
    x at its scale's 127): exact at 256; a wider group is refused when it is packed."""
    n, k = 4, 512
    q = torch.full((n, k), 15, dtype=torch.uint8)
    scales, zeros = torch.full((n, 2), 2**-4).to(BF16), torch.zeros(n, 2).to(BF16)
    weight = pack_int4(q, scales, zeros, 256, "avx2")
    x = torch.ones(1, k)
    assert torch.equal(get_backend("torch").int4_linear(x, weight, None), torch.full((1, n), 480.0))
    with pytest.raises(ValueError, match="up to 256 input channels, got group_size 512"):
        pack_int4(q, scales[:, :1], zeros[:, :1], 512, "avx2")


def _non_finite_rows(x):
    """x with a NaN, +inf and -inf in rows 1-3 (in the middle of a later group), and a
    mask of those rows."""
    x = x.clone()
    for row, bad in enumerate(("nan", "inf", "-inf"), start=1):
        x[row, x.shape[1] // 2 + 3] = float(bad)
    bad_rows = torch.zeros(x.shape[0], dtype=torch.bool)
    bad_rows[1:4] = True
    return x, bad_rows


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
def test_non_finite_activations_give_non_finite_rows(fmt, x_dtype):
    """A NaN or inf in a row makes that row's outputs non-finite, as torch's product does,
    never a finite wrong answer; the other rows are untouched."""
    k = 576
    if fmt == "int4":
        weight, _ = _int4_weight(6, k, 64)
        run = lambda x: get_backend("torch").int4_linear(x, weight, None)  # noqa: E731
    else:
        weight8 = quantize_int8(torch.randn(6, k))
        run = lambda x: int8_linear(x, weight8)  # noqa: E731
    clean = torch.randn(5, k).to(x_dtype)
    x, bad_rows = _non_finite_rows(clean)
    out = run(x)
    assert not torch.isfinite(out[bad_rows]).any()
    assert torch.equal(out[~bad_rows], run(clean)[~bad_rows])


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("n", [64, 6])  # whole tiles of 4 channels, and a tail of 2
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
def test_int8_linear_within_activation_rounding(m, n, x_dtype):
    k = 576
    weight = quantize_int8(torch.randn(n, k) * 0.05)
    w = dequantize_int8(weight).double()
    x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(x_dtype)
    with poisoned_outputs():
        out = get_backend("torch").int8_linear(x, weight)
    assert out.dtype == x_dtype and out.shape == (m, n)
    ref = x.double() @ w.T
    size = x.double().abs() @ w.abs().T
    bound = _activation_rounding(x, w, ACTIVATION_GROUP) + 2**-20 * size
    bound = bound + (ROUND * ref.abs() if x_dtype == BF16 else 0)
    assert_within(out, ref, bound, f"int8 m={m} n={n}")


def test_int8_linear_rows_do_not_depend_on_the_batch_or_threads():
    weight = quantize_int8(torch.randn(38, 576))
    x = torch.randn(5, 576).to(BF16)
    batched = int8_linear(x, weight)
    alone = torch.cat([int8_linear(row, weight) for row in x.split(1)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = int8_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, alone) and torch.equal(batched, two)


def test_int8_linear_reference_path_for_other_shapes():
    """K not a multiple of the activation group: dequantize and multiply in fp32."""
    weight = quantize_int8(torch.randn(10, 96))
    x = torch.randn(3, 96)
    w = dequantize_int8(weight).double()
    ref = x.double() @ w.T
    size = x.double().abs() @ w.abs().T
    assert_within(int8_linear(x, weight), ref, 2**-20 * size, "int8 reference")


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_path(with_residual):
    x = torch.randn(5, 576).to(BF16)
    residual = torch.randn(5, 576).to(BF16) if with_residual else None
    weight = (torch.rand(576) + 0.5).to(BF16)
    with poisoned_outputs():
        out, summed = rms_norm_cpu(x, weight, 1e-5, residual)
    ref_out, ref_summed = rms_norm_torch(x, weight, 1e-5, residual)
    assert torch.equal(summed, ref_summed)  # one bf16 rounding of the same fp32 sum
    s = summed.double()
    exact = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    # Two roundings, as the torch path makes (normalized value, then times the weight).
    assert_within(out, exact, 2.01 * ROUND * exact.abs(), "rms_norm")
    assert_within(ref_out, exact, 2.01 * ROUND * exact.abs(), "rms_norm torch")


def test_rope_rotates_strided_rows():
    t, hq, hk, d = 4, 3, 1, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(BF16)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    angles = torch.rand(t, d // 2) * 100
    cos, sin = angles.cos(), angles.sin()
    with poisoned_outputs():
        rq, rk = apply_rope_cpu(q, k, cos, sin)
    c, s = cos.to(BF16).double()[:, None], sin.to(BF16).double()[:, None]
    for x, out in ((q, rq), (k, rk)):
        x1, x2 = x.double().chunk(2, dim=-1)
        ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        size = torch.cat((x1.abs() + x2.abs(),) * 2, dim=-1)
        assert_within(out, ref, ROUND * ref.abs() + 2**-22 * size, "rope")


def test_silu_and_mul():
    x = (torch.randn(3, 2 * 1536) * 4).to(BF16)
    with poisoned_outputs():
        out = silu_and_mul_cpu(x)
    gate, up = x.double().chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    assert_within(out, ref, ROUND * ref.abs() + 2**-20 * (gate * up).abs(), "silu_and_mul")


def test_write_kv_matches_the_torch_path():
    meta, kv, _, (_, hk, d) = _batch(torch.device("cpu"), BF16)
    k, v = _kv_rows(meta.num_tokens, hk, d, "cpu")
    expected = kv.clone()
    write_kv_torch(k, v, expected, meta.slot_mapping)
    write_kv_cpu(k, v, kv, meta.slot_mapping)
    assert torch.equal(kv.view(torch.int16), expected.view(torch.int16))  # NaN slots too


def test_write_kv_refuses_slots_outside_the_layer():
    """A slot past the layer's blocks would land in the next layer's (the cache is
    block-major across layers): refused, and nothing is written."""
    _, kv, _, (_, hk, d) = _batch(torch.device("cpu"), BF16)  # layer 1 of 2
    k, v = _kv_rows(1, hk, d, "cpu")
    capacity = kv.shape[0] * kv.shape[2]
    cache = torch.tensor([], dtype=BF16).set_(kv.untyped_storage())  # every layer's slots
    before = cache.clone()
    for slot in (capacity, capacity + 3, -1):
        with pytest.raises(IndexError, match=rf"slots in \[{slot}, {slot}\]; the layer's cache "):
            write_kv_cpu(k, v, kv, torch.tensor([slot]))
    assert torch.equal(cache.view(torch.int16), before.view(torch.int16))


def test_paged_attention_refuses_block_ids_outside_the_cache():
    """Block-table entries a sequence reads must name blocks of the cache; the entries
    past its length (padding) are never read, so they may hold anything."""
    meta, kv, cached, (hq, hk, d) = _batch(torch.device("cpu"), BF16)
    write_kv_cpu(*_kv_rows(cached.numel(), hk, d, "cpu"), kv, cached)
    write_kv_cpu(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    blocks = kv.shape[0]
    last = -(-meta.seq_lens_host[0] // meta.block_size) - 1  # sequence 0's last block
    for bad in (blocks, -1):
        tables = meta.block_tables.clone()
        tables[0, last] = bad
        broken = dataclasses.replace(meta, block_tables=tables)
        broken.plan = plan_attention_torch(broken)
        with pytest.raises(IndexError, match=f"the layer's cache has {blocks} blocks"):
            paged_attention_cpu(q, kv, broken, d**-0.5)
    padded = dataclasses.replace(meta, block_tables=F.pad(meta.block_tables, (0, 2), value=-1))
    padded.plan = plan_attention_torch(padded)
    meta.plan = plan_attention_torch(meta)
    assert torch.equal(
        paged_attention_cpu(q, kv, padded, d**-0.5), paged_attention_cpu(q, kv, meta, d**-0.5)
    )
    short = dataclasses.replace(meta, block_tables=meta.block_tables[:, :1])
    with pytest.raises(IndexError, match="holds 1 a row"):
        plan_attention_torch(short)


def test_native_launchers_name_the_tensor_they_refuse():
    q = torch.randn(3, 64, 4).to(BF16).transpose(1, 2)  # heads strided, not packed
    cos = sin = torch.randn(3, 32)
    with pytest.raises(AssertionError, match=r"RoPE of \(3, 4, 64\) with strides \(256, 1, 4\)"):
        apply_rope_cpu(q, q, cos, sin)
    kv = torch.zeros(4, 2, 16, 4, 64, dtype=BF16)
    k = torch.randn(3, 4, 128).to(BF16)[..., :64]  # head_dim sliced: heads 128 apart
    with pytest.raises(AssertionError, match=r"k \(3, 4, 64\) has strides \(512, 128, 1\)"):
        write_kv_cpu(k, k, kv, torch.tensor([0, 1, 2]))


# (query heads, KV heads, head dim): the tests' default; SmolLM2's; a group of 6 (decode
# slices of 4 and 2, prefill tiles of 2 rows) with a head dim that ends in a half 16-wide
# chunk; no grouping (prefill tiles of 12 rows); a group of 16 (prefill slices of 12 and 4).
@pytest.mark.parametrize("heads", [(4, 2, 64), (9, 3, 64), (12, 2, 24), (3, 3, 16), (16, 1, 32)])
def test_paged_attention_runs_natively_on_a_mixed_batch(heads, monkeypatch):
    """Decode rows and prefill chunks (after a cached prefix, and whole prompts) in one
    native call, each row within one rounding of fp64 attention."""
    monkeypatch.setitem(test_paged_attention.HEADS, "cpu", heads)
    meta, kv, cached, (hq, hk, d) = _batch(torch.device("cpu"), BF16)
    assert (hq, hk, d) == heads
    assert 0 < meta.num_decodes < meta.batch_size
    write_kv_cpu(*_kv_rows(cached.numel(), hk, d, "cpu"), kv, cached)
    write_kv_cpu(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    meta.plan = plan_attention_torch(meta)
    with poisoned_outputs():
        out = get_backend("torch").paged_attention(q, kv, meta, d**-0.5)
    ref, size = _reference(q, kv, meta, d**-0.5, None)
    # fp32 throughout, one rounding to bf16 (the cache's NaN slots are never read).
    assert_within(out, ref, ROUND * size + 1e-6, "native paged attention")
    # The native call, not torch's SDPA, computed every row.
    assert torch.equal(out, paged_attention_cpu(q, kv, meta, d**-0.5))


def _alone(meta, b, row=None):
    """`meta` cut to sequence b (and, with `row`, to that row as a decode at its position)."""
    start, qlen, slen = int(meta.query_start_loc[b]), meta.query_lens_host[b], meta.seq_lens_host[b]
    rows = range(start, start + qlen) if row is None else range(start + row, start + row + 1)
    seen = slen if row is None else slen - qlen + row + 1
    q_len = len(rows)
    sub = dataclasses.replace(
        meta,
        slot_mapping=meta.slot_mapping[rows.start : rows.stop],
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32),
        seq_lens=torch.tensor([seen], dtype=torch.int32),
        block_tables=meta.block_tables[b : b + 1],
        num_decodes=int(q_len == 1),
        query_lens_host=[q_len],
        seq_lens_host=[seen],
        plan=None,
    )
    sub.plan = plan_attention_torch(sub)
    return sub, rows


@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 1, 32)])
def test_paged_attention_rows_are_computed_as_decodes(heads, monkeypatch):
    """Every row's result is the same bits as the decode step at its position computes,
    whatever it is batched or chunked with: what the batch-invariant engine relies on."""
    monkeypatch.setitem(test_paged_attention.HEADS, "cpu", heads)
    meta, kv, cached, (hq, hk, d) = _batch(torch.device("cpu"), BF16)
    write_kv_cpu(*_kv_rows(cached.numel(), hk, d, "cpu"), kv, cached)
    write_kv_cpu(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    meta.plan = plan_attention_torch(meta)
    batched = paged_attention_cpu(q, kv, meta, d**-0.5)
    for b in range(meta.batch_size):
        sub, rows = _alone(meta, b)
        alone = paged_attention_cpu(q[rows.start : rows.stop], kv, sub, d**-0.5)
        assert torch.equal(alone, batched[rows.start : rows.stop]), b
        for r in range(len(rows)):
            one, (i,) = _alone(meta, b, r)
            decode = paged_attention_cpu(q[i : i + 1], kv, one, d**-0.5)
            assert torch.equal(decode, batched[i : i + 1]), (b, r)


def _layout_in_subprocess(env, tmp_path):
    import os
    import subprocess
    import sys

    code = "from kernels.int4_linear import default_layout; print(default_layout('cpu'))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "BATON_CACHE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr


def test_switched_off_or_unbuildable_means_the_torch_paths(tmp_path):
    assert _layout_in_subprocess({"BATON_NATIVE_KERNELS": "0"}, tmp_path)[0] == "cpu"
    # A compiler that fails: a warning, the torch layout, and no half-built file left.
    layout, err = _layout_in_subprocess({"CXX": "/bin/false"}, tmp_path)
    assert layout == "cpu" and "building the CPU kernels failed" in err
    assert list((tmp_path / "native").iterdir()) == []
    # A build is cached under a digest of its sources: a process that finds this session's
    # build (made on first use, as in every process) loads it without a compiler.
    assert native.lib() is not None
    built = native._target()
    shutil.copy(built, tmp_path / "native" / built.name)
    assert _layout_in_subprocess({"CXX": "/bin/false"}, tmp_path)[0] == "avx2"
