"""INT4 weight-only linear for decode (W4A16), torch path: packing, the reference, the CPU path.

A weight is quantized (by `engine.quant.int4`) per group of `G` input channels, G = 128,
or 64 where K is not a multiple of 128, asymmetrically:

    W[n, k] = (q[n, k] - z[n, g]) * s[n, g],   g = k // G,  q in [0, 15],  z integer in [0, 15]

with `s` and `z` in bf16. How q is packed is the kernel's business; there are two layouts.

`"triton"` (CUDA), read by `kernels.int4_linear_triton`. K is padded to K' = a multiple of
128 (the padding has s = z = 0, so it adds nothing):

    qweight  int32 [N/16, K'/128, 16, 16]   one 1 KiB tile per (16 channels, 128-wide K block)
    scales   int32 [K'/G, N]                group-major: a K step reads BN adjacent words;
                                            each word is a group's scale and zero together:
                                            bits 0-15 the bf16 s, bits 16-31 the bf16 128 + z
    zeros    None

Within a tile, row r holds channel 16i + r as 16 words j, and nibble t = p + 4u of word j
(bits 4t..4t+3) holds k = 16s + 2c + 8h + u of the block, where

    s = 4 (j % 2) + p     c = (j % 8) // 2     h = j // 8          (p < 4, u < 2)

so `(word >> 4p) & 0x000F000F` is the pair k, k+1 of "plane" s (the 16 k in [16s, 16s+16))
in the two 16-bit halves of one register, which is exactly how a tensor-core A fragment
holds them (thread c of a quad owns k = 2c, 2c+1, 2c+8, 2c+9 of each 16-wide k step):

    word j:   | k+1 (p=3) | k+1 (p=2) | k+1 (p=1) | k+1 (p=0) | k (p=3) | k (p=2) | ... |
    bits       31       28                           19      16  15     12            0

Why: a warp's 16-byte loads cover 512 contiguous bytes; with the bits `0x4300 | q` each
16-bit half *is* the bf16 number 128 + q, so one shift and one and-or per two weights
dequantize, with no int->float conversion and no byte shuffling. The kernel multiplies
those numbers, less 128 + z (one bf16x2 subtraction, exact), by the activations on tensor
cores and applies the scale once per group on the fp32 accumulator. A group's scale and
zero share one 4-byte word so that the kernel's software pipeline copies them ahead with
the weights (cp.async moves 4 bytes or more; two 2-byte loads stayed in the loop's
dependency chain): `(word << 16)` is the fp32 scale, `(word >> 16) * 0x10001` the bf16x2
pair 128 + z, 128 + z that the subtraction takes.

`"avx2"` (x86 CPUs with AVX2), read by `kernels/cpu/int4_linear.cpp`:

    qweight  uint8 [N, K/2]   per 32-wide k block b, 16 bytes:
                              byte i = q[32b + i] | q[32b + 16 + i] << 4
    scales   bf16 [N'/4, K/G, 4]  per tile of 4 output channels (N' = N rounded up to
    zeros    uint8 [N'/4, K/G, 4] a multiple of 4, padded with zeros), group by group

so a 16-byte load, a shift and two ands give the block's 32 nibbles in k order, ready for
`vpmaddubsw` against 32 int8 activations.

`"cpu"` (any other CPU): torch's own `_convert_weight_to_int4pack_for_cpu` packing, multiplied by
`_weight_int4pack_mm_for_cpu` (which wants bf16 activations: with fp32 ones it is an order
of magnitude slower, so fp32 callers are cast). Its zero convention is
`W = (q - 8) * s + zero`, hence `zero = (8 - z) * s`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

K_BLOCK = 128
"""K width of one packed tile (eight 16-wide nibble planes)."""
ZERO_BIAS_BITS = 0x4300
"""bf16 128.0: `ZERO_BIAS_BITS | q` is the bf16 number 128 + q for q in [0, 15]."""
N_TILE = 16
LAYOUTS = ("triton", "avx2", "cpu")
AVX2_GROUP_SIZES = (32, 64, 96, 128, 160, 192, 224, 256)
"""Groups the "avx2" kernel takes: whole 32-wide blocks, at most 8 of them (its int16 group
sums overflow past that)."""


def int4_group_size(in_features: int) -> int:
    """128, or 64 where K is not a multiple of 128 (SmolLM2's 576); K must divide by 64."""
    if in_features % 128 == 0:
        return 128
    if in_features % 64 == 0:
        return 64
    raise ValueError(f"INT4 needs in_features divisible by 64, got {in_features}")


@dataclass(frozen=True)
class Int4Weight:
    """A packed INT4 weight; which tensors mean what depends on `layout` (module docstring)."""

    layout: str
    qweight: torch.Tensor
    # "triton": scale-and-zero words [K'/G, N]; "avx2": [N'/4, K/G, 4];
    # "cpu": scale-and-zero [K/G, N, 2]
    scales: torch.Tensor
    zeros: torch.Tensor | None  # None for "triton" and "cpu"
    out_features: int
    in_features: int
    group_size: int

    def __post_init__(self) -> None:
        assert self.layout in LAYOUTS, self.layout
        assert self.in_features % self.group_size == 0


def pack_int4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    layout: str,
    device: str | torch.device = "cpu",
) -> Int4Weight:
    """Pack canonical q [N, K] (0..15), scales/zeros [N, K/G] into `layout` on `device`."""
    n, k = q.shape
    assert layout in LAYOUTS, f"unknown INT4 layout {layout!r}; choose one of {LAYOUTS}"
    assert k % group_size == 0 and scales.shape == zeros.shape == (n, k // group_size)
    # Packed once, at load, where the kernel runs: on a GPU the int64 temporaries of a large
    # projection take a fraction of a second there and many seconds on a host core.
    q, scales, zeros = q.to(device), scales.to(device), zeros.to(device)
    if layout == "avx2":
        if group_size not in AVX2_GROUP_SIZES:
            raise ValueError(
                f"the avx2 INT4 layout takes groups of a multiple of 32 up to 256 input "
                f"channels, got group_size {group_size}"
            )
        halves = q.to(torch.uint8).view(n, k // 32, 2, 16)
        packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)
        return Int4Weight(
            "avx2",
            packed.contiguous().to(device),
            _channel_quads(scales.to(torch.bfloat16)).to(device),
            _channel_quads(zeros.to(torch.uint8)).to(device),
            n,
            k,
            group_size,
        )
    if layout == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        s, z = scales.float(), zeros.float()
        scale_zero = torch.stack([s.T, ((8 - z) * s).T], dim=-1).to(torch.bfloat16)
        return Int4Weight(
            "cpu", packed.to(device), scale_zero.contiguous().to(device), None, n, k, group_size
        )
    if n % N_TILE:
        raise ValueError(f"INT4 on the GPU needs out_features divisible by {N_TILE}, got {n}")
    k_pad = -(-k // K_BLOCK) * K_BLOCK
    qp = F.pad(q.to(torch.int64), (0, k_pad - k))
    tiles = qp.view(n // N_TILE, N_TILE, k_pad // K_BLOCK, K_BLOCK).transpose(1, 2)
    nibbles = tiles[..., _tile_k_index().to(qp.device)]  # [N/16, b, r, j, t]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qp.device)
    words = (nibbles << shifts).sum(dim=-1)  # disjoint bit ranges: the sum is an OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    g_pad = k_pad // group_size - k // group_size
    sc = F.pad(scales.float(), (0, g_pad)).T.to(torch.bfloat16)  # padding: s = z = 0
    ze = F.pad(zeros.float(), (0, g_pad)).T.to(torch.int32)
    scale_bits = sc.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    scale_zero = scale_bits | ((ZERO_BIAS_BITS | ze) << 16)  # 0x43xx: positive, no sign
    return Int4Weight(
        "triton", words.contiguous().to(device), scale_zero.contiguous(), None, n, k, group_size
    )


def swiglu_fits(rows: int) -> bool:
    """Whether a [gate ‖ up] weight of `rows` = 2I rows tiles into whole 16-channel pairs."""
    return rows % (2 * N_TILE) == 0


def swiglu_order(rows: int) -> torch.Tensor:
    """Row indices that put a [gate ‖ up] weight of `rows` = 2I rows into the order a
    SiLU-and-mul epilogue reads (`int4_linear_triton.int4_linear(..., swiglu=True)`): 16
    gate rows, then the up rows of the same 16 channels, and so on, so that every
    32-row-aligned tile holds whole (gate, up) pairs."""
    if not swiglu_fits(rows):
        raise ValueError(f"a fused SiLU-and-mul needs 2I divisible by {2 * N_TILE}, got {rows}")
    chunks = torch.arange(rows // 2).view(-1, N_TILE)
    return torch.stack([chunks, chunks + rows // 2], dim=1).flatten()


def _channel_quads(t: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [ceil(N/4), G, 4]: the "avx2" layout's per-tile scales or zeros."""
    n, g = t.shape
    padded = F.pad(t, (0, 0, 0, -n % 4)) if n % 4 else t
    return padded.view(-1, 4, g).transpose(1, 2).contiguous()


def default_layout(device: str | torch.device) -> str:
    """The packing the fastest INT4 kernel on `device` reads."""
    if torch.device(device).type != "cpu":
        return "triton"
    from kernels import native

    return "avx2" if native.library() is not None else "cpu"


def _tile_k_index() -> torch.Tensor:
    """[16 (word j), 8 (nibble t)]: the k within a 128-wide block that nibble t of word j holds."""
    j = torch.arange(16)[:, None]
    t = torch.arange(8)[None, :]
    p, u = t % 4, t // 4
    return 16 * (4 * (j % 2) + p) + 2 * ((j % 8) // 2) + 8 * (j // 8) + u


def unpack_int4(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical (q [N, K] uint8, scales/zeros [N, K/G] fp32) of a "triton" weight."""
    assert weight.layout == "triton", weight.layout
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    words = weight.qweight.to(torch.int64) & 0xFFFFFFFF  # [N/16, b, r, j]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    nibbles = ((words[..., None] >> shifts) & 0xF).flatten(-2)  # [N/16, b, r, j * 8 + t]
    tiles = torch.empty_like(nibbles)
    tiles[..., _tile_k_index().flatten().to(words.device)] = nibbles
    q = tiles.transpose(1, 2).reshape(n, -1)[:, :k]
    scale_zero = weight.scales.T[:, : k // g]
    scales = (scale_zero << 16).view(torch.float32)
    zeros = ((scale_zero >> 16) & 0xF).float()
    return q.to(torch.uint8), scales.contiguous(), zeros.contiguous()


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """W = (q - z) * s in fp32 from canonical tensors."""
    g = q.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(g, dim=1)
    z = zeros.float().repeat_interleave(g, dim=1)
    return (q.float() - z) * s


def int4_linear_torch(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype: the CPU kernel, or dequantize-and-matmul."""
    assert x.dim() == 2 and x.shape[1] == weight.in_features, (x.shape, weight.in_features)
    if weight.layout == "avx2":
        from kernels.int4_linear_cpu import int4_linear_avx2

        y = int4_linear_avx2(x, weight)
    elif weight.layout == "cpu":
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb.contiguous(), weight.qweight, weight.group_size, weight.scales
        ).to(x.dtype)
    else:
        w = dequantize_int4(*unpack_int4(weight))
        y = (x.float() @ w.T).to(x.dtype)
    return y if bias is None else y + bias
