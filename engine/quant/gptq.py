"""GPTQ (Frantar et al. 2022): round a weight column by column, each rounding error pushed
onto the columns not yet rounded so that the layer's *output* on calibration data moves as
little as possible, not each weight on its own.

For a projection y = W x with calibration inputs X, the output error of a rounded Q is
tr((W - Q) H (W - Q)^T) with H = X^T X / n. Rounding column j to q_j leaves the error
e = (w_j - q_j) / [H^-1]_jj, which the columns after j absorb as w_k -= e [H^-1]_jk (the
rows of the upper Cholesky factor of H^-1 give these weights for every j in turn). Blocks
of columns are updated lazily, so the work is a few GEMMs per block.

What the quantizer rounds to is the format's own grid: FP8 with the format's per-channel
scales (`gptq_fp8`), or INT4 groups (`gptq_int4`: each group's scale and zero set from its
columns when GPTQ reaches it, the range shrunk by clip ratios where AWQ chose them). The
result is an `Fp8Channels` or `Int4Groups`: the exact values the format then serves,
never re-rounded at load. bench/RESULTS.md, "Quality", has what each gains on the
default model.

Calibration text is short (a few thousand tokens), so H has many weak directions that
the text does not pin down, and GPTQ overfits them with its usual 1% dampening;
`DEFAULT_DAMP` adds 10% of H's mean diagonal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.quant.fp8 import Fp8Channels
from engine.quant.int4 import Int4Groups, int4_grid, round_to_grid
from kernels.fp8_linear import AMAX_FLOOR, FP8_DTYPE, FP8_MAX
from kernels.int4_linear import int4_group_size

DEFAULT_DAMP = 0.1
BLOCK = 128


class Hessian:
    """H = X^T X / n of one projection's inputs, accumulated in fp64 over batches of rows."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features).to(torch.float64)
        self._sum = self._sum.to(rows.device)  # accumulates where the model runs
        self._sum += rows.T @ rows
        self.rows += rows.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("the Hessian saw no rows; run calibration first")
        return self._sum / self.rows

    def scaled(self, s: torch.Tensor) -> torch.Tensor:
        """H of the inputs x / s, for the weight W diag(s) (`engine.quant.scaling`)."""
        inv = 1 / s.to(self._sum.device, torch.float64)
        return self.matrix * inv[:, None] * inv[None, :]


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    round_column: Callable[[int, torch.Tensor], torch.Tensor],
    damp: float = DEFAULT_DAMP,
) -> torch.Tensor:
    """W [out, in] rounded column by column, in order, with the error feedback above:
    `round_column(j, rest)` gets the columns j, j+1, ... to the end of j's block of 128 as
    the feedback has left them so far ([out, cols] fp64) and returns column j rounded.
    Returns the rounded weight in fp64."""
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match in_features {k}")
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs never active: nothing to compensate through them
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64, device=h.device)
    try:
        chol = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as e:
        raise ValueError("the calibration Hessian is not positive definite; damp more") from e
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    out = torch.empty_like(w)
    for lo in range(0, k, BLOCK):
        hi = min(lo + BLOCK, k)
        block = w[:, lo:hi].clone()
        errors = torch.empty_like(block)
        hb = hinv[lo:hi, lo:hi]
        for j in range(hi - lo):
            q = round_column(lo + j, block[:, j:])
            out[:, lo + j] = q
            err = (block[:, j] - q) / hb[j, j]
            block[:, j:] -= err[:, None] * hb[j, j:][None, :]
            errors[:, j] = err
        w[:, hi:] -= errors @ hinv[lo:hi, hi:]
    return out


def gptq_fp8(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = DEFAULT_DAMP
) -> Fp8Channels:
    """The `fp8` format's weight (per-channel scales as round-to-nearest picks them),
    rounded by GPTQ against `hessian` [in, in]."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.to(hessian.device)
    scale = weight.float().abs().amax(dim=1).clamp_min(AMAX_FLOOR) / FP8_MAX
    s = scale.to(torch.float64)

    def to_grid(_: int, rest: torch.Tensor) -> torch.Tensor:
        return (rest[:, 0] / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float64) * s

    rounded = gptq(weight, hessian, to_grid, damp)
    # fp8 value x fp32 scale is exact in fp64, so dividing recovers the fp8 value exactly.
    return Fp8Channels((rounded / s[:, None]).to("cpu", FP8_DTYPE), scale.cpu())


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int | None = None,
    ratios: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
) -> Int4Groups:
    """The `int4` format's weight rounded by GPTQ against `hessian` [in, in]. Each group's
    scale and zero are set when GPTQ reaches the group, from its columns as the feedback
    has left them, their range shrunk by `ratios` [out, in / G] where given (AWQ's clip)."""
    n, k = weight.shape
    g = group_size or int4_group_size(k)
    assert BLOCK % g == 0  # a group never straddles two of GPTQ's blocks
    dev = hessian.device
    scales = torch.empty(n, k // g, dtype=torch.bfloat16, device=dev)
    zeros = torch.empty_like(scales)

    def to_grid(j: int, rest: torch.Tensor) -> torch.Tensor:
        i = j // g
        if j % g == 0:
            r = None if ratios is None else ratios[:, i : i + 1].to(dev)
            s_i, z_i = int4_grid(rest[:, :g], g, r)
            scales[:, i], zeros[:, i] = s_i[:, 0], z_i[:, 0]
        s, z = scales[:, i].double(), zeros[:, i].double()
        return (round_to_grid(rest[:, :1], s, z)[:, 0] - z) * s

    rounded = gptq(weight.to(dev), hessian, to_grid, damp)
    # (q - z) * s is exact in fp64 for bf16 s and integers below 16: q comes back exactly.
    s, z = scales.double().repeat_interleave(g, 1), zeros.double().repeat_interleave(g, 1)
    q = (rounded / s + z).round()
    return Int4Groups(q.to("cpu", torch.uint8), scales.cpu(), zeros.cpu(), g)
