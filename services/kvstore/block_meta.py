"""BlockMeta: the header every KV block carries on the wire, validated.

A block is named by its chained hash (engine/hashing.py) and laid out as one
`KVBlockFormat` payload (engine/kv_format.py). The header repeats the fingerprint digest,
dtype, shape, size and xxh3-64 checksum so a receiver can refuse a block without trusting
its sender.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from engine.hashing import HASH_BYTES, KVFingerprint
from engine.kv_format import KV_DTYPES, KV_LAYOUT_VERSION, KVBlockFormat
from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.errors import BlockFormatError

_SHAPE_RANK = 5


@functools.lru_cache(maxsize=64)  # bounded: shapes come from clients
def _block_format(shape: tuple[int, ...], dtype: str) -> KVBlockFormat:
    """Built once per (shape, dtype): a put of hundreds of blocks has one shape."""
    num_layers, _, block_size, num_kv_heads, head_dim = shape
    return KVBlockFormat(num_layers, num_kv_heads, head_dim, block_size, dtype)


@dataclass(frozen=True)
class BlockMeta:
    """Identity, layout and checksum of one KV block."""

    hash: bytes
    fingerprint: bytes
    dtype: str
    shape: tuple[int, ...]
    size: int
    checksum: int

    @classmethod
    def from_proto(cls, header: pb.BlockHeader) -> BlockMeta:
        """Reads a wire header, rejecting one that does not describe a valid KV block."""
        meta = cls(
            hash=header.hash,
            fingerprint=header.fingerprint,
            dtype=header.dtype,
            shape=tuple(header.shape),
            size=header.size,
            checksum=header.checksum,
        )
        meta.validate()
        return meta

    @classmethod
    def for_payload(
        cls, block_hash: bytes, fingerprint: KVFingerprint, fmt: KVBlockFormat, checksum: int
    ) -> BlockMeta:
        return cls(
            hash=block_hash,
            fingerprint=fingerprint.digest,
            dtype=fmt.dtype,
            shape=fmt.shape,
            size=fmt.nbytes,
            checksum=checksum,
        )

    def validate(self) -> None:
        name = self.hash.hex() if len(self.hash) == HASH_BYTES else repr(self.hash[:40])
        if len(self.hash) != HASH_BYTES:
            raise BlockFormatError(f"block hash must be {HASH_BYTES} bytes, got {len(self.hash)}")
        if len(self.fingerprint) != HASH_BYTES:
            raise BlockFormatError(
                f"block {name}: fingerprint must be a {HASH_BYTES}-byte digest, "
                f"got {len(self.fingerprint)} bytes"
            )
        if self.dtype not in KV_DTYPES:
            raise BlockFormatError(
                f"block {name}: unknown dtype {self.dtype!r}; choose one of {sorted(KV_DTYPES)}"
            )
        if len(self.shape) != _SHAPE_RANK or self.shape[1] != 2 or min(self.shape) <= 0:
            raise BlockFormatError(
                f"block {name}: shape must be [num_layers, 2, block_size, num_kv_heads, "
                f"head_dim] with every dimension > 0, got {list(self.shape)}"
            )
        if self.size != self.format.nbytes:
            raise BlockFormatError(
                f"block {name}: size {self.size} does not match its {self.dtype} shape "
                f"{list(self.shape)}, which takes {self.format.nbytes} bytes"
            )

    def check_fingerprint(self, fingerprint: KVFingerprint) -> None:
        """Rejects a block that does not belong to the engine `fingerprint` describes."""
        if self.fingerprint != fingerprint.digest:
            raise BlockFormatError(
                f"block {self.hash.hex()}: fingerprint {self.fingerprint.hex()} differs from "
                f"the put's fingerprint {fingerprint.hex} ({fingerprint.model_id})"
            )
        if self.dtype != fingerprint.kv_dtype or self.shape[2] != fingerprint.block_size:
            raise BlockFormatError(
                f"block {self.hash.hex()}: dtype {self.dtype} and block size {self.shape[2]} "
                f"differ from the fingerprint's kv_dtype {fingerprint.kv_dtype} and "
                f"block_size {fingerprint.block_size}"
            )

    @property
    def format(self) -> KVBlockFormat:
        return _block_format(self.shape, self.dtype)

    def to_proto(self) -> pb.BlockHeader:
        return pb.BlockHeader(
            hash=self.hash,
            fingerprint=self.fingerprint,
            dtype=self.dtype,
            shape=self.shape,
            size=self.size,
            checksum=self.checksum,
        )


def fingerprint_from_proto(message: pb.KVFingerprint) -> KVFingerprint:
    """The engine fingerprint a put declares; rejects one this store cannot hold."""
    try:
        fingerprint = KVFingerprint(
            model_id=message.model_id,
            weights_digest=message.weights_digest,
            kv_dtype=message.kv_dtype,
            kv_layout_version=message.kv_layout_version,
            prefill_quant=message.prefill_quant,
            block_size=message.block_size,
        )
    except ValueError as exc:
        raise BlockFormatError(f"invalid fingerprint: {exc}") from None
    if fingerprint.kv_dtype not in KV_DTYPES:
        raise BlockFormatError(
            f"fingerprint kv_dtype {fingerprint.kv_dtype!r} is not one of {sorted(KV_DTYPES)}"
        )
    if fingerprint.kv_layout_version != KV_LAYOUT_VERSION:
        raise BlockFormatError(
            f"fingerprint kv_layout_version {fingerprint.kv_layout_version} is not this "
            f"store's layout version {KV_LAYOUT_VERSION}"
        )
    return fingerprint


def fingerprint_to_proto(fingerprint: KVFingerprint) -> pb.KVFingerprint:
    return pb.KVFingerprint(
        model_id=fingerprint.model_id,
        weights_digest=fingerprint.weights_digest,
        kv_dtype=fingerprint.kv_dtype,
        kv_layout_version=fingerprint.kv_layout_version,
        prefill_quant=fingerprint.prefill_quant,
        block_size=fingerprint.block_size,
    )
