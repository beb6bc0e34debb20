"""The transferable KV block: DESIGN.md "KV block format", one implementation.

One block holds every layer's K and V for `block_size` tokens, contiguous, little-endian:

    payload = data[num_layers, 2 (K|V), block_size, num_kv_heads, head_dim]   (dtype)
              ‖ scales[num_layers, 2, num_kv_heads] fp32                      (fp8_e4m3 only)

The engine's paged cache stores blocks in exactly this order (block-major), one payload a
row, so a block leaves or enters the cache as one contiguous slice with no gather: an
fp8_e4m3 cache is a byte tensor whose rows end with their block's scales (`empty_blocks`,
`data_view`, `scales_view`). The checksum is xxh3-64 over the whole payload.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

import torch
import xxhash

KV_LAYOUT_VERSION = 1
"""Version of the payload layout above; part of the block fingerprint."""

KV_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp32": torch.float32,  # exact-arithmetic test configurations only
}

_WIRE_NAMES = {dtype: name for name, dtype in KV_DTYPES.items()}

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
"""Choices of the `kv_cache_dtype` engine option (vLLM's `--kv-cache-dtype` spellings):
"auto" caches KV in the model's dtype, "fp8" and "fp8_e4m3" in fp8_e4m3 with scales."""

assert sys.byteorder == "little", "KV payloads are little-endian; big-endian hosts unsupported"


def kv_dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a cache dtype."""
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"KV cache dtype {dtype} has no wire format; choose one of {sorted(KV_DTYPES)}"
        ) from None


def check_kv_cache_dtype(option: str) -> None:
    if option not in KV_CACHE_DTYPES:
        choices = ", ".join(repr(c) for c in KV_CACHE_DTYPES)
        raise ValueError(f"kv_cache_dtype must be one of {choices}, got {option!r}")


def kv_cache_dtype(option: str, model_dtype: torch.dtype) -> str:
    """Wire name of the cache dtype the `kv_cache_dtype` option picks for a model dtype."""
    check_kv_cache_dtype(option)
    return kv_dtype_name(model_dtype) if option == "auto" else "fp8_e4m3"


@dataclass(frozen=True)
class KVBlockFormat:
    """Shape and dtype of one transferable block for a given model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; choose one of {sorted(KV_DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @cached_property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @cached_property
    def data_nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.torch_dtype.itemsize

    @cached_property
    def scales_nbytes(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * 4 if self.dtype == "fp8_e4m3" else 0

    @cached_property
    def nbytes(self) -> int:
        """Payload size of one block on the wire."""
        return self.data_nbytes + self.scales_nbytes

    @cached_property
    def scales_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads)

    def empty_blocks(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        """`num_blocks` zeroed payloads, one a row: [n, *shape] of the dtype, or for
        fp8_e4m3 [n, nbytes] bytes (data, then scales: see `data_view`, `scales_view`)."""
        if self.scales_nbytes:
            # Rows padded to 16 bytes: every block's data starts aligned for vector loads.
            row = -(-self.nbytes // 16) * 16
            rows = torch.zeros((num_blocks, row), dtype=torch.uint8, device=device)
            return rows[:, : self.nbytes]
        return torch.zeros((num_blocks, *self.shape), dtype=self.torch_dtype, device=device)

    def data_view(self, blocks: torch.Tensor) -> torch.Tensor:
        """The K/V data of `empty_blocks`' rows, [n, *shape] of the dtype (their block
        stride is the payload's: the kernels take strided blocks)."""
        if not self.scales_nbytes:
            return blocks
        data = blocks[:, : self.data_nbytes].view(self.torch_dtype)
        return data.view(blocks.shape[0], *self.shape)

    def scales_view(self, blocks: torch.Tensor) -> torch.Tensor:
        """The scales that end each of an fp8_e4m3 cache's rows, [n, num_layers, 2,
        num_kv_heads] fp32: what the block's K/V were divided by."""
        assert self.scales_nbytes, f"a {self.dtype} block carries no scales"
        scales = blocks[:, self.data_nbytes :].view(torch.float32)
        return scales.view(blocks.shape[0], *self.scales_shape)


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a block payload; senders attach it, receivers verify it before use."""
    return xxhash.xxh3_64_intdigest(payload)
