import pytest
import torch

from kernels.activation import silu_and_mul_torch
from kernels.int4_linear import (
    dequantize_int4,
    int4_group_size,
    pack_int4,
    swiglu_order,
    unpack_int4,
)
from kernels.int4_linear_triton import Int4GemmConfig, int4_linear, int4_linear_add_norm
from tests.kernels.bounds import ROUND, assert_within, poisoned_outputs
from tests.kernels.conftest import DEVICE


def _quantized(n, k, device):
    g = int4_group_size(k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // g, device=device) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // g), device=device).to(torch.bfloat16)
    return q, scales, zeros, g


@pytest.mark.parametrize("k", [128, 576, 4096])
def test_pack_round_trips(k):
    q, scales, zeros, g = _quantized(48, k, "cpu")
    w = pack_int4(q, scales, zeros, g, "triton")
    q2, s2, z2 = unpack_int4(w)
    assert torch.equal(q2, q) and torch.equal(s2, scales.float()) and torch.equal(z2, zeros.float())
    assert w.qweight.shape == (3, -(-k // 128), 16, 16)


def test_pack_rejects_bad_shapes():
    q, scales, zeros, g = _quantized(40, 128, "cpu")  # 40 channels: not whole 16-row tiles
    with pytest.raises(ValueError, match="divisible by 16"):
        pack_int4(q, scales, zeros, g, "triton")
    with pytest.raises(ValueError, match="divisible by 64"):
        int4_group_size(96)


CASES = {
    "cpu": [(1, 64, 256, None), (5, 48, 576, None), (17, 32, 384, Int4GemmConfig(32, 32, 3, 4, 1))],
    "cuda": [
        (1, 4096, 4096, None),
        (16, 4096, 576, None),
        (33, 1536, 14336, None),
        (64, 6144, 4096, None),
        (100, 256, 1024, None),
        (1, 4096, 4096, Int4GemmConfig(64, 16, 1, 4, 3)),
    ],
}


# Interpreter-sized cases in CI, GPU-sized ones on a GPU (conftest.DEVICE).
@pytest.mark.parametrize("case", range(len(CASES[DEVICE.type])))
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_linear_matches_fp64(device, case, with_bias):
    m, n, k, cfg = CASES[device.type][case]
    q, scales, zeros, g = _quantized(n, k, device)
    weight = pack_int4(q, scales, zeros, g, "triton", device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    bias = torch.randn(n, device=device).to(torch.bfloat16) if with_bias else None
    w = dequantize_int4(q, scales, zeros).double()
    ref = x.double() @ w.T + (bias.double() if with_bias else 0)
    size = x.double().abs() @ w.abs().T
    for _ in range(2):  # a second launch reuses the split-K counters the first re-armed
        with poisoned_outputs():
            out = int4_linear(x, weight, bias, cfg)
        # Products of bf16 x and small integers are exact; fp32 accumulation; one rounding.
        assert_within(out, ref, ROUND * ref.abs() + 2**-20 * size, f"int4 m={m} n={n} k={k}")


SWIGLU_CASES = {
    "cpu": [(1, 64, 256, None), (5, 96, 576, None), (20, 32, 384, Int4GemmConfig(32, 32, 3, 4, 1))],
    "cuda": [(1, 28672, 4096, None), (4, 28672, 4096, None), (33, 1024, 4096, None)],
}


@pytest.mark.parametrize("case", range(len(SWIGLU_CASES[DEVICE.type])))
def test_int4_linear_swiglu_matches_fp64(device, case):
    """The SiLU-and-mul epilogue: silu(gate) * up from one launch over a [gate ‖ up] weight
    in swiglu_order, against the fp64 product, and bit for bit against the two-kernel path
    (the projection rounded to bf16, then silu_and_mul) wherever that path's own
    projection agrees with the fused one's."""
    m, n, k, cfg = SWIGLU_CASES[device.type][case]
    q, scales, zeros, g = _quantized(n, k, device)
    order = swiglu_order(n).to(device)
    fused_w = pack_int4(q[order], scales[order], zeros[order], g, "triton", device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    w = dequantize_int4(q, scales, zeros).double()
    y, size = x.double() @ w.T, x.double().abs() @ w.abs().T
    (gate, up), (size_g, size_u) = y.chunk(2, dim=1), (2**-20 * size).chunk(2, dim=1)
    silu = gate * torch.sigmoid(gate)
    ref = silu * up
    # gate and up each rounded once to bf16 after fp32 accumulation (silu' <= 1.1), silu
    # rounded, the product rounded.
    bound = ROUND * up.abs() * (1.2 * gate.abs() + 3 * silu.abs()) + 1.2 * up.abs() * size_g
    bound += silu.abs() * size_u
    for _ in range(2):  # the second launch reuses the split-K counters the first re-armed
        with poisoned_outputs():
            out = int4_linear(x, fused_w, None, cfg, swiglu=True)
        assert out.shape == (m, n // 2)
        assert_within(out, ref, bound, f"int4 swiglu m={m} n={n} k={k}")
    plain_w = pack_int4(q, scales, zeros, g, "triton", device)
    two_kernels = silu_and_mul_torch(int4_linear(x, plain_w, None, cfg)).double()
    assert_within(out, two_kernels, 2 * ROUND * two_kernels.abs(), "fused against two kernels")


def test_swiglu_order_pairs_each_gate_row_with_its_up_row():
    order = swiglu_order(64)
    assert order.tolist()[:32] == list(range(16)) + list(range(32, 48))
    assert sorted(order.tolist()) == list(range(64))
    with pytest.raises(ValueError, match="divisible by 32"):
        swiglu_order(48)


NORM_CASES = {
    "cpu": [
        (1, 128, 256, None),
        (5, 192, 128, Int4GemmConfig(64, 16, 2, 4, 1)),
        (20, 64, 384, None),
    ],
    "cuda": [(1, 4096, 4096, None), (4, 4096, 14336, None), (33, 4096, 4096, None)],
}


@pytest.mark.parametrize("case", range(len(NORM_CASES[DEVICE.type])))
def test_rms_norm_split_across_two_int4_gemms(device, case):
    """A producer GEMM adds the residual and leaves rms_norm pending (gamma * s and partial
    sums of s^2 per tile); the consumer GEMM finishes the norm in its epilogue. Against
    fp64: s = round(round(x W1^T) + residual), then rmsnorm(s) * gamma @ W2^T."""
    m, n, k, cfg = NORM_CASES[device.type][case]
    q1, s1, z1, g1 = _quantized(n, k, device)
    w1 = dequantize_int4(q1, s1, z1).double()
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    residual = torch.randn(m, n, device=device).to(torch.bfloat16)
    gamma = (1 + 0.1 * torch.randn(n, device=device)).to(torch.bfloat16)
    with poisoned_outputs():
        pending, s = int4_linear_add_norm(
            x, pack_int4(q1, s1, z1, g1, "triton", device), residual, gamma, 1e-5, cfg
        )
    want_s = (x.double() @ w1.T).to(torch.bfloat16).double() + residual.double()
    size = x.double().abs() @ w1.abs().T
    assert_within(s, want_s, ROUND * (want_s.abs() + size) + 2**-20 * size, "s")
    s64 = s.double()  # the rest from the s the kernel wrote
    assert_within(pending.scaled, s64 * gamma.double(), ROUND * (s64 * gamma.double()).abs(), "g")
    assert_within(pending.sumsq.sum(1), (s64 * s64).sum(1), 1e-5 * (s64 * s64).sum(1), "s^2")
    q2, s2, z2, g2 = _quantized(64, n, device)
    w2 = dequantize_int4(q2, s2, z2).double()
    normed = s64 * torch.rsqrt((s64 * s64).mean(1, keepdim=True) + 1e-5) * gamma.double()
    ref = normed @ w2.T
    with poisoned_outputs():
        out = int4_linear(pending, pack_int4(q2, s2, z2, g2, "triton", device), None)
    # gamma * s rounded once, the product summed in fp32, one rounding of the output
    ref_size = normed.abs() @ w2.abs().T
    assert_within(out, ref, ROUND * ref.abs() + 2 * ROUND * ref_size, "consumer")
    assert_within(pending.materialize(), normed, 2 * ROUND * normed.abs(), "materialized")
