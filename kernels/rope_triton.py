# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Rotate-half RoPE on q and k together, Triton: one program per token, every head.

cos/sin are rounded to the activation dtype first, as `kernels.rope.apply_rope_torch` (and
Hugging Face) do; the rotation itself runs in fp32 and rounds once. q and k may be
strided views of the fused QKV projection (any token stride; heads and head_dim dense).

`apply_rope_write_kv` also stores the rotated k and v into their paged-cache slots (what
`paged_attention_triton.write_kv` does for a bf16/fp16 cache): one launch instead of two,
and k never goes through memory unrotated. In a batch-1 decode step on an H100 each of
the two kernels costs ~1.5-1.9 us, 32 times a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_runtime import check_device, pdl, pdl_options, pdl_trigger, pdl_wait


@triton.jit
def cos_sin(cos_ptr, sin_ptr, row, stride_cos, dtype: tl.constexpr, D: tl.constexpr):
    """Token `row`'s cos and sin as [D] fp32 (column d takes frequency d % (D/2)), rounded
    to the activation dtype first."""
    d = tl.arange(0, D) % (D // 2)
    c = tl.load(cos_ptr + row * stride_cos + d).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + row * stride_cos + d).to(dtype).to(tl.float32)
    return c, s


@triton.jit
def rotate_rows(row_ptr, heads, hmask, c, s, D: tl.constexpr):
    """Heads `heads` ([H], dense rows D wide at row_ptr, `hmask` the ones that exist),
    rotate-half RoPE'd by `cos_sin`'s c, s: [H, D] in the input's dtype, fp32 arithmetic,
    one rounding."""
    d = tl.arange(0, D)
    x = tl.load(row_ptr + heads[:, None] * D + d[None, :], mask=hmask[:, None], other=0.0)
    # Column d's partner: d + D/2 (with a minus) in the first half, d - D/2 in the second.
    partner = tl.load(row_ptr + heads[:, None] * D + ((d + D // 2) % D)[None, :],
                      mask=hmask[:, None], other=0.0)  # fmt: skip
    sign = tl.where(d < D // 2, -1.0, 1.0)
    rotated = x.to(tl.float32) * c[None, :] + sign[None, :] * partner.to(tl.float32) * s[None, :]
    return rotated.to(x.dtype)


@triton.jit
def _rotate_heads(x_row, out_row, c, s, H, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's H dense heads at x_row, rotated, to out_row (also dense)."""
    heads = tl.arange(0, BLOCK_H)
    mask = heads < H
    y = rotate_rows(x_row, heads, mask, c, s, D)
    tl.store(out_row + heads[:, None] * D + tl.arange(0, D)[None, :], y, mask=mask[:, None])


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    stride_q, stride_k, stride_cos, HQ, HK,
    D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c, s = cos_sin(cos_ptr, sin_ptr, row, stride_cos, q_out_ptr.dtype.element_ty, D)
    _rotate_heads(q_ptr + row * stride_q, q_out_ptr + row * HQ * D, c, s, HQ, D, BLOCK_HQ)
    _rotate_heads(k_ptr + row * stride_k, k_out_ptr + row * HK * D, c, s, HK, D, BLOCK_HK)


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, slot_ptr,
    stride_q, stride_k, stride_v, stride_cos, stride_block, stride_kv, stride_tok, page_size,
    HQ, HK, D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_V: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    pdl_wait(PDL)
    c, s = cos_sin(cos_ptr, sin_ptr, row, stride_cos, q_out_ptr.dtype.element_ty, D)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    dst = cache_ptr + (slot // page_size) * stride_block + (slot % page_size) * stride_tok
    _rotate_heads(q_ptr + row * stride_q, q_out_ptr + row * HQ * D, c, s, HQ, D, BLOCK_HQ)
    _rotate_heads(k_ptr + row * stride_k, dst, c, s, HK, D, BLOCK_HK)
    v_cols = tl.arange(0, BLOCK_V)
    v_mask = v_cols < HK * D
    v = tl.load(v_ptr + row * stride_v + v_cols, mask=v_mask)
    tl.store(dst + stride_kv + v_cols, v, mask=v_mask)


def check_rope_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """What the RoPE kernels (and the decode kernel that applies RoPE itself) take: q
    [T, Hq, D], k (and v) [T, Hk, D] of one dtype with dense heads; cos/sin [T, D/2] fp32."""
    t, _, d = q.shape
    hk = k.shape[1]
    assert k.shape == (t, hk, d) and k.dtype == q.dtype, (q.shape, k.shape, k.dtype)
    assert v is None or (v.shape == k.shape and v.dtype == q.dtype), (k.shape, v)
    assert d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0, f"head_dim/2 must be a power of 2: {d}"
    for x in (q, k) if v is None else (q, k, v):
        assert x.stride(2) == 1 and x.stride(1) == d, f"heads must be dense: {x.stride()}"
    assert cos.shape == sin.shape == (t, d // 2) and cos.stride() == sin.stride()
    assert cos.dtype == sin.dtype == torch.float32 and cos.stride(1) == 1


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]; cos/sin [T, D/2] fp32 -> new rotated q, k."""
    t, hq, d = q.shape
    hk = k.shape[1]
    check_rope_inputs(q, k, None, cos, sin)
    check_device(q, k, cos, sin)
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), k.stride(0), cos.stride(0), hq, hk,
            D=d, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            num_warps=4,
        )  # fmt: skip
    return q_out, k_out


def apply_rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`apply_rope` then `write_kv(k_rotated, v, ...)` into a bf16/fp16 cache, in one launch;
    returns the rotated q (new tensor). Shapes as those two functions take them."""
    t, hq, d = q.shape
    hk = k.shape[1]
    check_rope_inputs(q, k, v, cos, sin)
    assert kv_layer.dtype == q.dtype, (q.dtype, kv_layer.dtype)
    assert kv_layer.dim() == 5 and kv_layer.shape[1] == 2 and kv_layer.shape[3:] == (hk, d)
    assert kv_layer.stride(4) == 1 and kv_layer.stride(3) == d and kv_layer.stride(2) == hk * d
    assert slot_mapping.shape == (t,) and slot_mapping.dtype in (torch.int32, torch.int64)
    check_device(q, k, v, cos, sin, kv_layer, slot_mapping)
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t:
        _rope_kv_kernel[(t,)](
            q, k, v, cos, sin, q_out, kv_layer, slot_mapping,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.shape[2],
            hq, hk, D=d, BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HK=triton.next_power_of_2(hk), BLOCK_V=triton.next_power_of_2(hk * d),
            num_warps=4, PDL=pdl(q.device, t), **pdl_options(q.device, t),
        )  # fmt: skip
    return q_out
