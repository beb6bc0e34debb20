"""LeaseTable: TTL'd pins that keep in-flight handoffs from being evicted.

Prefill pins the blocks of a handoff under a lease id; decode releases the lease once it
has pulled them. A lease nobody releases (its client died) expires after its TTL and its
blocks become evictable again. Granting an existing id adds blocks and restarts its TTL.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.kvstore.arena import BlockArena, StoredBlock


@dataclass
class _Lease:
    deadline: float
    blocks: dict[bytes, StoredBlock] = field(default_factory=dict)


class LeaseTable:
    def __init__(self, arena: BlockArena) -> None:
        self._arena = arena
        self._leases: dict[str, _Lease] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap; stale entries are skipped

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def leased_blocks(self) -> int:
        """Distinct blocks pinned by at least one lease."""
        return len({h for lease in self._leases.values() for h in lease.blocks})

    def grant(self, lease_id: str, blocks: Iterable[StoredBlock], ttl_s: float, now: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._leases[lease_id] = _Lease(deadline=now + ttl_s)
        else:
            lease.deadline = now + ttl_s
        heapq.heappush(self._deadlines, (lease.deadline, lease_id))
        for block in blocks:
            if block.meta.hash not in lease.blocks:
                lease.blocks[block.meta.hash] = block
                self._arena.pin(block)

    def release(self, lease_id: str) -> int:
        """Unpins a lease's blocks; returns how many (0 for an unknown or expired lease)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return 0
        for block in lease.blocks.values():
            self._arena.unpin(block)
        return len(lease.blocks)

    def expire(self, now: float) -> int:
        """Releases every lease whose TTL has run out; returns how many expired."""
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, lease_id = heapq.heappop(self._deadlines)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.deadline == deadline:
                self.release(lease_id)
                expired += 1
        return expired
