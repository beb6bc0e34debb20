"""`rope_attention`: a layer's attention from its unrotated projections. In a decode-only
step the Triton decode kernel rotates q and k and writes the new K/V itself (one launch
for two, or for three over an fp8 cache); otherwise RoPE + KV write, then attention."""

import pytest
import torch

from kernels.backend import get_backend
from kernels.paged_attention_triton import can_fuse_rope, paged_attention, plan_attention, write_kv
from kernels.rope_triton import apply_rope_write_kv
from tests.kernels.bounds import ROUND, assert_within, poisoned_outputs
from tests.kernels.test_paged_attention import _batch, _kv_rows, _reference

# Decodes only: one key, a page boundary each side, a long one (several splits) and one
# whose new token opens a page.
DECODES = {
    "cpu": [(1, 1), (16, 1), (17, 1), (300, 1), (129, 1)],
    "cuda": [(1, 1), (300, 1), (4100, 1), (777, 1), (2049, 1)],
}


FP8 = torch.float8_e4m3fn


def _scales(kv, device):
    """Powers of two for an fp8 cache (the engine's kind: dividing by one is exact), else
    None."""
    if kv.dtype != FP8:
        return None
    return 2.0 ** torch.randint(-3, 2, (2, kv.shape[3]), device=device).float()


def _step(device, spec, kv_dtype=torch.bfloat16):
    meta, kv, cached, (hq, hk, d) = _batch(device, kv_dtype, spec=spec)
    write_kv(*_kv_rows(cached.numel(), hk, d, device), kv, cached, _scales(kv, device))
    t = meta.num_tokens
    # q, k, v as the model hands them over: strided views of one fused projection.
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device).to(torch.bfloat16)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    lengths = zip(meta.seq_lens_host, meta.query_lens_host, strict=True)
    positions = [s - ql + i for s, ql in lengths for i in range(ql)]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=device).float() / d)
    angles = torch.tensor(positions, device=device).float()[:, None] * inv_freq[None, :]
    meta.plan = plan_attention(meta)
    return meta, kv, (q, k, v, angles.cos(), angles.sin()), d


def _two_ops(meta, kv, q, k, v, cos, sin, d):
    q_rot = apply_rope_write_kv(q, k, v, cos, sin, kv, meta.slot_mapping)
    return q_rot, paged_attention(q_rot, kv, meta, d**-0.5)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_decode_step_rotates_writes_and_attends_in_one_kernel(device, kv_dtype):
    """Over an fp8 cache the new K/V are cached as `write_kv` caches them (divided by
    their head's scale, e4m3) and attended as a later step reads them back."""
    meta, kv, (q, k, v, cos, sin), d = _step(device, DECODES[device.type], kv_dtype)
    scales = _scales(kv, device)
    assert can_fuse_rope(q, kv, meta)
    triton = get_backend("triton")
    fused_kv, unfused_kv = kv.clone(), kv.clone()
    with poisoned_outputs():
        out = triton.rope_attention(q, k, v, cos, sin, fused_kv, meta, d**-0.5, scales)
    if scales is None:
        q_rot, _ = _two_ops(meta, unfused_kv, q, k, v, cos, sin, d)
    else:
        q_rot, k_rot = triton.apply_rope(q, k, cos, sin)
        triton.write_kv_fp8(k_rot, v, unfused_kv, meta.slot_mapping, scales)
    # The cache: the new V rows exactly, the new K rows rotated alike (the same fp32
    # rotation, one rounding; a fused multiply-add may round one ulp apart, so one e4m3
    # step apart once cached), the rest untouched (the poisoned free slots too).
    bs = meta.block_size
    blocks, offs = meta.slot_mapping // bs, meta.slot_mapping % bs
    new_v = fused_kv[blocks, 1, offs].view(torch.uint8)
    assert torch.equal(new_v, unfused_kv[blocks, 1, offs].view(torch.uint8))
    want_k = unfused_kv[blocks, 0, offs].double()
    ulp = ROUND * want_k.abs() if scales is None else 2**-3 * want_k.abs() + 2**-9
    assert_within(fused_kv[blocks, 0, offs], want_k, ulp, "rotated new K")
    new = torch.zeros(kv.shape[0], kv.shape[2], dtype=torch.bool, device=device)
    new[blocks, offs] = True
    old = fused_kv.transpose(1, 2)[~new].view(torch.uint8)
    assert torch.equal(old, kv.transpose(1, 2)[~new].view(torch.uint8))
    # The attention over that cache, against fp64 from the unfused path's rotated q (which
    # may sit an ulp from the kernel's own).
    ref, size = _reference(q_rot, fused_kv, meta, d**-0.5, scales)
    assert_within(out, ref, 4 * ROUND * size + ROUND * ref.abs() + 1e-6, "fused decode")


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8])
def test_steps_with_prefill_rows_take_the_two_ops(device, kv_dtype):
    meta, kv, (q, k, v, cos, sin), d = _step(device, None, kv_dtype)  # decodes and prefills
    scales = _scales(kv, device)
    assert not can_fuse_rope(q, kv, meta)
    triton = get_backend("triton")
    ours_kv, two_kv = kv.clone(), kv.clone()
    out = triton.rope_attention(q, k, v, cos, sin, ours_kv, meta, d**-0.5, scales)
    if scales is None:
        _, want = _two_ops(meta, two_kv, q, k, v, cos, sin, d)
    else:  # RoPE, the scaled write, attention: three launches
        q_rot, k_rot = triton.apply_rope(q, k, cos, sin)
        triton.write_kv_fp8(k_rot, v, two_kv, meta.slot_mapping, scales)
        want = triton.paged_attention_fp8(q_rot, two_kv, meta, d**-0.5, scales)
    assert torch.equal(out, want)
    assert torch.equal(ours_kv.view(torch.uint8), two_kv.view(torch.uint8))
