"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for the `int4` format.

A few input channels of a projection carry much larger activations than the rest, and
round-to-nearest spends the same precision on every channel. AWQ scales those weight
columns up before quantizing and their activations down by the same factor, which leaves
the full-precision product unchanged:

    W x = (W diag(s)) (diag(s)^-1 x),      s = mean|x|^alpha (normalized), alpha searched

(`search_scales`; `engine.quant.scaling` folds 1/s into whatever produces x). Then it
shrinks each group's [min, max] range where that lowers the output error (`search_clip`).
Both searches minimize the error of the layer's *output* on calibration activations, not
the weight error. The clip ratios feed the group's grid (`engine.quant.int4.int4_grid`),
which round-to-nearest (`quantize_int4`) or GPTQ (`engine.quant.gptq.gptq_int4`) then
rounds to.

Calibration: run the full-precision model over `engine/quant/data/calibration.txt` and
feed each projection's input rows to an `ActivationStats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.quant.int4 import quantize_int4
from kernels.int4_linear import int4_group_size

DEFAULT_GRID = 20
CLIP_ROWS = 256
"""Activation rows the clip search evaluates (it is the costly step: rows x out x in)."""


class ActivationStats:
    """Per-channel mean and max |x| of one projection's input, plus a sample of its rows."""

    def __init__(self, in_features: int, max_rows: int = 1024) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self._abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self._abs_max = torch.zeros(in_features)
        self._rows = 0
        self._sample: list[torch.Tensor] = []
        self._stride = 1

    def observe(self, x: torch.Tensor) -> None:
        """Add a batch of input rows [..., in_features]."""
        rows = x.detach().reshape(-1, self.in_features).to("cpu", torch.float32)
        self._abs_sum += rows.abs().sum(dim=0, dtype=torch.float64)
        self._abs_max = torch.maximum(self._abs_max, rows.abs().amax(dim=0))
        # Keep every `stride`-th row overall; halve the sample when it overflows, so the
        # sample stays spread evenly over all the text seen (deterministically).
        first = (-self._rows) % self._stride
        self._sample.append(rows[first :: self._stride])
        self._rows += rows.shape[0]
        if sum(s.shape[0] for s in self._sample) > self.max_rows:
            self._sample = [torch.cat(self._sample)[::2]]
            self._stride *= 2

    @property
    def num_rows(self) -> int:
        return self._rows

    @property
    def mean_abs(self) -> torch.Tensor:
        if self._rows == 0:
            raise ValueError("ActivationStats saw no rows; run calibration first")
        return (self._abs_sum / self._rows).float()

    @property
    def max_abs(self) -> torch.Tensor:
        if self._rows == 0:
            raise ValueError("ActivationStats saw no rows; run calibration first")
        return self._abs_max.clone()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self._sample)


def _rtn(weight: torch.Tensor, group_size: int, ratios: torch.Tensor | None = None) -> torch.Tensor:
    return quantize_int4(weight, group_size, ratios).dequantize()


def search_scales(
    weights: Sequence[torch.Tensor],
    stats: ActivationStats,
    group_size: int | None = None,
    grid: int = DEFAULT_GRID,
) -> torch.Tensor:
    """The per-input-channel s (fp32 [in], on the weights' device) minimizing the
    calibration output error of RTN(W diag(s)) diag(s)^-1 over every weight that shares
    this input."""
    w = torch.cat([t.float() for t in weights])
    g = group_size or int4_group_size(w.shape[1])
    x = stats.sample.to(w.device)
    ref = x @ w.T
    mean = stats.mean_abs.to(w.device).clamp_min(1e-8)
    best_err, best = float("inf"), torch.ones_like(mean)
    for i in range(grid):
        s = mean.pow(i / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = float((x @ (_rtn(w * s, g) / s).T - ref).pow(2).mean())
        if err < best_err:
            best_err, best = err, s
    return best


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int | None = None,
    grid: int = DEFAULT_GRID,
    max_shrink: float = 0.5,
    chunk: int = 1024,
) -> torch.Tensor:
    """Per (output channel, group) shrink ratio r of the range [r min, r max] minimizing
    that group's contribution to the output error on the activation rows `x` (at most
    `CLIP_ROWS` of them are used). fp32 [out, in / G] on the weight's device."""
    n, k = weight.shape
    g = group_size or int4_group_size(k)
    x = x[:: max(1, x.shape[0] // CLIP_ROWS)].to(weight.device)
    xg = x.float().reshape(x.shape[0], k // g, g)
    ratios = torch.ones(n, k // g, device=weight.device)
    for lo in range(0, n, chunk):
        w = weight[lo : lo + chunk].float()
        best = torch.full((w.shape[0], k // g), float("inf"), device=weight.device)
        for i in range(int(grid * max_shrink)):
            r = torch.full_like(best, 1 - i / grid)
            delta = (w - _rtn(w, g, r)).reshape(-1, k // g, g)
            err = torch.einsum("sgc,ngc->sng", xg, delta).pow(2).mean(dim=0)
            better = err < best
            best = torch.where(better, err, best)
            ratios[lo : lo + chunk][better] = 1 - i / grid
    return ratios
