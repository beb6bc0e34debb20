import pytest
import torch

from engine.linear import linear_format
from engine.quant.fp8 import Fp8Channels, quantize_fp8_per_channel
from kernels.backend import get_backend
from kernels.fp8_linear import FP8_DTYPE, FP8_MAX, make_fp8_weight, quantize_fp8_torch
from kernels.fp8_linear_triton import Fp8GemmConfig, fp8_gemm, fp8_linear, quantize_fp8
from tests.kernels.bounds import (
    FP8_ROUND,
    FP8_SUBNORMAL,
    INTERPRET,
    ROUND,
    assert_within,
    poisoned_outputs,
)
from tests.kernels.conftest import DEVICE


def _weight(n, k, device):
    w = torch.randn(n, k, device=device) * 0.05
    w[:, 3] *= 30  # an outlier input channel
    scale = w.abs().amax(1) / FP8_MAX
    return make_fp8_weight((w / scale[:, None]).to(FP8_DTYPE), scale, device)


def test_quantize_fp8_per_token(device):
    k = 300 if device.type == "cpu" else 4096
    x = torch.randn(6, k, device=device)
    x[1] *= 1e3
    x[2] = 0
    x[3, 7] = 5e4  # one outlier dominates its row's scale
    x = x.to(torch.bfloat16)
    with poisoned_outputs():
        q, scale = quantize_fp8(x)
    amax = x.double().abs().amax(-1, keepdim=True).clamp_min(1e-12)
    assert_within(scale, amax / FP8_MAX, 1e-7 * amax, "scale = amax / 448")
    bound = FP8_ROUND * x.double().abs() + FP8_SUBNORMAL * scale.double()
    assert_within(q.double() * scale.double(), x.double(), bound, "q * scale")
    assert torch.equal(q[2].float(), torch.zeros(k, device=device)), "a zero row stays zero"
    assert q.float().abs().max() <= FP8_MAX


SHAPES = {
    "cpu": [(33, 48, 192), (7, 32, 96), (1, 16, 64)],
    "cuda": [(300, 384, 512), (64, 256, 4096), (1, 128, 576), (4096, 512, 1024)],
}


# Interpreter-sized cases in CI, GPU-sized ones on a GPU (conftest.DEVICE).
@pytest.mark.parametrize("case", range(len(SHAPES[DEVICE.type])))
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemm_matches_fp64(device, case, with_bias):
    m, n, k = SHAPES[device.type][case]
    weight = _weight(n, k, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    xq, xs = quantize_fp8_torch(x)
    bias = torch.randn(n, device=device).to(torch.bfloat16) if with_bias else None
    prod = (xq.double() @ weight.data.double().T) * xs.double() * weight.scale.double()
    ref = prod + (bias.double() if with_bias else 0)
    size = (xq.double().abs() @ weight.data.double().abs().T) * xs.double() * weight.scale.double()
    configs = [None] if INTERPRET else [None, Fp8GemmConfig(64, 64, 64, 4, 4, 3, False)]
    # The interpreter accumulates in fp32. Hopper's fast FP8 accumulation keeps about 13
    # mantissa bits at each 32-deep MMA step: worst case, an error that grows with K.
    acc = 2**-20 if INTERPRET else max(k // 32, 1) * 2**-13
    for cfg in configs:
        with poisoned_outputs():
            out = fp8_gemm(xq, xs, weight, bias, torch.bfloat16, cfg)
        assert_within(out, ref, ROUND * ref.abs() + acc * size, f"fp8 gemm {cfg}")


def test_fp8_linear_quantizes_then_multiplies(device):
    m, n, k = (5, 32, 128) if device.type == "cpu" else (300, 256, 1024)
    weight = _weight(n, k, device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    out = fp8_linear(x, weight, None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp8_gemm(*quantize_fp8(x), weight, None, torch.bfloat16))
    xq, xs = quantize_fp8(x)
    assert torch.equal(
        fp8_linear(xq, weight, None, xs, torch.float32),
        fp8_gemm(xq, xs, weight, None, torch.float32),
    )


def test_fp8_weights_the_triton_gemm_cannot_move_are_refused_at_load(device):
    """The Triton GEMM moves 16-byte rows (TMA): an out_features whose bf16 output row is
    not a multiple of 16 bytes, or an in_features not a multiple of 16, is refused when
    the weight is prepared, naming the size, not at the first forward inside Triton. The
    torch path takes any shape."""
    fmt, triton = linear_format("fp8"), get_backend("triton")
    bf16 = torch.bfloat16
    with pytest.raises(ValueError, match=r"out_features 12 \(2 bytes each in bfloat16\)"):
        fmt.prepare(torch.randn(12, 64), bf16, device.type, triton)
    with pytest.raises(ValueError, match="multiple of 16 bytes: in_features 40"):
        fmt.prepare_quantized(
            Fp8Channels(*quantize_fp8_per_channel(torch.randn(16, 40))), bf16, device.type, triton
        )
    fmt.prepare(torch.randn(12, 40), bf16, "cpu", get_backend("torch"))
    weight = fmt.prepare(torch.randn(8, 64), bf16, device.type, triton)  # 16-byte rows
    x = torch.randn(3, 64, device=device).to(bf16)
    assert torch.equal(fp8_linear(x, weight, None), fp8_gemm(*quantize_fp8(x), weight, None, bf16))
