"""Deadline: one client call's time limit, shared by the RPCs it makes.

A `KVStoreClient` call may make several RPCs in turn (a topology refresh, a lookup, then
the transfers; a retry on the shards that remain). Each gets what is left of the call's
`timeout`, so the call as a whole ends by it instead of each RPC taking all of it.
"""

from __future__ import annotations

import time

MIN_RPC_S = 1e-3
"""What an RPC is given once the deadline has passed: gRPC then ends it at once with
DEADLINE_EXCEEDED, the status every caller already handles."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left for the next RPC (at least MIN_RPC_S)."""
        return max(MIN_RPC_S, self._end - time.monotonic())
