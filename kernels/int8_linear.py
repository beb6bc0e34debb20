"""INT8 weight-only linear with per-output-channel scales: the LM head's format on CPUs.

    W[n, k] ≈ q[n, k] * s[n],   q int8 in [-127, 127],   s fp32   (engine.quant.int8)

On x86 CPUs with AVX2 `kernels/cpu/int8_linear.cpp` multiplies it with the activations
quantized to int8 per 64-wide group of a row (ACTIVATION_GROUP), so its error against the
exact product of the stored weight is bounded by the rounding of x: |y - x @ W.T| <=
sum_k |W[n, k]| * step(m, group of k) / 2 with step = max|x in the group| / 127, plus
fp32 rounding. Elsewhere (other CPUs, GPUs) the reference dequantizes and multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import native

ACTIVATION_GROUP = 64


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # fp32 [N]

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])


def dequantize_int8(weight: Int8Weight) -> torch.Tensor:
    return weight.qweight.float() * weight.scales[:, None]


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the native kernel where it runs, else the reference."""
    n, k = weight.out_features, weight.in_features
    assert x.dim() == 2 and x.shape[1] == k, (tuple(x.shape), k)
    if x.device.type != "cpu" or k % ACTIVATION_GROUP or native.library() is None:
        return (x.float() @ dequantize_int8(weight).T).to(x.dtype)
    xc, bf16 = native.activation_rows(x)
    y = torch.empty((x.shape[0], n), dtype=xc.dtype)
    native.lib().baton_int8_linear_avx2(
        xc.data_ptr(),
        weight.qweight.data_ptr(),
        weight.scales.data_ptr(),
        y.data_ptr(),
        int(bf16),
        x.shape[0],
        n,
        k,
        torch.get_num_threads(),
    )
    return y.to(x.dtype)
