"""RedisPrefixIndex against a real redis-server, and two shards sharing it."""

import asyncio
import random

import hiredis
import torch

from services.kvstore.index import IndexEntry, Location, ShardInfo, open_index
from services.kvstore.memory_index import InProcessPrefixIndex
from services.kvstore.placement import rendezvous_owner
from services.kvstore.redis_index import RedisPrefixIndex

from .conftest import RedisProcess, ShardFactory, client_for, eventually, make_blocks, make_hashes

A, B = ShardInfo("a", "127.0.0.1:1"), ShardInfo("b", "127.0.0.1:2")


def entries(hashes: list[bytes]) -> list[IndexEntry]:
    return [IndexEntry(h, 4096, i, 1000 + i) for i, h in enumerate(hashes)]


async def test_lookup_is_the_longest_live_prefix(redis_server: RedisProcess) -> None:
    index = RedisPrefixIndex(redis_server.url)
    hashes = make_hashes(6)
    for shard in (A, B):
        assert await index.heartbeat(shard, ttl_s=0.3) is True  # first announcement
    await index.update("a", entries(hashes[:2]), [])
    await index.update("b", entries(hashes[2:4]), [])
    await index.update("a", entries(hashes[5:]), [])
    assert await index.lookup(hashes) == [
        Location(A, 4096, 0),
        Location(A, 4096, 1),
        Location(B, 4096, 0),
        Location(B, 4096, 1),
    ]
    await index.update("b", [], [hashes[3]])
    assert len(await index.lookup(hashes)) == 3
    await asyncio.sleep(0.35)  # b's liveness lapses: its blocks are misses, not errors
    await index.heartbeat(A, ttl_s=5)
    assert len(await index.lookup(hashes)) == 2
    assert await index.live_shards() == [A]
    await index.close()


async def test_lookup_learns_shards_that_announced_after_it_last_looked(
    redis_server: RedisProcess,
) -> None:
    reader, writer = RedisPrefixIndex(redis_server.url), RedisPrefixIndex(redis_server.url)
    hashes = make_hashes(4)
    await writer.heartbeat(A, 5)
    await writer.update("a", entries(hashes[:2]), [])
    assert [loc.shard for loc in await reader.lookup(hashes)] == [A, A]
    await writer.heartbeat(B, 5)  # b joins after the reader's last lookup
    await writer.update("b", entries(hashes[2:]), [])
    assert [loc.shard for loc in await reader.lookup(hashes)] == [A, A, B, B]
    await writer.close()
    await reader.close()


def test_lookup_packs_one_mget_exactly_as_hiredis_would() -> None:
    index = RedisPrefixIndex("redis://127.0.0.1:1/0", key_prefix="p:")
    hashes = make_hashes(3)
    keys = [b"p:block:" + h.hex().encode() for h in hashes] + [b"p:shard:a", b"p:shard:bb"]
    assert index._pack_lookup(hashes, [b"a", b"bb"]) == hiredis.pack_command((b"MGET", *keys))


async def test_removal_only_deletes_the_removers_entry(redis_server: RedisProcess) -> None:
    index = RedisPrefixIndex(redis_server.url)
    (h,) = make_hashes(1)
    await index.heartbeat(A, 5)
    await index.heartbeat(B, 5)
    await index.update("a", entries([h]), [])
    await index.update("b", entries([h]), [])
    await index.update("a", [], [h])  # a's eviction must not drop b's copy
    assert [loc.shard for loc in await index.lookup([h])] == [B]
    await index.close()


async def test_reconcile_makes_the_index_equal_to_the_inventory(redis_server: RedisProcess) -> None:
    index = RedisPrefixIndex(redis_server.url)
    hashes = make_hashes(4)
    await index.heartbeat(A, 5)
    await index.update("a", entries(hashes[:3]), [])
    await index.reconcile("a", entries(hashes[1:]))
    assert len(await index.lookup(hashes)) == 0  # hashes[0] is gone
    assert len(await index.lookup(hashes[1:])) == 3
    await index.close()


async def test_flush_is_detected_by_the_next_heartbeat(redis_server: RedisProcess) -> None:
    index = RedisPrefixIndex(redis_server.url)
    assert await index.heartbeat(A, 5) is True
    assert await index.heartbeat(A, 5) is False
    await index._redis.flushall()
    assert await index.heartbeat(A, 5) is True
    await index.close()


async def test_in_process_index_matches_the_interface() -> None:
    index = open_index(None)
    assert isinstance(index, InProcessPrefixIndex)
    hashes = make_hashes(3)
    assert await index.heartbeat(A, 5) is True
    await index.update("a", entries(hashes), [hashes[1]])
    assert await index.lookup(hashes) == [Location(A, 4096, 0)]
    await index.reconcile("a", entries(hashes[1:]))
    assert len(await index.lookup(hashes[1:])) == 2 and await index.lookup(hashes) == []


def test_unknown_index_url_names_the_choices() -> None:
    try:
        open_index("etcd://x")
    except ValueError as exc:
        assert "use 'memory' or a URL with one of the schemes redis, rediss, unix" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_rendezvous_placement_is_stable_and_minimal() -> None:
    hashes = make_hashes(200)
    before = {h: rendezvous_owner(h, ["a", "b", "c"]) for h in hashes}
    after = {h: rendezvous_owner(h, ["a", "b"]) for h in hashes}
    assert {before[h] for h in hashes} == {"a", "b", "c"}
    assert all(after[h] == before[h] for h in hashes if before[h] != "c")


async def test_two_shards_survive_a_redis_restart_with_32_clients(
    shard: ShardFactory, redis_server: RedisProcess
) -> None:
    clients_n, per_client = 32, 8
    blocks = make_blocks(clients_n * per_client, seed=1)
    hashes = make_hashes(clients_n * per_client, seed=1)
    async with (
        shard(shard_id="a", index_url=redis_server.url, capacity_blocks=512) as a,
        shard(shard_id="b", index_url=redis_server.url, capacity_blocks=512) as b,
    ):
        clients = [
            client_for(random.Random(i).choice([a, b]), shared_memory=i % 2 == 0)
            for i in range(clients_n)
        ]

        def mine(i: int) -> slice:
            return slice(i * per_client, (i + 1) * per_client)

        async def put_half(i: int) -> None:
            half = slice(mine(i).start, mine(i).start + per_client // 2)
            await clients[i].put(hashes[half], list(blocks[half]))

        async def put_rest_and_check(i: int) -> None:
            rest = slice(mine(i).start + per_client // 2, mine(i).stop)
            await clients[i].put(hashes[rest], list(blocks[rest]))
            out = torch.zeros_like(blocks[mine(i)])
            assert await clients[i].get_into(hashes[mine(i)], list(out)) == per_client
            assert torch.equal(out.view(torch.uint8), blocks[mine(i)].view(torch.uint8))

        await asyncio.gather(*(put_half(i) for i in range(clients_n)))
        redis_server.kill()  # mid-test: shards keep serving from their arenas
        await asyncio.gather(*(put_rest_and_check(i) for i in range(clients_n)))
        redis_server.start()  # empty: the shards must re-announce what they hold
        index = RedisPrefixIndex(redis_server.url)
        await eventually(lambda: a.sync._dirty is False and b.sync._dirty is False)
        locations = await index.lookup(hashes)
        assert len(locations) == len(hashes)  # no block lost
        held = {s: {blk.meta.hash for blk in srv.store.arena} for s, srv in (("a", a), ("b", b))}
        assert held["a"].isdisjoint(held["b"])  # none duplicated
        assert held["a"] | held["b"] == set(hashes)
        for h, loc in zip(hashes, locations, strict=True):
            assert h in held[loc.shard.shard_id]  # each found where it is
            assert loc.shard.shard_id == rendezvous_owner(h, ["a", "b"])
        assert await clients[1].lookup(hashes) == locations  # the same through Lookup
        out = torch.zeros_like(blocks)
        assert await clients[0].get_into(hashes, list(out)) == len(hashes)
        assert torch.equal(out.view(torch.uint8), blocks.view(torch.uint8))  # none mixed up
        await asyncio.gather(*(c.close() for c in clients))
        await index.close()
