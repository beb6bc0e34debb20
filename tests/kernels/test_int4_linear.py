import pytest
import torch

from kernels.int4_linear import dequantize_int4, int4_group_size, pack_int4, unpack_int4
from kernels.int4_linear_triton import Int4GemmConfig, int4_linear
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
