# mypy: disable-error-code="no-untyped-def"
# (@triton.jit functions take and return Triton values, which have no Python annotations)
"""FP8 linear for prefill, Triton: per-token activation quantization and the FP8 GEMM.

Semantics are `kernels.fp8_linear` (the torch reference). The GEMM is persistent (one
program per SM walks the output tiles in grouped order), loads fp8 tiles with TMA,
multiplies them on tensor cores (both operands K-major, as FP8 wgmma needs) and applies
both scales, the bias and the bf16 cast in its epilogue:

    C[m, n] = (sum_k A8[m, k] W8[n, k]) * sa[m] * sw[n] (+ bias[n])

Quantization never gets a pass of its own when it can ride along: RMSNorm and SwiGLU
already hold a whole row, so their `_fp8` variants (kernels.rmsnorm_triton,
kernels.activation_triton) take the amax there with `store_fp8_row` and write one byte
per element instead of two. `quantize_fp8` is the standalone pass for inputs with no
such producer (the attention output feeding o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.fp8_linear import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, Fp8Weight
from kernels.triton_runtime import INTERPRET, check_device, mma, num_sms, to_fp8

_FP8_MAX = tl.constexpr(FP8_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def store_fp8_row(y, mask, q_ptrs, scale_ptr):
    """Quantize one row held in registers (fp32, zeros where masked) and store it."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), _AMAX_FLOOR)
    q = tl.clamp(y * (_FP8_MAX / amax), -_FP8_MAX, _FP8_MAX)
    tl.store(q_ptrs, to_fp8(q), mask=mask)
    tl.store(scale_ptr, amax / _FP8_MAX)


@triton.jit
def _quantize_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    store_fp8_row(y, mask, q_ptr + row * K + cols, scale_ptr + row)


def row_launch(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-program-per-row kernel holding a whole row."""
    block = triton.next_power_of_2(width)
    return block, max(1, min(16, block // 512))


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic FP8: x [T, K] -> (q [T, K] fp8, scale [T, 1] fp32)."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    check_device(x)
    t, k = x.shape
    q = torch.empty((t, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    if t:
        block, warps = row_launch(k)
        _quantize_fp8_kernel[(t,)](x, q, scale, k, x.stride(0), BLOCK=block, num_warps=warps)
    return q, scale


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so the tiles in
    # flight at once share their activation rows and weight columns in L2.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _fp8_gemm_kernel(
    a_desc, b_desc, c_desc, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Persistent: each program walks the tiles a grid apart; TMA loads and stores."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    programs = tl.num_programs(0)
    # The epilogue keeps its own tile counter so that the flattened loop can overlap one
    # tile's epilogue with the next tile's first loads.
    tile_c = tl.program_id(0) - programs
    for tile in tl.range(tl.program_id(0), num_m * num_n, programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = mma(a, b.T, acc, UPCAST)

        tile_c += programs
        pid_m, pid_n = _tile_coords(tile_c, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        sa = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        sb = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_ty = c_desc.dtype
        if SPLIT_EPILOGUE:
            # Two half-width stores: half the shared-memory staging for the output tile.
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c0.to(out_ty))
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], c1.to(out_ty))
        else:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_ty))


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_epilogue: bool = True


def fp8_gemm_config(m: int, n: int, k: int) -> Fp8GemmConfig:
    """Tile shape by problem size (tuned with bench/kernels.py on an H100)."""
    if INTERPRET:
        return Fp8GemmConfig(32, 32, 64, 4, 4, 1, split_epilogue=False)
    if m <= 64:
        return Fp8GemmConfig(64, 128, 128, 8, 4, 4)
    if m <= 512:
        return Fp8GemmConfig(128, 128, 128, 8, 8, 4)
    return Fp8GemmConfig(128, 256, 128, 8, 8, 3)


def fp8_gemm(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: Fp8GemmConfig | None = None,
) -> torch.Tensor:
    """x [T, K] fp8 with x_scale [T, 1] -> [T, N] out_dtype.

    The MMA accumulates in the tensor cores' fast (reduced-precision) FP8 mode, as cuBLAS
    does with `use_fast_accum=True`; Triton's exact-accumulation mode costs 2-3x here.
    """
    w, ws = weight.data, weight.scale
    m, k = x.shape
    n = w.shape[0]
    assert x.dtype == FP8_DTYPE and x.stride(1) == 1, (x.dtype, x.stride())
    assert (x.stride(0) * x.element_size()) % 16 == 0 and k % 16 == 0, "TMA needs 16 B rows"
    assert w.shape[1] == k and w.is_contiguous(), (w.shape, k)
    assert x_scale.dtype == torch.float32 and x_scale.shape == (m, 1), x_scale.shape
    assert x_scale.is_contiguous()
    assert out_dtype in (torch.bfloat16, torch.float16, torch.float32), out_dtype
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), bias.shape
    check_device(x, x_scale, w, ws)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or fp8_gemm_config(m, n, k)
    c_block_n = cfg.block_n // 2 if cfg.split_epilogue else cfg.block_n
    a_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
    b_desc = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
    c_desc = TensorDescriptor.from_tensor(out, [cfg.block_m, c_block_n])
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    # Under the interpreter two programs, so that each walks several tiles as on a GPU.
    programs = min(tiles, 2 if INTERPRET else num_sms(x.device))
    _fp8_gemm_kernel[(programs,)](
        a_desc, b_desc, c_desc, x_scale, ws, ws if bias is None else bias, m, n, k,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_EPILOGUE=cfg.split_epilogue,
        UPCAST=INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def fp8_linear(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    if x_scale is None:
        out_dtype = out_dtype or x.dtype
        x, x_scale = quantize_fp8(x)
    assert out_dtype is not None, "pre-quantized activations need out_dtype"
    return fp8_gemm(x, x_scale, weight, bias, out_dtype)
