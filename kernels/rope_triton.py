# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Rotate-half RoPE on q and k together, Triton: one program per token, every head.

cos/sin are rounded to the activation dtype first, as `kernels.rope.apply_rope_torch` (and
Hugging Face) do; the rotation itself runs in fp32 and rounds once. q and k may be
strided views of the fused QKV projection (any token stride; heads and head_dim dense).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_runtime import check_device


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_x, c, s, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < H
    src = x_ptr + row * stride_x + heads * (2 * HALF) + cols
    dst = out_ptr + row * H * (2 * HALF) + heads * (2 * HALF) + cols
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    tl.store(dst, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    stride_q, stride_k, stride_cos, HQ, HK,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    dtype = q_out_ptr.dtype.element_ty
    c = tl.load(cos_ptr + row * stride_cos + cols).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + row * stride_cos + cols).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_q, c, s, HQ, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, k_out_ptr, stride_k, c, s, HK, HALF, BLOCK_HK)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]; cos/sin [T, D/2] fp32 -> new rotated q, k."""
    t, hq, d = q.shape
    hk = k.shape[1]
    assert k.shape == (t, hk, d) and k.dtype == q.dtype, (q.shape, k.shape)
    assert d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0, f"head_dim/2 must be a power of 2: {d}"
    for x in (q, k):
        assert x.stride(2) == 1 and x.stride(1) == d, f"heads must be dense: {x.stride()}"
    assert cos.shape == sin.shape == (t, d // 2) and cos.stride() == sin.stride()
    assert cos.dtype == sin.dtype == torch.float32 and cos.stride(1) == 1
    check_device(q, k, cos, sin)
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), k.stride(0), cos.stride(0), hq, hk,
            HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            num_warps=4,
        )  # fmt: skip
    return q_out, k_out
