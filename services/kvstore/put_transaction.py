"""PutTransaction: one put's blocks, staged in reserved slots until the put commits.

A put is all or nothing. Its blocks are invisible until `commit`; `abort` (a bad block,
a cancelled or broken stream, a client that died) frees every slot it reserved, so a
half-written put leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.hashing import KVFingerprint
from services.kvstore.arena import BlockArena, StoredBlock
from services.kvstore.block_meta import BlockMeta
from services.kvstore.errors import BlockFormatError, CapacityError


@dataclass(frozen=True)
class PutOutcome:
    stored: list[StoredBlock]
    deduplicated: list[StoredBlock]


class PutTransaction:
    def __init__(
        self,
        arena: BlockArena,
        fingerprint: KVFingerprint,
        check_format: Callable[[BlockMeta], None],
        reserve: Callable[[int], int | None],
    ) -> None:
        self.fingerprint = fingerprint
        self._arena = arena
        self._check_format = check_format
        self._reserve = reserve
        self._staged: dict[bytes, tuple[BlockMeta, int]] = {}
        self.block_format: tuple[str, tuple[int, ...]] | None = None  # (dtype, shape)
        self._present: dict[bytes, StoredBlock] = {}  # pinned until commit or abort
        self._open = True

    def stage(self, meta: BlockMeta) -> int | None:
        """Reserves a slot for `meta`; None if the shard (or this put) already has the block."""
        assert self._open, "stage after commit or abort"
        meta.check_fingerprint(self.fingerprint)
        self._check_format(meta)
        block_format = (meta.dtype, tuple(meta.shape))
        if self.block_format is None:
            self.block_format = block_format
        elif block_format != self.block_format:
            raise BlockFormatError(
                f"block {meta.hash.hex()}: {meta.dtype} {list(meta.shape)} differs from the "
                f"{self.block_format[0]} {list(self.block_format[1])} blocks before it in this put"
            )
        if meta.hash in self._staged or meta.hash in self._present:
            return None
        existing = self._arena.get(meta.hash)
        if existing is not None:
            self._arena.pin(existing)
            self._present[meta.hash] = existing
            return None
        offset = self._reserve(meta.size)
        if offset is None:
            raise CapacityError(
                f"no room for block {meta.hash.hex()} ({meta.size} bytes): the arena holds "
                f"{self._arena.capacity} bytes and every remaining block is leased or "
                "part of an unfinished put"
            )
        self._staged[meta.hash] = (meta, offset)
        return offset

    def staged(self) -> list[tuple[BlockMeta, int]]:
        """(header, slot offset) of every block this put will store."""
        return list(self._staged.values())

    def set_checksum(self, block_hash: bytes, checksum: int) -> None:
        """Records the verified checksum of a staged block that was reserved without one."""
        meta, offset = self._staged[block_hash]
        self._staged[block_hash] = (replace(meta, checksum=checksum), offset)

    def commit(self) -> PutOutcome:
        assert self._open, "commit after commit or abort"
        self._open = False
        stored = []
        for meta, offset in self._staged.values():
            raced = self._arena.get(meta.hash)  # a concurrent put of the same block won
            if raced is None:
                stored.append(self._arena.commit(meta, offset))
            else:
                self._arena.cancel(offset, meta.size)
                self._arena.pin(raced)
                self._present[meta.hash] = raced
        for block in self._present.values():
            self._arena.unpin(block)
            self._arena.touch(block)
        return PutOutcome(stored, list(self._present.values()))

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        for meta, offset in self._staged.values():
            self._arena.cancel(offset, meta.size)
        for block in self._present.values():
            self._arena.unpin(block)
