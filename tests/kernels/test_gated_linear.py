"""A gated (MLP gate ‖ up) projection: SiLU-and-mul in the INT4 GEMM's epilogue where the
backend has that kernel, the two-op path elsewhere, the same numbers either way."""

import pytest
import torch

from engine.linear import Linear, linear_format
from engine.quant.int4 import quantize_int4
from kernels.activation import silu_and_mul_torch
from kernels.backend import get_backend
from tests.kernels.bounds import ROUND, assert_within


def _linear(weight, backend: str, device, gated: bool, invariant: bool = False) -> Linear:
    ops = get_backend(backend)
    return Linear(
        weight, None, linear_format("int4"), ops, torch.bfloat16, str(device), invariant, gated
    )


@pytest.mark.parametrize("quantized", [False, True])
def test_triton_int4_gated_projection_fuses_silu_and_mul(device, quantized):
    inter, k = (64, 256) if device.type == "cpu" else (1536, 4096)
    weight = torch.randn(2 * inter, k, device=device) / k**0.5
    source = quantize_int4(weight) if quantized else weight
    gated = _linear(source, "triton", device, gated=True)
    plain = _linear(source, "triton", device, gated=False)
    assert gated.fused_gate and not plain.fused_gate
    for m in (1, 7):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        two_ops = silu_and_mul_torch(plain(x)).double()
        out = gated(x)
        assert out.shape == (m, inter)
        assert_within(out, two_ops, 2 * ROUND * two_ops.abs(), f"fused gate m={m}")


def test_gated_projection_without_the_fused_kernel_runs_two_ops(device):
    """The torch backend has no fused kernel; a Triton weight whose 2I is not a multiple of
    32 cannot be tiled in pairs: both take silu_and_mul after the GEMM, bit for bit."""
    for backend, inter in (("torch", 64), ("triton", 24)):
        weight = torch.randn(2 * inter, 128, device=device) / 128**0.5
        gated = _linear(weight, backend, device, gated=True)
        plain = _linear(weight, backend, device, gated=False)
        assert not gated.fused_gate
        x = torch.randn(3, 128, device=device).to(torch.bfloat16)
        assert torch.equal(gated(x), gated.ops.silu_and_mul(plain(x)))


def test_batch_invariant_gated_projection_multiplies_each_row_alone(device):
    """The batch-invariant engine's gated projection: each row through the fused kernel on
    its own (M = 1), the SiLU-and-mul included, whatever the batch."""
    weight = torch.randn(128, 256, device=device) / 16
    invariant = _linear(weight, "triton", device, gated=True, invariant=True)
    batched = _linear(weight, "triton", device, gated=True)
    assert invariant.fused_gate
    x = torch.randn(3, 256, device=device).to(torch.bfloat16)
    out = invariant(x)
    assert out.shape == (3, 64)
    for i in range(3):
        assert torch.equal(out[i : i + 1], batched(x[i : i + 1]))
