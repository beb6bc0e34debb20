"""Ray Serve request routers for the pools, ranking replicas with `replica_choice`.

Set on the `prefill` and `decode` deployments (services.app); they run inside the router
replica's deployment handles, reading the routing stats each replica reports.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services.pool_requests import DecodeRequest, PrefillRequest
from services.router.replica_choice import rank_decode, rank_prefill

PREFILL_IMBALANCE = 4
"""A replica holding the prefix may have this many more requests than the least loaded."""


def _first_arg(pending: PendingRequest | None) -> Any:
    """The pool request being routed. Also asks Ray to back off between rounds: without
    `should_backoff` its routing loop retries at once when every replica is full (or its
    queue-length probe is late), spinning on the GIL and starving the router replica's
    own event loops, which then answer nothing."""
    if pending is None:
        return None
    pending.routing_context.should_backoff = True
    return pending.args[0] if pending.args else None


class PrefillRequestRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        request = _first_arg(pending_request)
        hashes = request.block_hashes if isinstance(request, PrefillRequest) else []
        stats = [r.routing_stats for r in candidate_replicas]
        return rank_prefill(candidate_replicas, stats, hashes, PREFILL_IMBALANCE)


class DecodeRequestRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        request = _first_arg(pending_request)
        needed = 0
        if isinstance(request, DecodeRequest):
            tokens = len(request.prompt_token_ids) + request.params.max_tokens
            needed = -(-tokens // 16)
        stats = [r.routing_stats for r in candidate_replicas]
        return rank_decode(candidate_replicas, stats, needed)
