"""Rendezvous (highest random weight) placement of blocks on shards.

Every writer computes the same owner from the same live shard set, with no coordination;
when a shard joins or leaves, only the blocks it wins or held move.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash


def rendezvous_owner(block_hash: bytes, shard_ids: Sequence[str]) -> str:
    """The shard with the highest xxh3-64 of (shard id ‖ block hash)."""
    if not shard_ids:
        raise ValueError("no shards to place a block on")
    return max(shard_ids, key=lambda s: (xxhash.xxh3_64_intdigest(s.encode() + block_hash), s))
