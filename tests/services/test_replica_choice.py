"""Replica ranking for the prefill and decode pools."""

from __future__ import annotations

import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from services.router.ray_request_routers import DecodeRequestRouter, PrefillRequestRouter
from services.router.replica_choice import prefix_key, rank_decode, rank_prefill

H = [bytes([i]) * 32 for i in range(1, 6)]


def cached(*hashes: bytes) -> frozenset[int]:
    return frozenset(prefix_key(h) for h in hashes)


def test_prefill_prefers_the_longest_cached_prefix() -> None:
    stats = [
        {"running": 1, "waiting": 0, "cached_prefixes": cached(H[0])},
        {"running": 2, "waiting": 0, "cached_prefixes": cached(H[0], H[1], H[2])},
        {"running": 0, "waiting": 0, "cached_prefixes": cached(H[1], H[2])},  # not a prefix
    ]
    assert rank_prefill(["a", "b", "c"], stats, H[:4], imbalance=4) == [["b"], ["c", "a"]]


def test_prefill_affinity_yields_to_a_crowd() -> None:
    stats = [
        {"running": 9, "waiting": 3, "cached_prefixes": cached(*H)},
        {"running": 1, "waiting": 0, "cached_prefixes": cached(H[0])},
        {"running": 0, "waiting": 0, "cached_prefixes": frozenset()},
    ]
    assert rank_prefill(["a", "b", "c"], stats, H, imbalance=4) == [["b"], ["c", "a"]]


def test_prefill_without_hits_takes_the_least_loaded() -> None:
    stats = [{"running": 3}, {"running": 1, "waiting": 1}, {"running": 0, "waiting": 1}]
    assert rank_prefill(["a", "b", "c"], stats, H, imbalance=0) == [["c"], ["b", "a"]]
    assert rank_prefill([], [], H, imbalance=0) == []


def test_decode_needs_room_then_fewest_in_flight_then_most_free() -> None:
    stats = [
        {"running": 0, "free_blocks": 2},  # idle but cannot hold the request
        {"running": 3, "free_blocks": 50},
        {"running": 1, "waiting": 1, "free_blocks": 40},
        {"running": 2, "free_blocks": 60},
    ]
    # c and d both have 2 in flight: d has more free blocks.
    assert rank_decode(["a", "b", "c", "d"], stats, blocks_needed=10) == [
        ["d"],
        ["c"],
        ["b"],
        ["a"],
    ]


@pytest.mark.parametrize("router", [PrefillRequestRouter, DecodeRequestRouter])
async def test_ray_routers_ask_ray_to_back_off(router: type) -> None:
    # Without the back-off flag Ray retries a full pool in a tight loop that starves the
    # router replica (seen as a hung n=3 request on 2 cores).
    pending = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata("r", "r"))
    assert not pending.routing_context.should_backoff
    ranked = await router.choose_replicas(object.__new__(router), [], pending)
    assert ranked == [] and pending.routing_context.should_backoff
