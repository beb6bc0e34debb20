"""BlockArena: a shard's blocks, their slots in the segment, pins, and LRU eviction.

Every stored block occupies one slot of the shared segment. A block is evictable while
no lease and no in-flight read pins it; when a new slot does not fit, the least recently
used evictable blocks go first:

    blocks (OrderedDict, least recently used first)
    +--------+--------+--------+--------+
    |  A (0) |  B (2) |  C (0) |  D (1) |   (pins)  -> eviction order: A, C
    +--------+--------+--------+--------+

Slots being filled by a put are reserved outside `blocks`: they cannot be evicted, read,
or found until the put commits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.kvstore.allocator import ArenaAllocator, aligned
from services.kvstore.block_meta import BlockMeta
from services.kvstore.segment import HEADER_BYTES, SharedSegment


@dataclass
class StoredBlock:
    meta: BlockMeta
    offset: int
    pins: int = 0
    last_access_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)


class BlockArena:
    def __init__(self, segment: SharedSegment) -> None:
        self.segment = segment
        self._allocator = ArenaAllocator(HEADER_BYTES, segment.size - HEADER_BYTES)
        self._blocks: OrderedDict[bytes, StoredBlock] = OrderedDict()
        self._evicted: list[bytes] = []

    @property
    def capacity(self) -> int:
        return self._allocator.size

    @property
    def used_bytes(self) -> int:
        """Bytes in slots, stored or reserved."""
        return self._allocator.used_bytes

    @property
    def stored_bytes(self) -> int:
        return sum(b.meta.size for b in self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[StoredBlock]:
        return iter(self._blocks.values())

    def get(self, block_hash: bytes) -> StoredBlock | None:
        return self._blocks.get(block_hash)

    def touch(self, block: StoredBlock) -> None:
        self._blocks.move_to_end(block.meta.hash)
        block.last_access_ms = time.time_ns() // 1_000_000

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.segment.view[offset : offset + nbytes]

    def reserve(self, nbytes: int) -> int | None:
        """A slot of `nbytes`, evicting least recently used unpinned blocks to make room;
        None if even evicting every unpinned block leaves no room."""
        if nbytes > self.capacity:
            return None
        offset = self._allocator.allocate(nbytes)
        if offset is None:
            first = next((b for b in self._blocks.values() if b.pins == 0), None)
            # With one model's blocks the first victim's slot already fits: the full scan
            # below is for mixed sizes, off the hot path of a full cache.
            if first is None or (
                aligned(first.meta.size) < aligned(nbytes) and not self._could_fit(nbytes)
            ):
                return None  # evicting would free no range large enough: lose nothing for it
        while offset is None:
            victim = next((b for b in self._blocks.values() if b.pins == 0), None)
            if victim is None:
                return None
            self._remove(victim)
            self._evicted.append(victim.meta.hash)
            offset = self._allocator.allocate(nbytes)
        return offset

    def _could_fit(self, nbytes: int) -> bool:
        """Whether evicting every unpinned block would leave a free range of `nbytes`:
        pinned blocks and reserved slots split the arena, and a slot must be contiguous."""
        spans = self._allocator.free_ranges() + [
            (b.offset, aligned(b.meta.size)) for b in self._blocks.values() if b.pins == 0
        ]
        spans.sort()
        need, run_start, run_end = aligned(nbytes), -1, -1
        for start, length in spans:
            if start != run_end:
                run_start = start
            run_end = start + length
            if run_end - run_start >= need:
                return True
        return False

    def cancel(self, offset: int, nbytes: int) -> None:
        """Frees a reserved slot that was never committed."""
        self._allocator.free(offset, nbytes)

    def commit(self, meta: BlockMeta, offset: int) -> StoredBlock:
        """Publishes a filled slot as a stored, most recently used block."""
        assert meta.hash not in self._blocks, "commit of a block already stored"
        block = StoredBlock(meta, offset)
        self._blocks[meta.hash] = block
        return block

    def pin(self, block: StoredBlock) -> None:
        block.pins += 1

    def unpin(self, block: StoredBlock) -> None:
        assert block.pins > 0, f"unpin of unpinned block {block.meta.hash.hex()}"
        block.pins -= 1

    def drain_evicted(self) -> list[bytes]:
        """Hashes evicted since the last call, oldest first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _remove(self, block: StoredBlock) -> None:
        del self._blocks[block.meta.hash]
        self._allocator.free(block.offset, block.meta.size)
