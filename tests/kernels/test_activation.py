import pytest
import torch

from kernels.activation import silu_and_mul_torch
from kernels.activation_triton import silu_and_mul, silu_and_mul_fp8
from tests.kernels.bounds import ROUND, assert_within, fp8_bound, poisoned_outputs


def _gate_up(device, inter):
    t = 6 if device.type == "cpu" else 300
    x = (torch.randn(t, 2 * inter, device=device) * 3).to(torch.bfloat16)
    return x[:, : 2 * inter]


@pytest.mark.parametrize("inter", [300, 1536, 14336])
def test_silu_and_mul_matches_fp64(device, inter):
    x = _gate_up(device, inter)
    with poisoned_outputs():
        out = silu_and_mul(x)
    g, u = x.double().chunk(2, dim=-1)
    ref = g * torch.sigmoid(g) * u
    # silu is rounded to bf16 before the product, as in torch; fp32 exp is ~1e-7 off.
    assert_within(out, ref, (2 * ROUND + 1e-6) * ref.abs(), "silu_and_mul")


@pytest.mark.parametrize("inter", [300, 14336])
def test_silu_and_mul_fp8(device, inter):
    x = _gate_up(device, inter)
    with poisoned_outputs():
        q, scale = silu_and_mul_fp8(x)
    y = silu_and_mul_torch(x)
    amax = y.double().abs().amax(-1, keepdim=True)
    assert_within(scale, amax / 448, 2 * ROUND * amax / 448, "scale")
    bound = fp8_bound(y, scale, y_slack=ROUND)
    assert_within(q.double() * scale.double(), y.double(), bound, "q * scale")
