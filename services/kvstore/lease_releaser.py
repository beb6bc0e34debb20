"""LeaseReleaser: the one way a handoff's lease is released, whoever lets it go.

Decode releases a lease once it has pulled the handoff, the router when it abandons one,
prefill when its export fails or is cancelled. None of them waits for it, and none fails a
request over it; the lease's TTL is the backstop. A try fails when a shard that may hold
the lease's pins did not answer (`KVStoreClient.release` raises): it is tried again after
`backoff_s`, then twice that, and so on, until `attempts` tries are spent; then the lease
is left to its TTL with one warning. A shard that answers "no such lease" (expired, or
released already by another holder) has nothing pinned: that is success.

    releaser = LeaseReleaser()
    releaser.release_in_background(client, lease_id, timeout=5)
    ...
    await releaser.close()   # shutdown: releases still trying are cancelled and awaited
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.kvstore.client import KVStoreClient

log = logging.getLogger(__name__)

RELEASE_ATTEMPTS = 3
RELEASE_BACKOFF_S = 1.0  # then twice that: a shard that stalled for a moment has answered


class LeaseReleaser:
    """Releases leases with retries, in the background or awaited; owns the background
    tasks until they end or `close` cancels them."""

    def __init__(
        self,
        attempts: int = RELEASE_ATTEMPTS,
        backoff_s: float = RELEASE_BACKOFF_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`sleep` waits out each backoff (tests pass one that does not wait)."""
        if attempts < 1 or backoff_s < 0:
            raise ValueError(
                f"attempts must be >= 1 and backoff_s >= 0, got {attempts}, {backoff_s}"
            )
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._tasks: set[asyncio.Task[bool]] = set()  # held here: the loop keeps weak refs
        self._closed = False

    @property
    def pending(self) -> int:
        """Releases started in the background and still trying."""
        return len(self._tasks)

    def release_in_background(
        self, client: KVStoreClient, lease_id: str, timeout: float | None = None
    ) -> None:
        """Starts `release` without waiting for it (no request waits on a release)."""
        if self._closed:
            log.warning("lease %s: not released (shutting down); it expires with its TTL", lease_id)
            return
        task = asyncio.ensure_future(self.release(client, lease_id, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(
        self, client: KVStoreClient, lease_id: str, timeout: float | None = None
    ) -> bool:
        """Releases `lease_id` on every shard, trying again while a try fails; `timeout`
        bounds each try. True once released; False when it was left to its TTL."""
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                await client.release(lease_id, timeout=timeout)
                return True
            except Exception as e:  # tried again, then the TTL: never fail a request for it
                problem = str(e)
        log.warning(
            "lease %s: not released in %d tries (last: %s); it expires with its TTL",
            lease_id,
            self.attempts,
            problem,
        )
        return False

    async def close(self) -> None:
        """Cancels the releases still trying (their leases expire with their TTLs) and
        waits for them to end; later releases are not started."""
        self._closed = True
        tasks = list(self._tasks)
        if tasks:
            log.warning(
                "%d lease releases still trying at shutdown: left to their TTLs", len(tasks)
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
