import dataclasses
import math

import pytest
import torch

from kernels import paged_prefill_gluon
from kernels.attention_metadata import AttentionMetadata
from kernels.paged_attention_triton import (
    MERGE_IN_KERNEL_MAX,
    _decode_splits,
    paged_attention,
    plan_attention,
    write_kv,
)
from kernels.triton_runtime import num_sms
from tests.kernels.bounds import FP8_ROUND, ROUND, assert_within, poisoned_outputs

FP8 = torch.float8_e4m3fn
# (seq_len, query_len) per sequence, decodes first: short, page-crossing, long decodes; a
# prefill chunk after a cached prefix; a fresh prompt; a chunk ending mid-page.
BATCH = {
    "cpu": [(1, 1), (37, 1), (300, 1), (50, 18), (20, 20), (45, 13)],
    "cuda": [(1, 1), (300, 1), (4100, 1), (777, 1), (1000, 200), (517, 517), (2048, 130)],
}
HEADS = {"cpu": (4, 2, 64), "cuda": (32, 8, 128)}


def _batch(device, kv_dtype, page=16, layers=2, spec=None, heads=None):
    spec = spec or BATCH[device.type]
    hq, hk, d = heads or HEADS[device.type]
    seq_lens = [s for s, _ in spec]
    q_lens = [q for _, q in spec]
    nd = sum(1 for q in q_lens if q == 1)
    pages_per_seq = [math.ceil(s / page) for s in seq_lens]
    num_pages = sum(pages_per_seq) + 5
    # Block-major cache across layers; every slot starts poisoned (NaN).
    cache = torch.full((num_pages, layers, 2, page, hk, d), float("nan"), device=device)
    cache = cache.to(kv_dtype)
    kv = cache[:, 1]
    order = torch.randperm(num_pages, device=device).int()
    tables = torch.zeros(len(spec), max(pages_per_seq), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(pages_per_seq):
        tables[b, :n] = order[used : used + n]
        used += n
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)

    def slots(b, positions):
        return [int(tables[b, p // page]) * page + p % page for p in positions]

    new = [x for b, (s, ql) in enumerate(spec) for x in slots(b, range(s - ql, s))]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(new, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        num_decodes=nd,
        block_size=page,
        query_lens_host=q_lens,
        seq_lens_host=seq_lens,
    )
    cached = torch.tensor(
        [x for b, (s, ql) in enumerate(spec) for x in slots(b, range(s - ql))], device=device
    )
    return meta, kv, cached, (hq, hk, d)


def _kv_rows(n, hk, d, device):
    return [torch.randn(n, hk, d, device=device).to(torch.bfloat16) for _ in range(2)]


def _reference(q, kv, meta, scale, kv_scales):
    """fp64 attention per sequence from the cache itself; returns (out, sum_j p_j |v_j|)."""
    hq, hk = q.shape[1], kv.shape[3]
    outs, sizes = [], []
    for b, (s, ql) in enumerate(zip(meta.seq_lens_host, meta.query_lens_host, strict=True)):
        pages = meta.block_tables[b, : math.ceil(s / meta.block_size)].long()
        k = kv[pages, 0].flatten(0, 1)[:s].double()
        v = kv[pages, 1].flatten(0, 1)[:s].double()
        if kv_scales is not None:
            k, v = k * kv_scales[0, :, None], v * kv_scales[1, :, None]
        k = k.repeat_interleave(hq // hk, dim=1).transpose(0, 1)  # [Hq, s, D]
        v = v.repeat_interleave(hq // hk, dim=1).transpose(0, 1)
        rows = q[int(meta.query_start_loc[b]) : int(meta.query_start_loc[b]) + ql]
        logits = rows.double().transpose(0, 1) @ k.transpose(1, 2) * scale
        visible = (
            torch.arange(s, device=q.device)[None, :]
            <= torch.arange(s - ql, s, device=q.device)[:, None]
        )
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append((p @ v).transpose(0, 1))
        sizes.append((p @ v.abs()).transpose(0, 1))
    return torch.cat(outs), torch.cat(sizes)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_write_kv_touches_exactly_its_slots(device, kv_dtype):
    meta, kv, _, (_, hk, d) = _batch(device, kv_dtype)
    k, v = _kv_rows(meta.num_tokens, hk, d, device)
    scales = torch.rand(2, hk, device=device) + 0.5 if kv_dtype == FP8 else None
    before = kv.clone()
    write_kv(k, v, kv, meta.slot_mapping, scales)
    bs = meta.block_size
    blocks, offs = meta.slot_mapping // bs, meta.slot_mapping % bs
    for i, x in enumerate((k, v)):
        got = kv[blocks, i, offs]
        if kv_dtype == FP8:
            want = x.double() / scales[i][:, None].double()
            assert_within(got, want, FP8_ROUND * want.abs() + 2**-9, "fp8 K/V")
        else:
            assert torch.equal(got, x)
    written = torch.zeros(kv.shape[0], kv.shape[2], dtype=torch.bool, device=device)
    written[blocks, offs] = True
    untouched = kv.transpose(1, 2)[~written]
    assert torch.equal(
        untouched.view(torch.uint8), before.transpose(1, 2)[~written].view(torch.uint8)
    )


# Pages smaller and larger than the interpreter's 16-key tiles, and several per GPU tile:
# prefill reads each key tile's page numbers one tile ahead of its K/V.
@pytest.mark.parametrize("page", [16, 8, 32])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_paged_attention_mixed_batch(device, kv_dtype, page):
    meta, kv, cached, (hq, hk, d) = _batch(device, kv_dtype, page)
    scales = torch.rand(2, hk, device=device) + 0.5 if kv_dtype == FP8 else None
    # The cached prefixes, then this step's new tokens, go in through the write kernel.
    write_kv(*_kv_rows(cached.numel(), hk, d, device), kv, cached, scales)
    write_kv(*_kv_rows(meta.num_tokens, hk, d, device), kv, meta.slot_mapping, scales)
    q = torch.randn(meta.num_tokens, hq, d, device=device).to(torch.bfloat16)
    meta.plan = plan_attention(meta)
    with poisoned_outputs():
        out = paged_attention(q, kv, meta, d**-0.5, scales)
    ref, size = _reference(q, kv, meta, d**-0.5, scales)
    # p is rounded to bf16 for the PV product, the output once more; fp32 elsewhere.
    assert_within(out, ref, 3 * ROUND * size + 1e-6, "paged attention")


# On Hopper a bf16 prefill runs the warp-specialized Gluon kernel, elsewhere the Triton one;
# both against the reference, with every unwritten slot NaN: the Gluon kernel's last key
# tile reads pages' tail slots (and page 0 past a table's end), whose V it must zero.
@pytest.mark.parametrize(
    ("page", "dtype", "heads"),
    [
        (16, torch.bfloat16, None),
        (8, torch.bfloat16, None),
        (32, torch.bfloat16, None),
        (16, torch.float16, None),
        (16, torch.bfloat16, (8, 2, 64)),  # head_dim 64, GQA 4
    ],
)
def test_prefill_runs_the_gluon_kernel_on_hopper(device, page, dtype, heads, monkeypatch):
    launches = []
    launch = paged_prefill_gluon.prefill_attention
    monkeypatch.setattr(
        paged_prefill_gluon, "prefill_attention", lambda *a: launches.append(1) or launch(*a)
    )
    meta, kv, cached, (hq, hk, d) = _batch(device, dtype, page, heads=heads)
    write_kv(*(x.to(dtype) for x in _kv_rows(cached.numel(), hk, d, device)), kv, cached, None)
    new_kv = (x.to(dtype) for x in _kv_rows(meta.num_tokens, hk, d, device))
    write_kv(*new_kv, kv, meta.slot_mapping, None)
    q = torch.randn(meta.num_tokens, hq, d, device=device).to(dtype)
    meta.plan = plan_attention(meta)
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    assert paged_prefill_gluon.supports(q, kv, meta.plan.block_m) == hopper
    ref, size = _reference(q, kv, meta, d**-0.5, None)
    for gluon in (True, False):
        meta.plan = dataclasses.replace(meta.plan, prefill_gluon=gluon)
        launches.clear()
        with poisoned_outputs():
            out = paged_attention(q, kv, meta, d**-0.5)
        assert_within(out, ref, 3 * ROUND * size + 1e-6, f"paged attention, gluon={gluon}")
        assert len(launches) == int(gluon and hopper)  # the Gluon kernel ran exactly there


def test_gluon_prefill_only_on_tested_triton_releases(caplog):
    """Gluon's API moves between Triton releases: an untested one keeps the Triton kernel."""
    paged_prefill_gluon.tested_triton.cache_clear()  # it warns once per version
    tested = paged_prefill_gluon.TRITON_RELEASES[0] + "0"
    assert paged_prefill_gluon.tested_triton(tested)
    with caplog.at_level("WARNING", logger=paged_prefill_gluon.__name__):
        assert not paged_prefill_gluon.tested_triton("9.9.0")
    assert "Triton 9.9.0 is not a release" in caplog.text


def test_decode_merges_many_splits_in_a_second_kernel(device):
    """One sequence, one KV head: more splits than the in-kernel merge takes."""
    hq, hk, d, page = 4, 1, 64, 16
    ctx = 600 if device.type == "cpu" else 16384
    pages = math.ceil(ctx / page)
    kv = torch.randn(pages, 2, page, hk, d, device=device).to(torch.bfloat16)
    tables = torch.randperm(pages, device=device).int()[None]
    meta = AttentionMetadata(
        torch.zeros(1, dtype=torch.int64, device=device),
        torch.tensor([0, 1], dtype=torch.int32, device=device),
        torch.tensor([ctx], dtype=torch.int32, device=device),
        tables,
        1,
        page,
        [1],
        [ctx],
    )
    meta.plan = plan_attention(meta)
    q = torch.randn(1, hq, d, device=device).to(torch.bfloat16)
    with poisoned_outputs():
        out = paged_attention(q, kv, meta, d**-0.5)
    ref, size = _reference(q, kv, meta, d**-0.5, None)
    assert_within(out, ref, 3 * ROUND * size + 1e-6, "decode merged by a second kernel")
    assert (
        _decode_splits(1, hk, ctx, num_sms(device), meta.plan.decode_block_n) > MERGE_IN_KERNEL_MAX
    )
