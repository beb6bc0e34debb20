"""LeaseTable: TTL'd pins that keep in-flight handoffs from being evicted.

Prefill pins the blocks of a handoff under a lease id; decode releases the lease once it
has pulled them. A lease nobody releases (its client died) expires after its TTL and its
blocks become evictable again. Granting an existing id adds blocks and restarts its TTL.
A lease holds at least one block: a grant that pins nothing under a new id (this shard
holds none of the blocks) makes no lease, so a lease sent to every shard is counted, and
expires, only where it pins something.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.kvstore.arena import BlockArena, StoredBlock


@dataclass
class _Lease:
    deadline: float
    stamp: int
    """The stamp of this lease's live entry on the deadline heap."""
    blocks: dict[bytes, StoredBlock] = field(default_factory=dict)


class LeaseTable:
    def __init__(self, arena: BlockArena) -> None:
        self._arena = arena
        self._leases: dict[str, _Lease] = {}
        # A heap of (deadline, stamp, lease id). Each lease has one live entry, the one
        # with its stamp; a re-grant or release leaves the old entry behind, stale, and
        # the heap is rebuilt from the live leases once stale entries outnumber them.
        self._deadlines: list[tuple[float, int, str]] = []
        self._stamps = itertools.count()

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def leased_blocks(self) -> int:
        """Distinct blocks pinned by at least one lease."""
        return len({h for lease in self._leases.values() for h in lease.blocks})

    def grant(self, lease_id: str, blocks: Iterable[StoredBlock], ttl_s: float, now: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            blocks = list(blocks)
            if not blocks:
                return
            lease = self._leases[lease_id] = _Lease(now + ttl_s, next(self._stamps))
        else:
            lease.deadline, lease.stamp = now + ttl_s, next(self._stamps)
        heapq.heappush(self._deadlines, (lease.deadline, lease.stamp, lease_id))
        for block in blocks:
            if block.meta.hash not in lease.blocks:
                lease.blocks[block.meta.hash] = block
                self._arena.pin(block)
        self._compact()

    def release(self, lease_id: str) -> int:
        """Unpins a lease's blocks; returns how many (0 for an unknown or expired lease)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return 0
        for block in lease.blocks.values():
            self._arena.unpin(block)
        self._compact()
        return len(lease.blocks)

    def expire(self, now: float) -> int:
        """Releases every lease whose TTL has run out; returns how many expired."""
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, stamp, lease_id = heapq.heappop(self._deadlines)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.stamp == stamp:
                self.release(lease_id)
                expired += 1
        return expired

    def _compact(self) -> None:
        """Drops the stale heap entries once they outnumber the live ones: the heap stays
        at most twice the live leases plus one, at O(1) amortized a grant or release."""
        if len(self._deadlines) > 2 * len(self._leases) + 1:
            self._deadlines = [(x.deadline, x.stamp, i) for i, x in self._leases.items()]
            heapq.heapify(self._deadlines)
