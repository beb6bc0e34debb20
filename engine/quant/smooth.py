"""Activation-aware scaling for the `fp8` format (SmoothQuant, Xiao et al. 2022).

FP8 rounds a projection's input per token and its weight per output channel. Scaling
input channel j of the weight by s_j and of the activation by 1/s_j leaves the product
unchanged and moves rounding error between the two:

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha),   alpha searched per projection group

`smooth_scales` picks, per group of projections that share an input, the alpha (or no
scaling at all) whose W8A8 output error on calibration rows is smallest;
`engine.quant.scaling` folds 1/s into the input's producer, so the checkpoint that
reaches the `fp8` format is an ordinary full-precision one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.quant.awq import DEFAULT_GRID, ActivationStats
from engine.quant.fp8 import quantize_fp8_per_channel
from kernels.fp8_linear import quantize_fp8_torch


def _w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with both rounded as the `fp8` format rounds them, in fp32."""
    xq, xs = quantize_fp8_torch(x)
    wq, ws = quantize_fp8_per_channel(w)
    return (xq.float() * xs) @ (wq.float() * ws[:, None]).T


def smooth_scales(
    weights: Sequence[torch.Tensor], stats: ActivationStats, grid: int = DEFAULT_GRID
) -> torch.Tensor:
    """The per-input-channel s (fp32 [in], on the weights' device; all ones where no alpha
    helps) minimizing the calibration output error of FP8(x / s) FP8(W diag(s))^T."""
    w = torch.cat([t.float() for t in weights])
    x = stats.sample.to(w.device)
    ref = x @ w.T
    x_max = stats.max_abs.to(w.device).clamp_min(1e-8)
    w_max = w.abs().amax(dim=0).clamp_min(1e-8)
    best = torch.ones_like(x_max)
    best_err = float((_w8a8(x, w) - ref).pow(2).mean())
    for i in range(grid + 1):
        alpha = i / grid
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1e-4, 1e4)
        s = s / (s.max() * s.min()).sqrt()
        err = float((_w8a8(x / s, w * s) - ref).pow(2).mean())
        if err < best_err:
            best_err, best = err, s
    return best
