"""engine.quant: FP8 per-channel, INT4 round-to-nearest, AWQ, SmoothQuant, scaling a
checkpoint, and the registered formats."""

import pytest
import torch

from engine.linear import Linear, linear_format
from engine.quant.awq import ActivationStats, search_clip, search_scales
from engine.quant.fp8 import quantize_fp8_per_channel
from engine.quant.gptq import gptq_int4
from engine.quant.int4 import Int4Groups, quantize_int4
from engine.quant.smooth import smooth_scales
from kernels.backend import get_backend
from kernels.fp8_linear import quantize_fp8_torch
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


@pytest.mark.parametrize("quantizer", ["rtn", "awq_clip", "gptq"])
def test_int4_groups_of_one_sign_keep_their_values(quantizer):
    """The grid's zero point is an integer in [0, 15], so each group's range takes in 0:
    a group of one sign (or a constant one) is then reached to within half a step of
    max|w| / 15, by every quantizer that uses the grid."""
    k = 128
    w = torch.stack(
        [
            torch.full((k,), 0.5),
            torch.full((k,), -0.5),
            1.0 + 0.1 * torch.rand(k),
            -1.0 - 0.1 * torch.rand(k),
        ]
    )
    if quantizer == "rtn":
        groups = quantize_int4(w)
    elif quantizer == "awq_clip":
        groups = quantize_int4(w, ratios=search_clip(w, torch.randn(64, k)))
    else:  # uncorrelated inputs: GPTQ leaves each column as round-to-nearest would
        groups = gptq_int4(w, torch.eye(k))
    step = w.double().abs().amax(1, keepdim=True) / 15
    assert_within(groups.dequantize(), w.double(), (0.5 + 15 * 2**-8) * step, quantizer)


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
    s = search_scales([w], stats)
    assert s.shape == (k,) and bool((s > 0).all())
    ratios = search_clip(w * s, stats.sample / s)
    ref = held_out @ w.T
    err_rtn = (held_out @ quantize_int4(w).dequantize().T - ref).pow(2).mean()
    err_awq = (
        (held_out / s @ quantize_int4(w * s, ratios=ratios).dequantize().T - ref).pow(2).mean()
    )
    assert err_awq < 0.7 * err_rtn, (float(err_awq), float(err_rtn))


def test_clip_search_never_worse_than_no_clip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen)
    w[:, 0] = 8.0  # an outlier weight stretches its group's range
    x = torch.randn(64, 128, generator=gen)
    ratios = search_clip(w, x)
    assert ratios.shape == (32, 1) and bool((ratios <= 1).all())
    err = lambda r: (x @ (quantize_int4(w, ratios=r).dequantize() - w).T).pow(2).mean()  # noqa: E731
    assert err(ratios) <= err(None)
    assert float(ratios[:, 0].min()) < 1  # the outlier's groups are clipped


def test_activation_stats_track_the_channel_maximum():
    stats = ActivationStats(3)
    stats.observe(torch.tensor([[1.0, -5.0, 0.0]]))
    stats.observe(torch.tensor([[-2.0, 4.0, 0.0]]))
    assert torch.equal(stats.max_abs, torch.tensor([2.0, 5.0, 0.0]))


def test_smoothing_lowers_the_fp8_output_error_on_outlier_channels():
    gen = torch.Generator().manual_seed(2)
    k, n = 256, 64
    calib, held_out = _outlier_activations(512, k, gen), _outlier_activations(256, k, gen)
    calib[:, 3] *= 300  # one channel far beyond the others: the others' tokens go subnormal
    held_out[:, 3] *= 300
    w = torch.randn(n, k, generator=gen) * 0.02
    stats = ActivationStats(k)
    stats.observe(calib)
    s = smooth_scales([w], stats)

    def err(x: torch.Tensor, v: torch.Tensor) -> float:
        xq, xs = quantize_fp8_torch(x)
        q, scale = quantize_fp8_per_channel(v)
        y = (xq.float() * xs) @ (q.float() * scale[:, None]).T
        return float((y - held_out @ w.T).pow(2).mean())

    assert not torch.equal(s, torch.ones(k))
    assert err(held_out / s, w * s) < 0.7 * err(held_out, w)


def test_int4_groups_are_served_as_they_are():
    ops = get_backend("torch")
    gen = torch.Generator().manual_seed(3)
    parts = [quantize_int4(torch.randn(16, 576, generator=gen)) for _ in range(2)]
    merged = Int4Groups.cat(parts)
    assert merged.shape == (32, 576) and merged.group_size == 64
    linear = Linear(merged, None, linear_format("int4"), ops, torch.bfloat16, "cpu")
    x = torch.randn(3, 576, generator=gen).to(torch.bfloat16)
    ref = x.double() @ merged.dequantize().double().T
    rel = float((linear(x).double() - ref).norm() / ref.norm())
    assert rel < 0.02, rel  # the activations' int8 rounding in the native kernel, bf16 out
    with pytest.raises(ValueError, match="quantized as int4 ahead of time"):
        Linear(merged, None, linear_format("fp8"), ops, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="scales and zeros of shape"):
        Int4Groups(merged.q, merged.scales[:, :3], merged.zeros, 64)


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
