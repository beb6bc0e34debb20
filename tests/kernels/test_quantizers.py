"""engine.quant: FP8 per-channel, INT4 round-to-nearest, AWQ, and the registered formats."""

import pytest
import torch

from engine.linear import Linear, linear_format
from engine.quant.awq import ActivationStats, awq_transform, clip_groups, search_clip
from engine.quant.fp8 import quantize_fp8_per_channel
from engine.quant.int4 import quantize_int4
from kernels.backend import get_backend
from tests.kernels.bounds import FP8_ROUND, FP8_SUBNORMAL, assert_within


def _outlier_activations(rows, k, gen=None):
    x = torch.randn(rows, k, generator=gen)
    x[:, :: k // 8] *= 30  # a few input channels carry much larger activations
    return x


def test_fp8_per_channel_scales_and_rounding():
    w = torch.randn(96, 200)
    w[5] *= 1e-3  # a channel at a very different scale keeps its own precision
    q, scale = quantize_fp8_per_channel(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96,)
    amax = w.abs().amax(1)
    assert_within(scale, amax.double() / 448, 1e-7 * amax.double(), "scale")
    deq = q.double() * scale.double()[:, None]
    bound = FP8_ROUND * w.double().abs() + FP8_SUBNORMAL * scale.double()[:, None]
    assert_within(deq, w.double(), bound, "q * scale")


@pytest.mark.parametrize("k", [576, 1024])
def test_int4_rtn_groups(k):
    w = torch.randn(48, k) * 0.05
    w[:, 7] = 0.0
    groups = quantize_int4(w)
    g = 64 if k == 576 else 128
    assert groups.group_size == g and groups.scales.shape == (48, k // g)
    assert groups.q.dtype == torch.uint8 and int(groups.q.max()) <= 15
    z = groups.zeros.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    s = groups.scales.float().repeat_interleave(g, 1)
    # Half a step of rounding, plus the bf16 rounding of the scale over at most 15 steps.
    assert_within(groups.dequantize(), w.double(), (0.5 + 15 * 2**-8) * s.double(), "RTN")


def test_int4_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(torch.zeros(4))
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_int4(torch.zeros(16, 96))


def test_activation_stats_sample_spans_all_batches():
    stats = ActivationStats(4, max_rows=8)
    for i in range(10):
        stats.observe(torch.full((3, 4), float(i)))
    assert stats.num_rows == 30
    assert torch.allclose(stats.mean_abs, torch.full((4,), 4.5))
    rows = stats.sample[:, 0].tolist()
    assert len(rows) <= 8 and rows[0] == 0 and rows[-1] >= 7, rows  # early and late batches


def test_awq_beats_rtn_on_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    k, n = 256, 96
    calib = _outlier_activations(512, k, gen)
    held_out = _outlier_activations(256, k, gen)
    w = torch.randn(n, k, generator=gen) * 0.02
    stats = ActivationStats(k)
    stats.observe(calib)
    (w_awq,), s = awq_transform([w], stats)
    assert s.shape == (k,) and bool((s > 0).all())
    ref = held_out @ w.T
    err_rtn = (held_out @ quantize_int4(w).dequantize().T - ref).pow(2).mean()
    err_awq = (held_out / s @ quantize_int4(w_awq).dequantize().T - ref).pow(2).mean()
    assert err_awq < 0.7 * err_rtn, (float(err_awq), float(err_rtn))


def test_clip_search_never_worse_than_no_clip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen)
    w[:, 0] = 8.0  # an outlier weight stretches its group's range
    x = torch.randn(64, 128, generator=gen)
    ratios = search_clip(w, x)
    assert ratios.shape == (32, 1) and bool((ratios <= 1).all())
    err = lambda v: (x @ (quantize_int4(v).dequantize() - w).T).pow(2).mean()  # noqa: E731
    assert err(clip_groups(w, ratios)) <= err(w)


@pytest.mark.parametrize("name", ["fp8", "int4"])
def test_registered_formats_on_cpu(name):
    ops = get_backend("torch")
    w = torch.randn(96, 576) * 0.05
    bias = torch.randn(96).to(torch.bfloat16)
    x = torch.randn(5, 576).to(torch.bfloat16)
    linear = Linear(w, bias, linear_format(name), ops, torch.bfloat16, "cpu")
    out = linear(x)
    assert out.shape == (5, 96) and out.dtype == torch.bfloat16
    ref = x.double() @ w.double().T + bias.double()
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < (0.04 if name == "fp8" else 0.12), rel
