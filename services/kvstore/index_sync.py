"""IndexSync: keeps the prefix index true to one shard's blocks.

Puts publish what they stored (and what their reservations evicted) before they answer,
so a handoff's blocks are findable the moment prefill returns. When an update fails
(Redis down) the shard keeps serving and marks itself dirty; every tick it renews its
heartbeat, and when the index may have lost its entries (dirty, Redis restarted or
flushed, liveness lapsed) or the periodic reconciliation is due, it re-announces its
whole inventory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from services.kvstore.arena import StoredBlock
from services.kvstore.errors import KVStoreError
from services.kvstore.index import IndexEntry, IndexRefusedError, PrefixIndex, ShardInfo
from services.kvstore.metrics import KVStoreMetrics

log = logging.getLogger(__name__)


def index_entry(block: StoredBlock) -> IndexEntry:
    return IndexEntry(block.meta.hash, block.meta.size, block.meta.checksum, block.last_access_ms)


class IndexSync:
    def __init__(
        self,
        index: PrefixIndex,
        shard: ShardInfo,
        inventory: Callable[[], list[StoredBlock]],
        metrics: KVStoreMetrics,
        *,
        heartbeat_ttl_s: float,
        reconcile_interval_s: float,
        timeout_s: float,
    ) -> None:
        self.index = index
        self.shard = shard
        self._inventory = inventory
        self._metrics = metrics
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._reconcile_interval_s = reconcile_interval_s
        self._timeout_s = timeout_s
        self._dirty = True
        self._warned = False  # a failure was logged and no tick has succeeded since
        self._last_reconcile = 0.0
        self._forgotten: list[bytes] = []
        self._lock = asyncio.Lock()  # a reconcile's snapshot must not interleave with updates

    async def publish(self, added: Sequence[StoredBlock], removed: Sequence[bytes]) -> None:
        """Announces stored and evicted blocks; a failure is logged and healed later."""
        removed = [*self._forgotten, *removed]
        self._forgotten = []
        if not added and not removed:
            return
        async with self._lock:
            try:
                entries = [index_entry(b) for b in added]
                await asyncio.wait_for(
                    self.index.update(self.shard.shard_id, entries, removed), self._timeout_s
                )
            except (KVStoreError, TimeoutError) as exc:
                self._failed("update", exc)

    def forget(self, removed: Sequence[bytes]) -> None:
        """Queues evictions for the next publish or tick (for callers that cannot await)."""
        self._forgotten += removed

    async def announce(self) -> None:
        """The shard's first tick. Raises IndexRefusedError when the index refuses this
        shard's credentials, which no later tick would heal; any other failure is left to
        later ticks, as in `tick`."""
        await self.tick(raise_refused=True)

    async def tick(self, *, raise_refused: bool = False) -> None:
        """Heartbeat, then reconcile if the index may be wrong or the period is due.
        `raise_refused`: raise IndexRefusedError instead of logging it."""
        async with self._lock:
            try:
                lost = await asyncio.wait_for(
                    self.index.heartbeat(self.shard, self._heartbeat_ttl_s), self._timeout_s
                )
                due = time.monotonic() - self._last_reconcile >= self._reconcile_interval_s
                if lost or self._dirty or due:
                    if lost and not self._dirty:
                        log.info(
                            "prefix index lost shard %s's entries; re-announcing",
                            self.shard.shard_id,
                        )
                    self._forgotten = []  # the inventory below supersedes queued removals
                    inventory = [index_entry(b) for b in self._inventory()]
                    await self.index.reconcile(self.shard.shard_id, inventory)
                    self._dirty = False
                    self._last_reconcile = time.monotonic()
                if self._warned:
                    log.info("prefix index reachable again (shard %s)", self.shard.shard_id)
                    self._warned = False
            except (KVStoreError, TimeoutError) as exc:
                if raise_refused and isinstance(exc, IndexRefusedError):
                    raise
                self._failed("heartbeat", exc)
        if self._forgotten:
            await self.publish([], [])

    def _failed(self, what: str, exc: Exception) -> None:
        self._metrics.index_errors += 1
        if not self._warned:  # once per outage, the first one from start-up included
            log.warning("prefix index %s failed (%s); will reconcile when it is back", what, exc)
            self._warned = True
        self._dirty = True
