"""BlockStore: one shard's blocks, leases, the block formats it has seen, and its metrics.

Everything here runs on the server's event loop between awaits, so it needs no locks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.arena import BlockArena, StoredBlock
from services.kvstore.block_meta import BlockMeta, fingerprint_from_proto
from services.kvstore.errors import BlockFormatError
from services.kvstore.leases import LeaseTable
from services.kvstore.metrics import KVStoreMetrics
from services.kvstore.put_transaction import PutOutcome, PutTransaction
from services.kvstore.segment import SharedSegment

MAX_LEASE_TTL_MS = 3_600_000
MAX_LEASE_ID_CHARS = 128


def check_lease(lease_id: str, ttl_ms: int) -> None:
    """Rejects a lease id or TTL a client got wrong."""
    if not lease_id or len(lease_id) > MAX_LEASE_ID_CHARS:
        raise BlockFormatError(f"lease_id must be 1 to {MAX_LEASE_ID_CHARS} characters")
    if not 0 < ttl_ms <= MAX_LEASE_TTL_MS:
        raise BlockFormatError(f"lease ttl_ms must be in (0, {MAX_LEASE_TTL_MS}], got {ttl_ms}")


class BlockStore:
    def __init__(self, segment: SharedSegment) -> None:
        self.arena = BlockArena(segment)
        self.leases = LeaseTable(self.arena)
        self.metrics = KVStoreMetrics()
        # fingerprint digest -> (dtype, shape): one model's blocks always look alike
        self._formats: dict[bytes, tuple[str, tuple[int, ...]]] = {}

    def begin_put(self, start: pb.PutStart) -> PutTransaction:
        fingerprint = fingerprint_from_proto(start.fingerprint)
        if start.lease_id:
            check_lease(start.lease_id, start.lease_ttl_ms)
        self.expire_leases()
        return PutTransaction(self.arena, fingerprint, self._check_block, self._reserve)

    def commit_put(self, txn: PutTransaction, start: pb.PutStart) -> PutOutcome:
        block_format = txn.block_format
        if block_format is not None:  # a concurrent put may have committed another format
            self._check_format(txn.fingerprint.digest, *block_format, "this put's blocks")
        outcome = txn.commit()
        if block_format is not None:
            # Recorded once blocks of it exist: a failed put leaves no format behind.
            self._formats.setdefault(txn.fingerprint.digest, block_format)
        if start.lease_id:
            self.leases.grant(
                start.lease_id,
                [*outcome.stored, *outcome.deduplicated],
                start.lease_ttl_ms / 1000,
                time.monotonic(),
            )
        return outcome

    def lease(self, lease_id: str, hashes: Sequence[bytes], ttl_ms: int) -> list[StoredBlock]:
        check_lease(lease_id, ttl_ms)
        self.expire_leases()
        blocks = [b for b in map(self.arena.get, hashes) if b is not None]
        self.leases.grant(lease_id, blocks, ttl_ms / 1000, time.monotonic())
        return blocks

    def release(self, lease_id: str) -> int:
        self.expire_leases()
        return self.leases.release(lease_id)

    def pin_for_read(self, hashes: Sequence[bytes]) -> list[StoredBlock]:
        """The requested blocks this shard holds, in request order, pinned until `unpin`."""
        blocks = []
        for block_hash in hashes:
            block = self.arena.get(block_hash)
            if block is None:
                self.metrics.misses += 1
                continue
            self.metrics.hits += 1
            self.arena.pin(block)
            self.arena.touch(block)
            blocks.append(block)
        return blocks

    def unpin(self, blocks: Sequence[StoredBlock]) -> None:
        for block in blocks:
            self.arena.unpin(block)

    def expire_leases(self) -> int:
        expired = self.leases.expire(time.monotonic())
        self.metrics.lease_expiries += expired
        return expired

    def drain_evicted(self) -> list[bytes]:
        evicted = self.arena.drain_evicted()
        self.metrics.evictions += len(evicted)
        return evicted

    def samples(self) -> list[pb.MetricSample]:
        self.expire_leases()
        return self.metrics.samples(
            blocks=len(self.arena),
            stored_bytes=self.arena.stored_bytes,
            capacity=self.arena.capacity,
            used_bytes=self.arena.used_bytes,
            leases=len(self.leases),
            leased_blocks=self.leases.leased_blocks,
        )

    def _reserve(self, nbytes: int) -> int | None:
        offset = self.arena.reserve(nbytes)
        if offset is None and self.expire_leases():
            offset = self.arena.reserve(nbytes)  # an expired lease may have freed room
        return offset

    def _check_block(self, meta: BlockMeta) -> None:
        self._check_format(meta.fingerprint, meta.dtype, meta.shape, f"block {meta.hash.hex()}")

    def _check_format(
        self, fingerprint: bytes, dtype: str, shape: tuple[int, ...], what: str
    ) -> None:
        seen = self._formats.get(fingerprint)
        if seen is not None and seen != (dtype, shape):
            raise BlockFormatError(
                f"{what}: {dtype} {list(shape)} differs from the {seen[0]} {list(seen[1])} "
                f"blocks stored under fingerprint {fingerprint.hex()}"
            )
