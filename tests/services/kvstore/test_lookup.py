"""A shard whose Lookup answer is malformed, over real gRPC: the answer is that shard's
fault, so its blocks are misses (one warning), not an error in the caller's request."""

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.servicer import KVStoreServicer

from .conftest import ShardFactory, client_for, make_blocks, make_hashes


def more_hits_than_asked(answer: pb.LookupResponse) -> None:
    answer.shard_index.append(0)
    answer.sizes.append(answer.sizes[0])
    answer.checksums.append(answer.checksums[0])


def columns_of_different_lengths(answer: pb.LookupResponse) -> None:
    del answer.sizes[-1]


def unknown_shard_index(answer: pb.LookupResponse) -> None:
    answer.shard_index[0] = len(answer.shards)


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (more_hits_than_asked, "a hit of 3 blocks to a lookup of 2"),
        (columns_of_different_lengths, "columns of different lengths"),
        (unknown_shard_index, "an unknown shard index"),
    ],
)
async def test_a_malformed_lookup_answer_is_a_miss(
    shard: ShardFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[pb.LookupResponse], None],
    problem: str,
) -> None:
    """It used to raise INVALID_ARGUMENT, the status of a caller's mistake, out of lookup
    and get_into (which then failed instead of missing), or, for more hits than asked,
    to hand the caller a cached prefix longer than its prompt."""
    lookup = KVStoreServicer.lookup

    async def malformed(self: KVStoreServicer, request: Any, context: Any) -> Any:
        answer = await lookup(self, request, context)
        corrupt(answer)
        return answer

    monkeypatch.setattr(KVStoreServicer, "lookup", malformed)  # before the shard binds it
    blocks, hashes = make_blocks(2), make_hashes(2)
    async with shard() as server, client_for(server) as client:
        await client.put(hashes, list(blocks))
        with caplog.at_level(logging.WARNING, logger="services.kvstore.client"):
            assert await client.lookup(hashes) == []
            assert await client.get_into(hashes, list(torch.zeros_like(blocks))) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "services.kvstore.client"]
    assert (
        warnings
        == [
            f"KV lookup: the shard at 127.0.0.1:{server.port} answered {problem}; counted as a miss"
        ]
        * 2
    )  # one a call
