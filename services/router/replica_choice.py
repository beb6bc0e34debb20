"""Which replica of a pool takes a request (DESIGN.md "Request path", step 1).

Prefill: the replica whose own prefix cache holds the longest prefix of the prompt's block
hashes, unless it is much busier than the least busy one (affinity never queues a prompt
behind a crowd). Decode: the replica with the fewest requests in flight, then the most free
KV blocks, and never one short of the blocks the prompt needs while another has them.

Replicas report their state in Ray Serve's routing stats (`PoolWorker.record_routing_stats`);
these functions rank them and the request routers in `services.app` hand Ray the ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

R = TypeVar("R")

PREFIX_KEY_BYTES = 8
"""Routing stats carry each cached block hash cut to its first bytes: a compact summary,
and a false match costs only a cache miss."""


def prefix_key(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:PREFIX_KEY_BYTES], "little")


def load(stats: Mapping[str, Any]) -> int:
    return int(stats.get("running", 0)) + int(stats.get("waiting", 0))


def cached_prefix_len(hashes: Sequence[bytes], cached: frozenset[int]) -> int:
    n = 0
    for h in hashes:
        if prefix_key(h) not in cached:
            break
        n += 1
    return n


def rank_prefill(
    replicas: Sequence[R],
    stats: Sequence[Mapping[str, Any]],
    hashes: Sequence[bytes],
    imbalance: int,
) -> list[list[R]]:
    """Best first: the longest cache hit among replicas within `imbalance` requests of the
    least loaded one; then the rest, least loaded first."""
    if not replicas:
        return []
    loads = [load(s) for s in stats]
    floor = min(loads)
    hits = [cached_prefix_len(hashes, s.get("cached_prefixes", frozenset())) for s in stats]
    eligible = [i for i in range(len(replicas)) if loads[i] <= floor + imbalance]
    best = max(eligible, key=lambda i: (hits[i], -loads[i]))
    rest = sorted((i for i in range(len(replicas)) if i != best), key=lambda i: loads[i])
    return [[replicas[best]], [replicas[i] for i in rest]] if rest else [[replicas[best]]]


def rank_decode(
    replicas: Sequence[R], stats: Sequence[Mapping[str, Any]], blocks_needed: int
) -> list[list[R]]:
    """Replicas with room for the prompt first, by (in flight, -free blocks); then the rest."""
    order = sorted(
        range(len(replicas)),
        key=lambda i: (
            int(stats[i].get("free_blocks", 0)) < blocks_needed,
            load(stats[i]),
            -int(stats[i].get("free_blocks", 0)),
        ),
    )
    return [[replicas[i]] for i in order]
