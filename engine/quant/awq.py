"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for the `int4` format.

A few input channels of a projection carry much larger activations than the rest, and
round-to-nearest spends the same precision on every channel. AWQ scales those weight
columns up before quantizing and their activations down by the same factor, which leaves
the full-precision product unchanged:

    W x = (W diag(s)) (diag(s)^-1 x),      s = mean|x|^alpha (normalized), alpha searched

Then it shrinks each group's [min, max] range where that lowers the output error
(`search_clip`). Both searches minimize the error of the layer's *output* on calibration
activations, not the weight error. The result is a full-precision weight, already scaled
and clipped, whose plain round-to-nearest quantization (`engine.quant.int4`) is the AWQ
quantization; the division by s must be folded into whatever produces x:

    projection      its input comes from            fold 1/s into
    qkv_proj        input_layernorm                 the norm weight (q, k, v share one s)
    gate_up_proj    post_attention_layernorm        the norm weight (gate, up share one s)
    down_proj       silu(gate) * up                 the up_proj rows
    o_proj          attention over v                the v_proj rows, only when every query
                                                    head has its own KV head; else RTN

Calibration: run the full-precision model over `engine/quant/data/calibration.txt`, feed
each projection's input rows to an `ActivationStats`, then call `awq_transform` once per
group of projections that share an input.
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
    """Per-channel mean |x| of one projection's input, plus a sample of its rows."""

    def __init__(self, in_features: int, max_rows: int = 1024) -> None:
        self.in_features = in_features
        self.max_rows = max_rows
        self._abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self._rows = 0
        self._sample: list[torch.Tensor] = []
        self._stride = 1

    def observe(self, x: torch.Tensor) -> None:
        """Add a batch of input rows [..., in_features]."""
        rows = x.detach().reshape(-1, self.in_features).to("cpu", torch.float32)
        self._abs_sum += rows.abs().sum(dim=0, dtype=torch.float64)
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
    def sample(self) -> torch.Tensor:
        return torch.cat(self._sample)


def _rtn(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    return quantize_int4(weight, group_size).dequantize()


def search_scales(
    weights: Sequence[torch.Tensor],
    stats: ActivationStats,
    group_size: int | None = None,
    grid: int = DEFAULT_GRID,
) -> torch.Tensor:
    """The per-input-channel s (fp32 [in]) minimizing the calibration output error of
    RTN(W diag(s)) diag(s)^-1 over every weight that shares this input."""
    w = torch.cat([t.float() for t in weights])
    g = group_size or int4_group_size(w.shape[1])
    x = stats.sample
    ref = x @ w.T
    mean = stats.mean_abs.clamp_min(1e-8)
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
    that group's contribution to the output error on the activation rows `x`."""
    n, k = weight.shape
    g = group_size or int4_group_size(k)
    xg = x.float().reshape(x.shape[0], k // g, g)
    ratios = torch.ones(n, k // g)
    for lo in range(0, n, chunk):
        w = weight[lo : lo + chunk].float().reshape(-1, k // g, g)
        w_max, w_min = w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)
        best = torch.full(w.shape[:2], float("inf"))
        for i in range(int(grid * max_shrink)):
            r = 1 - i / grid
            clipped = w.clamp(w_min * r, w_max * r)
            delta = w - _rtn(clipped.reshape(-1, k), g).reshape(w.shape)
            err = torch.einsum("sgc,ngc->sng", xg, delta).pow(2).mean(dim=0)
            better = err < best
            best = torch.where(better, err, best)
            ratios[lo : lo + chunk][better] = r
    return ratios


def clip_groups(weight: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Clamp each group of `weight` to its shrunk range (what RTN then quantizes)."""
    n, k = weight.shape
    w = weight.float().reshape(n, ratios.shape[1], -1)
    r = ratios[..., None]
    return w.clamp(w.amin(dim=-1, keepdim=True) * r, w.amax(dim=-1, keepdim=True) * r).reshape(n, k)


def awq_transform(
    weights: Sequence[torch.Tensor],
    stats: ActivationStats,
    group_size: int | None = None,
    grid: int = DEFAULT_GRID,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """AWQ for projections sharing one input: returns (scaled and clipped full-precision
    weights, s). Quantize the weights with the `int4` format and fold 1/s into the
    producer of the input (module docstring)."""
    s = search_scales(weights, stats, group_size, grid)
    x = stats.sample / s
    x = x[:: max(1, x.shape[0] // CLIP_ROWS)]
    out = []
    for w in weights:
        scaled = w.float() * s
        out.append(clip_groups(scaled, search_clip(scaled, x, group_size, grid)))
    return out, s
