# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""Row-wise argmax over a vocabulary, Triton: greedy decoding's last op.

Two launches: programs (row, chunk) each find their chunk's maximum and its first index;
one program per row then takes the first chunk holding the row's maximum. Ties go to the
lowest index and NaN counts as larger than any number (a row with NaN gives its first
NaN's index), as in `torch.argmax`, so a row's token is the same whichever path ran.
torch's own argmax over one 128k-wide row took 27 us on an H100 inside a batch-1 decode
graph (a single-block reduction), plus 3.6 us to widen bf16 logits to fp32 first; this
reads the logits in their own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_runtime import check_device, pdl, pdl_options, pdl_trigger, pdl_wait

CHUNK = 4096


@triton.jit
def _first_max(x, cols, n):
    """(max, its first column) of `x`, NaN counting as the largest (then: NaN, the first
    NaN's column); `cols` < n are x's columns, masked ones hold -inf. One min-reduction
    ranks NaN columns (cols) before columns equal to the maximum (n + cols)."""
    nan = x != x
    best = tl.max(tl.where(nan, float("-inf"), x), axis=0)
    first = tl.min(tl.where(nan, cols, tl.where(x == best, n + cols, 2 * n)), axis=0)
    has_nan = first < n
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, first, first - n)


@triton.jit
def _chunk_max_kernel(
    x_ptr, val_ptr, idx_ptr, n, stride_x, chunks, CHUNK: tl.constexpr, PDL: tl.constexpr
):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    best, first = _first_max(x.to(tl.float32), cols, n)
    tl.store(val_ptr + row * chunks + c, best)
    tl.store(idx_ptr + row * chunks + c, first)


@triton.jit
def row_max_kernel(val_ptr, idx_ptr, out_ptr, chunks, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    pdl_wait(PDL)
    val = tl.load(val_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
    _, first = _first_max(val, c, BLOCK)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + first).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] (bf16/fp16/fp32) -> [B] int64: each row's first index of its max, as
    `torch.argmax` picks it (NaN included)."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.shape[1] < 2**30, x.shape  # 2 * V column ranks fit in int32
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    check_device(x)
    rows, n = x.shape
    chunks = triton.cdiv(n, CHUNK)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0 or n == 0:
        assert n > 0 or rows == 0, "argmax of an empty row"
        return out
    val = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, chunks), dtype=torch.int32, device=x.device)
    on, options = pdl(x.device, rows), pdl_options(x.device, rows)
    _chunk_max_kernel[(rows, chunks)](
        x, val, idx, n, x.stride(0), chunks, CHUNK=CHUNK, num_warps=8, PDL=on, **options
    )
    block = triton.next_power_of_2(chunks)
    row_max_kernel[(rows,)](val, idx, out, chunks, BLOCK=block, num_warps=1, PDL=on, **options)
    return out
