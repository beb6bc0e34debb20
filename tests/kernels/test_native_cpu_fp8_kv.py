"""The native CPU kernels over an FP8 (e4m3) KV cache (`kernels/cpu/kv_cache.cpp` and
`paged_attention.cpp`, launched with `kv_scales` by `kernels.paged_attention_cpu`) against
the torch reference (`kernels.kv_cache_fp8`) and float64. x86-64 only, as test_native_cpu
(tests/kernels/conftest.py)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import torch_backend
from kernels.attention_metadata import AttentionMetadata
from kernels.backend import get_backend
from kernels.kv_cache_fp8 import paged_attention_fp8_torch, write_kv_fp8_torch
from kernels.paged_attention import plan_attention_torch
from kernels.paged_attention_cpu import paged_attention_cpu, write_kv_cpu
from tests.kernels import test_paged_attention
from tests.kernels.bounds import ROUND, assert_within, poisoned_outputs
from tests.kernels.test_native_cpu import _alone
from tests.kernels.test_paged_attention import _batch, _kv_rows, _reference

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
CPU = torch.device("cpu")
ops = get_backend("torch")


def _scales(hk: int) -> torch.Tensor:
    """[2, hk] powers of two in 2^-6 .. 2^3 as engine.kv_scales calibrates them, never 1
    (which would hide a scale the kernel forgets)."""
    powers = torch.randint(-6, 3, (2, hk))
    return torch.exp2(powers + (powers >= 0).long()).float()


def _wide_rows(n: int, hk: int, d: int) -> list[torch.Tensor]:
    """K and V rows of magnitudes spread over about 2^-16 .. 2^5: under the scales above they
    cache as e4m3 subnormals, normals and saturated +-448 alike."""
    return [
        (torch.randn(n, hk, d) * torch.exp2(torch.randint(-14, 4, (n, hk, d)).float())).to(BF16)
        for _ in range(2)
    ]


def _dequantized(kv: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp8 cache as bf16 values: exact, e4m3 codes times powers of two."""
    return (kv.float() * scales[None, :, None, :, None]).to(BF16)


# (query heads, KV heads, head dim) as test_native_cpu's mixed batch: the tests' default;
# SmolLM2's; decode slices of 4 and 2 and a half 16-wide chunk; prefill tiles of 12 rows;
# prefill slices of 12 and 4.
@pytest.mark.parametrize("heads", [(4, 2, 64), (9, 3, 64), (12, 2, 24), (3, 3, 16), (16, 1, 32)])
def test_fp8_paged_attention_runs_natively_on_a_mixed_batch(heads, monkeypatch):
    """Decode rows and prefill chunks (after a cached prefix, and whole prompts) through
    the backend's fp8 ops: written and attended natively, each row within one rounding of
    fp64 attention, and bit for bit the bf16 kernel over the dequantized cache (the scales
    fold in exactly)."""
    monkeypatch.setitem(test_paged_attention.HEADS, "cpu", heads)
    for name in ("write_kv_fp8_torch", "paged_attention_fp8_torch"):
        monkeypatch.setattr(torch_backend, name, lambda *a: pytest.fail("took the torch path"))
    meta, kv, cached, (hq, hk, d) = _batch(CPU, FP8)
    assert 0 < meta.num_decodes < meta.batch_size
    # Holes: every table runs past its sequence into ids no block has.
    meta.block_tables = F.pad(meta.block_tables, (0, 2), value=-1)
    scales = _scales(hk)
    ops.write_kv_fp8(*_wide_rows(cached.numel(), hk, d), kv, cached, scales)
    ops.write_kv_fp8(*_wide_rows(meta.num_tokens, hk, d), kv, meta.slot_mapping, scales)
    q = (torch.randn(meta.num_tokens, hq, d) * 4).to(BF16)
    ops.plan_attention(meta)
    with poisoned_outputs():
        out = ops.paged_attention_fp8(q, kv, meta, d**-0.5, scales)
    ref, size = _reference(q, kv, meta, d**-0.5, scales)
    assert_within(out, ref, ROUND * size + 1e-6, "native fp8 paged attention")
    assert torch.equal(out, paged_attention_cpu(q, _dequantized(kv, scales), meta, d**-0.5))
    reference = paged_attention_fp8_torch(q, kv, meta, d**-0.5, scales)
    assert_within(out, reference.double(), 3 * ROUND * size + 1e-6, "against the torch path")


def test_every_e4m3_code_reads_as_its_value():
    """A lone key weighs its value row by exactly 1: the output is the row's codes times
    the V scale, for every code but the two NaNs (which writes never produce)."""
    hq, hk, d, page = 2, 1, 256, 16
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes[[0x7F, 0xFF]] = 0
    kv = torch.zeros(3, 2, page, hk, d, dtype=torch.uint8)
    kv[2, :, 0, 0] = codes  # K and V of the sequence's one token: block 2, slot 0
    kv = kv.view(FP8)
    scales = torch.tensor([[2.0**-5], [2.0**-3]])
    meta = AttentionMetadata(
        torch.tensor([2 * page]),
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([1], dtype=torch.int32),
        torch.tensor([[2]], dtype=torch.int32),
        1,
        page,
        [1],
        [1],
    )
    meta.plan = plan_attention_torch(meta)
    out = paged_attention_cpu(torch.randn(1, hq, d).to(BF16), kv, meta, 0.5, kv_scales=scales)
    value = codes.view(FP8).float() * 2.0**-3
    assert torch.equal(out[0], value.to(BF16).expand(hq, d))


@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 1, 32)])
def test_fp8_rows_are_computed_as_decodes(heads, monkeypatch):
    """As test_native_cpu's bf16 property, under scales that are not powers of two."""
    monkeypatch.setitem(test_paged_attention.HEADS, "cpu", heads)
    meta, kv, cached, (hq, hk, d) = _batch(CPU, FP8)
    scales = torch.rand(2, hk) + 0.5
    write_kv_cpu(*_kv_rows(cached.numel(), hk, d, "cpu"), kv, cached, scales)
    write_kv_cpu(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping, scales)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    meta.plan = plan_attention_torch(meta)
    batched = paged_attention_cpu(q, kv, meta, d**-0.5, kv_scales=scales)
    for b in range(meta.batch_size):
        sub, rows = _alone(meta, b)
        alone = paged_attention_cpu(q[rows.start : rows.stop], kv, sub, d**-0.5, kv_scales=scales)
        assert torch.equal(alone, batched[rows.start : rows.stop]), b
        for r in range(len(rows)):
            one, (i,) = _alone(meta, b, r)
            decode = paged_attention_cpu(q[i : i + 1], kv, one, d**-0.5, kv_scales=scales)
            assert torch.equal(decode, batched[i : i + 1]), (b, r)


@pytest.mark.parametrize(
    "scales",
    [[[1.0, 2.0**-3], [2.0**5, 0.75]], [[1.5, 2.0**-20], [2.0**20, 3.0]]],
    ids=["calibrated-like", "extreme"],
)
def test_fp8_write_is_the_torch_writes_bytes_for_every_bf16(scales):
    """Every bf16 value (zeros of both signs, subnormals, infinities, NaNs) into K and V
    rows strided as the fused QKV output's, under per-head scales: the cache's bytes equal
    the torch path's, the slots not written included."""
    hk, d, page = 2, 64, 16
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(BF16)
    fused = torch.cat([every.view(-1, hk * d), every.flip(0).view(-1, hk * d)], dim=1)
    k, v = (x.view(-1, hk, d) for x in fused.split(hk * d, dim=1))
    tokens = k.shape[0]
    blocks = tokens // page + 3
    cache = torch.randint(0, 256, (blocks, 2, 2, page, hk, d), dtype=torch.uint8).view(FP8)
    kv = cache[:, 1]  # layer 1 of 2: strided blocks
    expected = cache.clone()
    slots = torch.randperm(blocks * page)[:tokens]
    s = torch.tensor(scales)
    write_kv_fp8_torch(k, v, expected[:, 1], slots, s)
    write_kv_cpu(k, v, kv, slots, s)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def test_fp8_launchers_refuse_slots_and_blocks_outside_the_layer():
    """As the bf16 launchers: a slot past the layer's blocks would land in the next
    layer's, a block id past the cache would be read from outside it."""
    meta, kv, cached, (hq, hk, d) = _batch(CPU, FP8)  # layer 1 of 2
    scales = _scales(hk)
    k, v = _kv_rows(1, hk, d, "cpu")
    capacity = kv.shape[0] * kv.shape[2]
    cache = torch.tensor([], dtype=torch.uint8).set_(kv.untyped_storage())  # every layer
    before = cache.clone()
    for slot in (capacity, -1):
        with pytest.raises(IndexError, match=rf"slots in \[{slot}, {slot}\]; the layer's cache "):
            write_kv_cpu(k, v, kv, torch.tensor([slot]), scales)
    assert torch.equal(cache, before)
    write_kv_cpu(*_kv_rows(cached.numel(), hk, d, "cpu"), kv, cached, scales)
    write_kv_cpu(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping, scales)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    last = -(-meta.seq_lens_host[0] // meta.block_size) - 1  # sequence 0's last block
    for bad in (kv.shape[0], -1):
        tables = meta.block_tables.clone()
        tables[0, last] = bad
        broken = dataclasses.replace(meta, block_tables=tables)
        broken.plan = plan_attention_torch(broken)
        with pytest.raises(IndexError, match=f"the layer's cache has {kv.shape[0]} blocks"):
            paged_attention_cpu(q, kv, broken, d**-0.5, kv_scales=scales)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_fp8_launchers_refuse_bad_scales_and_write_nothing(bad):
    meta, kv, _, (hq, hk, d) = _batch(CPU, FP8)
    scales = torch.ones(2, hk)
    scales[1, 0] = bad
    before = kv.view(torch.uint8).clone()
    refused = rf"FP8 KV scales must be finite and positive, got \[\[1.0, 1.0\], \[{bad}, 1.0\]\]"
    with pytest.raises(ValueError, match=refused):
        ops.write_kv_fp8(*_kv_rows(meta.num_tokens, hk, d, "cpu"), kv, meta.slot_mapping, scales)
    assert torch.equal(kv.view(torch.uint8), before)
    ops.plan_attention(meta)
    q = torch.randn(meta.num_tokens, hq, d).to(BF16)
    with pytest.raises(ValueError, match=refused):
        ops.paged_attention_fp8(q, kv, meta, d**-0.5, scales)


def test_an_empty_fp8_step_writes_and_attends_to_nothing():
    kv = torch.zeros(4, 2, 8, 2, 32, dtype=FP8)
    scales = torch.ones(2, 2)
    empty = torch.empty(0, 2, 32, dtype=BF16)
    ops.write_kv_fp8(empty, empty, kv, torch.empty(0, dtype=torch.long), scales)
    none = torch.empty(0, dtype=torch.int32)
    meta = AttentionMetadata(
        torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32), none,
        torch.empty(0, 1, dtype=torch.int32), 0, 8, [], [],
    )  # fmt: skip
    ops.plan_attention(meta)
    q = torch.empty(0, 4, 32, dtype=BF16)
    assert ops.paged_attention_fp8(q, kv, meta, 0.125, scales).shape == (0, 4, 32)
    assert not kv.float().any()
