"""Block identity: the one implementation of DESIGN.md "Block identity" (spec: docs/block-id.md).

Router, prefill, decode and kvstore all name KV blocks with these functions, so a block
computed anywhere is found everywhere. Everything here is a pure function of its
arguments: no random seeds, no Python `hash()`, identical across processes and machines.

    root   = sha256(fingerprint ‖ salt)
    h[0]   = sha256(root ‖ u32le(tokens[0:16]))
    h[i]   = sha256(h[i-1] ‖ u32le(tokens[16i:16i+16]))

Only full blocks have a hash; a trailing partial block is never cached or transferred.
"""

from __future__ import annotations

import hashlib
import operator
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import SupportsIndex

BLOCK_ID_VERSION = 1
"""Version of this spec; part of every fingerprint, so a change never aliases old blocks."""

HASH_BYTES = 32
_U32_MAX = 0xFFFFFFFF
_U32_CODE = next(code for code in "IL" if array(code).itemsize == 4)


@dataclass(frozen=True)
class KVFingerprint:
    """What makes two engines' KV blocks interchangeable.

    Two engines may share a block only if every field matches: the same model and weights,
    the same KV dtype and layout, the same prefill quantization (which changes the K/V
    values) and the same block size.
    """

    model_id: str
    weights_digest: str
    kv_dtype: str
    kv_layout_version: int
    prefill_quant: str
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if not self.weights_digest:
            raise ValueError("weights_digest must not be empty")

    @cached_property
    def digest(self) -> bytes:
        """sha256 over the fields, each length-prefixed (u32 LE) so no two tuples collide."""
        fields = (
            f"baton-block-id-v{BLOCK_ID_VERSION}",
            self.model_id,
            self.weights_digest,
            self.kv_dtype,
            str(self.kv_layout_version),
            self.prefill_quant,
            str(self.block_size),
        )
        h = hashlib.sha256()
        for value in fields:
            raw = value.encode("utf-8")
            h.update(struct.pack("<I", len(raw)))
            h.update(raw)
        return h.digest()

    @cached_property
    def hex(self) -> str:
        return self.digest.hex()


def root_hash(fingerprint: KVFingerprint, salt: bytes = b"") -> bytes:
    """Parent of the first block of every chain: sha256(fingerprint ‖ tenant cache salt)."""
    return hashlib.sha256(fingerprint.digest + salt).digest()


def _fits_u32(token_id: object) -> bool:
    return isinstance(token_id, SupportsIndex) and 0 <= operator.index(token_id) <= _U32_MAX


def _u32le(token_ids: Sequence[int]) -> bytes:
    """Token ids as consecutive u32 little-endian words; ValueError naming the first id
    that does not fit."""
    try:
        words = array(_U32_CODE, token_ids)
    except (OverflowError, TypeError):
        bad = next(t for t in token_ids if not _fits_u32(t))
        raise ValueError(f"token id {bad!r} does not fit in u32") from None
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


def next_block_hash(parent: bytes, block_token_ids: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash and its token ids."""
    if len(parent) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(parent)}")
    return hashlib.sha256(parent + _u32le(block_token_ids)).digest()


def iter_block_hashes(parent: bytes, token_ids: Sequence[int], block_size: int) -> Iterator[bytes]:
    """Hashes of the full blocks of `token_ids`, chained from `parent`.

    The full blocks' ids are packed in one pass (a prompt of thousands of tokens is hashed
    on every request's arrival, in the router and in each engine); the chain of sha256
    then runs over slices of that buffer."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    full = len(token_ids) // block_size * block_size
    if not full:
        return
    if len(parent) != HASH_BYTES:
        raise ValueError(f"parent hash must be {HASH_BYTES} bytes, got {len(parent)}")
    packed = _u32le(token_ids[:full])
    step = 4 * block_size
    for start in range(0, 4 * full, step):
        parent = hashlib.sha256(parent + packed[start : start + step]).digest()
        yield parent


def block_hashes(
    fingerprint: KVFingerprint, token_ids: Sequence[int], salt: bytes = b""
) -> list[bytes]:
    """Hashes of every full block of a token sequence: what the router, prefill, decode and
    kvstore use to name a prompt's KV blocks."""
    root = root_hash(fingerprint, salt)
    return list(iter_block_hashes(root, token_ids, fingerprint.block_size))
