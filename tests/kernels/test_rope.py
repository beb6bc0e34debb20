import pytest
import torch

from kernels.paged_attention_triton import write_kv
from kernels.rope_triton import apply_rope, apply_rope_write_kv
from tests.kernels.bounds import INTERPRET, ROUND, assert_within, poisoned_outputs


def _reference(x, cos, sin):
    c = cos.to(torch.bfloat16).double()[:, None]  # cos/sin are rounded to the model dtype
    s = sin.to(torch.bfloat16).double()[:, None]
    x1, x2 = x.double().chunk(2, dim=-1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    terms = torch.cat(
        (x1.abs() * c.abs() + x2.abs() * s.abs(), x2.abs() * c.abs() + x1.abs() * s.abs()), dim=-1
    )
    return out, terms


@pytest.mark.parametrize("heads", [(4, 2, 64), (9, 3, 64), (32, 8, 128)])
def test_rope_on_views_of_fused_qkv(device, heads):
    hq, hk, d = heads
    t = 5 if device.type == "cpu" else 257
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device).to(torch.bfloat16)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    pos = torch.randint(0, 32768, (t,), device=device).double()
    inv_freq = 500000.0 ** (-torch.arange(0, d, 2, device=device).double() / d)
    angles = pos[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    with poisoned_outputs():
        q_out, k_out = apply_rope(q, k, cos, sin)
    for out, x, name in ((q_out, q, "q"), (k_out, k, "k")):
        ref, terms = _reference(x, cos, sin)
        assert out.shape == x.shape and out.is_contiguous()
        # One rounding; the interpreter truncates cos/sin where torch rounds them to nearest
        # (a whole ulp plus half of one apart at worst).
        slack = 2 * ROUND if INTERPRET else 2**-22
        assert_within(out, ref, ROUND * ref.abs() + slack * terms, f"rope {name}")


def test_rope_write_kv_is_rope_then_write_kv(device):
    """The fused launch equals `apply_rope` then `write_kv` bit for bit: the same q, the
    rotated k and v in their slots, every other cache byte untouched."""
    hq, hk, d = (4, 2, 64) if device.type == "cpu" else (32, 8, 128)
    t, page, pages = (5, 8, 6) if device.type == "cpu" else (131, 16, 40)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device).to(torch.bfloat16)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=1))
    angles = torch.rand(t, d // 2, device=device).double() * 100
    cos, sin = angles.cos().float(), angles.sin().float()
    # Block-major over 2 layers, as the engine's cache; layer 1's view; poisoned slots.
    cache = torch.randn(pages, 2, 2, page, hk, d, device=device).to(torch.bfloat16)
    kv = cache[:, 1]
    slots = torch.randperm(pages * page, device=device)[:t]
    expected = cache.clone()
    want_q, want_k = apply_rope(q, k, cos, sin)
    write_kv(want_k, v, expected[:, 1], slots)
    with poisoned_outputs():
        got_q = apply_rope_write_kv(q, k, v, cos, sin, kv, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))
