"""Rotate-half RoPE on the CPU: launcher of `kernels/cpu/rope.cpp` (bf16)."""

from __future__ import annotations

import torch

from kernels import native


def apply_rope_cpu(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.rope.apply_rope_torch`, for bf16 q/k (`native.handles`)."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tokens, heads, dim = x.shape
    assert dim % 16 == 0 and cos.shape == sin.shape == (tokens, dim // 2), (
        f"RoPE of {tuple(x.shape)} needs head_dim a multiple of 16 and cos and sin of shape "
        f"{(tokens, dim // 2)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
    )
    # Rows may be strided (q and k are views of the fused QKV output); heads are not.
    assert x.stride(2) == 1 and x.stride(1) == dim, (
        f"RoPE of {tuple(x.shape)} with strides {x.stride()}: the native kernel needs each "
        f"token's heads packed, strides (any, {dim}, 1)"
    )
    out = torch.empty((tokens, heads, dim), dtype=x.dtype)
    native.lib().baton_rope_bf16(
        x.data_ptr(),
        x.stride(0),
        out.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        tokens,
        heads,
        dim,
        torch.get_num_threads(),
    )
    return out
