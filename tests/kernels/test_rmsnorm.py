import pytest
import torch

from kernels.rmsnorm import rms_norm_torch
from kernels.rmsnorm_triton import rms_norm, rms_norm_fp8
from tests.kernels.bounds import INTERPRET, ROUND, assert_within, fp8_bound, poisoned_outputs


def _inputs(device, hidden, residual):
    t = 7 if device.type == "cpu" else 300
    x = torch.randn(t, hidden, device=device).to(torch.bfloat16)
    x[1] *= 40  # rows of very different scale
    w = (torch.rand(hidden, device=device) + 0.5).to(torch.bfloat16)
    r = torch.randn(t, hidden, device=device).to(torch.bfloat16) if residual else None
    return x, w, r


def _reference(x, w, r, eps):
    s = x.double() if r is None else (x.double() + r.double())
    s_bf16 = s.to(torch.bfloat16)  # the sum is rounded to the activation dtype first
    h = s_bf16.double() * torch.rsqrt(s_bf16.double().pow(2).mean(-1, keepdim=True) + eps)
    return h * w.double(), s


@pytest.mark.parametrize("hidden", [200, 576, 4096])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_fp64(device, hidden, residual):
    x, w, r = _inputs(device, hidden, residual)
    with poisoned_outputs():
        out, summed = rms_norm(x, w, 1e-5, r)
    ref, s = _reference(x, w, r, 1e-5)
    # Two roundings (normalized value, then times the weight) plus fp32 reduction slack;
    # the interpreter may also round the residual sum the other way (it truncates).
    roundings = 3 if INTERPRET and residual else 2
    assert_within(out, ref, (roundings * ROUND + 1e-5) * ref.abs(), "rms_norm")
    if r is None:
        assert summed is x
    elif INTERPRET:
        assert_within(summed, s, ROUND * s.abs(), "residual sum")
    else:
        assert torch.equal(summed, x + r), "the residual sum must round exactly like torch"


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_fp8_quantizes_the_rounded_output(device, residual):
    x, w, r = _inputs(device, 576, residual)
    with poisoned_outputs():
        q, scale, summed = rms_norm_fp8(x, w, 1e-5, r)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (x.shape[0], 1)
    y, _ = rms_norm_torch(x, w, 1e-5, r)
    amax = y.double().abs().amax(-1, keepdim=True)
    assert_within(scale, amax / 448, 2 * ROUND * amax / 448, "scale = amax / 448")
    # The kernel's y may differ from torch's by one bf16 rounding.
    bound = fp8_bound(y, scale, y_slack=ROUND)
    assert_within(q.double() * scale.double(), y.double(), bound, "q * scale")
    if r is not None:
        s = x.double() + r.double()
        assert_within(summed, s, ROUND * s.abs(), "residual sum")
