"""INT4 weight-only linear on x86 CPUs: launcher of `kernels/cpu/int4_linear.cpp`.

The kernel reads the `"avx2"` layout of `kernels.int4_linear` and quantizes the
activations to int8 per (row, weight group), so its error against the exact product is
bounded by the rounding of x: |y - x @ W.T| <= sum_k |W[n, k]| * scale(x, group of k) / 2
with scale = max|x in the group| / 127, plus fp32 summation error. A row of x holding NaN
or +-inf comes out all NaN.
"""

from __future__ import annotations

import torch

from kernels import native
from kernels.int4_linear import AVX2_GROUP_SIZES, Int4Weight


def int4_linear_avx2(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """x [M, K] (any float dtype) -> [M, N] in x's dtype."""
    assert weight.layout == "avx2" and weight.zeros is not None
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    assert x.dim() == 2 and x.shape[1] == k, (tuple(x.shape), k)
    assert weight.qweight.shape == (n, k // 2) and weight.qweight.dtype == torch.uint8
    assert weight.scales.shape == weight.zeros.shape == (-(-n // 4), k // g, 4)
    assert x.device.type == "cpu" and g in AVX2_GROUP_SIZES, g  # pack_int4 checked it
    xc, bf16 = native.activation_rows(x)
    y = torch.empty((x.shape[0], n), dtype=xc.dtype)
    native.lib().baton_int4_linear_avx2(
        xc.data_ptr(),
        weight.qweight.data_ptr(),
        weight.scales.data_ptr(),
        weight.zeros.data_ptr(),
        y.data_ptr(),
        int(bf16),
        x.shape[0],
        n,
        k,
        g,
        torch.get_num_threads(),
    )
    return y.to(x.dtype)
