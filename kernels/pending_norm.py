"""An RMSNorm output handed to the next projection without being materialized.

    rmsnorm(s) * gamma = (gamma * s) * rsqrt(mean(s^2) + eps)        row by row

so a projection that produces s (o_proj and down_proj add the residual) can write
`scaled` = gamma * s and, per output tile, its partial sums of s^2; the projection that
consumes the norm multiplies `scaled` and scales its own output rows by the rsqrt in its
epilogue. No kernel holds a whole row, so no kernel of its own runs the norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PendingNorm:
    scaled: torch.Tensor
    """gamma * s, [T, K] in the activation dtype."""
    sumsq: torch.Tensor
    """[T, P] fp32: per output tile of the producer, the sum of s^2 over its channels."""
    eps: float

    def materialize(self) -> torch.Tensor:
        """The normed rows, for a consumer without the fused epilogue."""
        rstd = torch.rsqrt(self.sumsq.sum(1, keepdim=True) / self.scaled.shape[1] + self.eps)
        return (self.scaled.float() * rstd).to(self.scaled.dtype)
