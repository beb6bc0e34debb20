"""Release over real gRPC, two real shards sharing a real Redis index: a release that a
shard holding the lease's pins did not answer is not done, and says so."""

import grpc
import pytest

from services.kvstore.client import Lease
from services.kvstore.errors import KVStoreError
from services.kvstore.placement import rendezvous_owner

from .conftest import RedisProcess, ShardFactory, client_for, make_blocks, make_hashes


async def test_a_release_a_pinning_shard_did_not_answer_raises(
    shard: ShardFactory, redis_server: RedisProcess
) -> None:
    """The client used to skip a shard that did not answer, so a release that never reached
    the pins counted as done (it returned what the other shards released) and nobody
    tried it again: the blocks stayed pinned for the lease's TTL."""
    blocks, hashes = make_blocks(8), make_hashes(8)
    on_b = sum(rendezvous_owner(h, ["a", "b"]) == "b" for h in hashes)
    assert 0 < on_b < len(hashes)  # both shards pin some of the lease's blocks
    async with (
        shard(shard_id="a", index_url=redis_server.url) as a,
        shard(shard_id="b", index_url=redis_server.url) as b,
        client_for(a, topology_ttl_s=60) as client,  # it goes on asking b once b is down
    ):
        await client.put(hashes, list(blocks), lease=Lease.new(ttl_s=60, lease_id="L"))
        assert (len(a.store.leases), len(b.store.leases)) == (1, 1)
        await b.stop(grace_s=None)
        with pytest.raises(KVStoreError, match="lease L: 1 of 2 shards did not answer") as e:
            await client.release("L", timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(a.store.leases) == 0  # the shard that answered did release
        assert [blk.pins for blk in a.store.arena] == [0] * (len(hashes) - on_b)


async def test_releasing_a_lease_no_shard_holds_is_done(
    shard: ShardFactory, redis_server: RedisProcess
) -> None:
    """ "No such lease" (released already, or expired) from every shard is success: 0."""
    blocks, hashes = make_blocks(8), make_hashes(8)
    async with (
        shard(shard_id="a", index_url=redis_server.url) as a,
        shard(shard_id="b", index_url=redis_server.url),
        client_for(a) as client,
    ):
        await client.put(hashes, list(blocks), lease=Lease.new(ttl_s=60, lease_id="L"))
        assert await client.release("L") == len(hashes)
        assert await client.release("L") == 0
        assert await client.release("never-granted") == 0
