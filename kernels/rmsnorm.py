"""RMSNorm with an optional fused residual add: torch path (reference and CPU)."""

from __future__ import annotations

import torch


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matches Hugging Face's LlamaRMSNorm: the add in the activation dtype, the norm in fp32,
    the weight applied after casting back."""
    summed = x if residual is None else x + residual
    h = summed.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), summed
