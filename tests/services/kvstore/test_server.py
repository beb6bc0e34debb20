"""One shard over real gRPC on 127.0.0.1: transfers, rejections, leases, cancellation."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.hashing import KVFingerprint, block_hashes
from engine.kv_format import KVBlockFormat
from proto.baton.v1 import kvstore_pb2 as pb
from proto.baton.v1 import kvstore_pb2_grpc as pb_grpc
from services.kvstore import shard_client as shard_client_module
from services.kvstore.block_meta import BlockMeta, fingerprint_to_proto
from services.kvstore.client import ClientConfig, KVStoreClient, Lease, PutSummary
from services.kvstore.codec import MAX_MESSAGE_BYTES
from services.kvstore.errors import KVStoreError
from services.kvstore.server import KVStoreServer, ServerConfig

from .conftest import (
    BLOCK,
    FINGERPRINT,
    FORMAT,
    ShardFactory,
    client_for,
    eventually,
    make_blocks,
    make_hashes,
)

START = pb.PutStart(fingerprint=fingerprint_to_proto(FINGERPRINT))


def as_bytes(blocks: torch.Tensor) -> bytes:
    return blocks.view(torch.uint8).numpy().tobytes()


def header(block_hash: bytes, payload: bytes, **changes: object) -> pb.BlockHeader:
    meta = BlockMeta.for_payload(block_hash, FINGERPRINT, FORMAT, xxhash.xxh3_64_intdigest(payload))
    message = meta.to_proto()
    for name, value in changes.items():
        setattr(message, name, value)
    return message


async def raw_put(server: KVStoreServer, requests: list[pb.PutRequest]) -> grpc.aio.AioRpcError:
    """Sends protobuf-encoded PutRequests with the generated stub; returns the error."""
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pb_grpc.KVStoreStub(ch).Put(iter(requests), timeout=10)
    return failure.value


def nothing_stored(server: KVStoreServer) -> bool:
    return len(server.store.arena) == 0 and server.store.arena.used_bytes == 0


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
async def test_round_trip_is_byte_exact(shard: ShardFactory, shared_memory: bool) -> None:
    blocks = make_blocks(1500)  # 6 MiB: several blocks per message, several messages
    hashes = make_hashes(1500)
    async with shard(capacity_blocks=2048) as server:
        async with client_for(
            server, shared_memory=shared_memory, streams=3, stream_min_bytes=2 * 2**20
        ) as client:
            assert await client.put(hashes, list(blocks)) == type(await client.put([], []))(1500, 0)
            assert len(await client.lookup(hashes)) == 1500
            out = torch.zeros_like(blocks)
            assert await client.get_into(hashes, list(out)) == 1500
            assert as_bytes(out) == as_bytes(blocks)
            stats = (await client.stats())["s0"]
        transport = "shm" if shared_memory else "grpc"
        assert stats[
            f'baton_kv_transfer_bytes_total{{direction="get",transport="{transport}"}}'
        ] == (1500 * BLOCK)
        assert stats["baton_kv_store_blocks"] == 1500
        assert stats["baton_kv_store_hits_total"] == 1500


async def test_blocks_larger_than_a_message_are_split(shard: ShardFactory) -> None:
    big = KVBlockFormat(num_layers=80, num_kv_heads=8, head_dim=128, block_size=16, dtype="bf16")
    fingerprint = KVFingerprint("test/big", "digest", "bf16", 1, "fp8", 16)
    assert big.nbytes > MAX_MESSAGE_BYTES
    hashes = block_hashes(fingerprint, list(range(48)))
    blocks = torch.randn(3, *big.shape).to(torch.bfloat16)
    async with shard(capacity_blocks=4 * big.nbytes // BLOCK) as server:
        target = [f"127.0.0.1:{server.port}"]
        async with KVStoreClient(target, fingerprint, big, ClientConfig(shared_memory=False)) as c:
            await c.put(hashes, list(blocks))
            out = torch.zeros_like(blocks)
            assert await c.get_into(hashes, list(out)) == 3
    assert as_bytes(out) == as_bytes(blocks)


async def test_get_returns_the_longest_present_prefix(shard: ShardFactory) -> None:
    blocks, hashes = make_blocks(4), make_hashes(4)
    async with shard() as server, client_for(server) as client:
        await client.put([hashes[0], hashes[1], hashes[3]], [blocks[0], blocks[1], blocks[3]])
        assert len(await client.lookup(hashes)) == 2
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 2
        assert as_bytes(out[:2]) == as_bytes(blocks[:2])


async def test_corrupted_payload_is_data_loss_and_stores_nothing(shard: ShardFactory) -> None:
    payloads = [as_bytes(b) for b in make_blocks(3)]
    hashes = make_hashes(3)
    chunks = [
        pb.BlockChunk(header=header(h, p), data=p) for h, p in zip(hashes, payloads, strict=True)
    ]
    chunks[2].data = payloads[2][:-1] + b"\x00"  # one flipped byte in the last block
    async with shard() as server:
        error = await raw_put(server, [pb.PutRequest(start=START, chunks=chunks)])
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert f"block {hashes[2].hex()}: payload checksum" in (error.details() or "")
        assert nothing_stored(server)


async def test_wrong_fingerprint_is_invalid_argument_and_stores_nothing(
    shard: ShardFactory,
) -> None:
    payload = as_bytes(make_blocks(1))
    good, bad = make_hashes(2)
    chunks = [
        pb.BlockChunk(header=header(good, payload), data=payload),
        pb.BlockChunk(header=header(bad, payload, fingerprint=b"\x01" * 32), data=payload),
    ]
    async with shard() as server:
        error = await raw_put(server, [pb.PutRequest(start=START, chunks=chunks)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "differs from the put's fingerprint" in (error.details() or "")
        assert nothing_stored(server)


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([pb.PutRequest()], "the first PutRequest must carry `start`"),
        ([pb.PutRequest(start=START), pb.PutRequest(start=START)], "only the first PutRequest"),
        ([pb.PutRequest(start=START, chunks=[pb.BlockChunk(data=b"x")])], "outside any block"),
        (
            [pb.PutRequest(start=START, chunks=[pb.BlockChunk(header=header(b"h" * 32, b""))])],
            "stream ended inside block",
        ),
        (
            [pb.PutRequest(start=START, chunks=[pb.BlockChunk(header=header(b"h" * 31, b""))])],
            "block hash must be 32 bytes, got 31",
        ),
        (
            [
                pb.PutRequest(
                    start=START, chunks=[pb.BlockChunk(header=header(b"h" * 32, b"", size=7))]
                )
            ],
            "size 7 does not match its bf16 shape",
        ),
        (
            [pb.PutRequest(start=pb.PutStart(fingerprint=pb.KVFingerprint(kv_dtype="bf16")))],
            "invalid fingerprint: block_size must be > 0",
        ),
    ],
)
async def test_malformed_puts_are_invalid_argument(
    shard: ShardFactory, requests: list[pb.PutRequest], message: str
) -> None:
    async with shard() as server:
        error = await raw_put(server, requests)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (error.details() or "")
        assert nothing_stored(server)


async def test_undecodable_bytes_are_invalid_argument(shard: ShardFactory) -> None:
    async with shard() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            put = channel.stream_unary("/baton.v1.KVStore/Put")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await put(iter([b"\x12\xff\xff\xff\xff\x0f"]), timeout=10)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed message" in (failure.value.details() or "")


async def test_oversized_message_is_resource_exhausted(shard: ShardFactory) -> None:
    payload = bytes(MAX_MESSAGE_BYTES)
    async with shard() as server:
        error = await raw_put(
            server, [pb.PutRequest(start=START, chunks=[pb.BlockChunk(data=payload)])]
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (error.details() or "")
        assert nothing_stored(server)


async def test_cancel_mid_put_leaves_nothing_stranded(shard: ShardFactory) -> None:
    payload = as_bytes(make_blocks(1))
    (block_hash,) = make_hashes(1)
    sent = asyncio.Event()

    async def half_a_put() -> AsyncIterator[pb.PutRequest]:
        first = pb.BlockChunk(header=header(block_hash, payload), data=payload[:1000])
        yield pb.PutRequest(start=START, chunks=[first])
        sent.set()
        await asyncio.Event().wait()  # never sends the rest

    async with shard() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.KVStoreStub(channel).Put(half_a_put(), timeout=30)
            await sent.wait()
            await eventually(lambda: server.store.arena.used_bytes == BLOCK)  # slot reserved
            call.cancel()
        await eventually(lambda: server.store.arena.used_bytes == 0)
        assert nothing_stored(server)


async def test_a_stalled_put_is_abandoned_after_the_idle_limit(shard: ShardFactory) -> None:
    """A client that stays connected but sends nothing held its reserved slots for as long
    as it liked (one small header can reserve a whole arena); after `stream_idle_s` of
    silence the shard frees them and ends the call."""
    payload = as_bytes(make_blocks(1))
    (block_hash,) = make_hashes(1)

    async def half_a_put() -> AsyncIterator[pb.PutRequest]:
        first = pb.BlockChunk(header=header(block_hash, payload), data=payload[:1000])
        yield pb.PutRequest(start=START, chunks=[first])
        await asyncio.Event().wait()  # never sends the rest, never closes

    async with shard(stream_idle_s=0.5) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await pb_grpc.KVStoreStub(channel).Put(half_a_put(), timeout=30)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message from the client for 0.5 s" in (failure.value.details() or "")
        assert server.store.arena.used_bytes == 0 and nothing_stored(server)


async def test_shared_memory_put_abandoned_before_commit_stores_nothing(
    shard: ShardFactory,
) -> None:
    payload = as_bytes(make_blocks(1))
    (block_hash,) = make_hashes(1)
    async with shard() as server:
        async with client_for(server) as client:
            (shard_client,) = [client._client(f"127.0.0.1:{server.port}")]
            segment = await shard_client.shared_segment()
            assert segment is not None and segment.path == server.store.arena.segment.path
            call = shard_client.stub.PutShared(timeout=30)
            reserve = pb.PutSharedReserve(
                start=START, headers=[header(block_hash, payload)], token=segment.token
            )
            await call.write(pb.PutSharedRequest(reserve=reserve))
            slots = await call.read()
            offset = slots.slots.offsets[0]
            segment.view[offset : offset + 100] = payload[:100]  # half-written, then gone
            call.cancel()
        await eventually(lambda: server.store.arena.used_bytes == 0)
        assert nothing_stored(server)


async def test_shared_memory_written_with_wrong_bytes_is_data_loss(shard: ShardFactory) -> None:
    payload = as_bytes(make_blocks(1))
    (block_hash,) = make_hashes(1)
    async with shard() as server, client_for(server) as client:
        shard_client = client._client(f"127.0.0.1:{server.port}")
        segment = await shard_client.shared_segment()
        assert segment is not None
        call = shard_client.stub.PutShared(timeout=30)
        reserve = pb.PutSharedReserve(
            start=START, headers=[header(block_hash, payload)], token=segment.token
        )
        await call.write(pb.PutSharedRequest(reserve=reserve))
        await call.read()  # the client announces the slot but never writes it
        checksums = [xxhash.xxh3_64_intdigest(payload)]
        await call.write(pb.PutSharedRequest(written=pb.PutSharedWritten(checksums=checksums)))
        await call.write(pb.PutSharedRequest(commit=pb.PutSharedCommit()))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.DATA_LOSS
        assert f"block {block_hash.hex()}: its slot holds checksum" in (
            failure.value.details() or ""
        )
        assert nothing_stored(server)


@pytest.mark.parametrize(
    ("announced", "error"),
    [
        (0, "commit after 0 of 2 reserved slots were written"),
        (3, "`written` announces 3 slots; 2 reserved slots are left"),
    ],
    ids=["commit-early", "too-many"],
)
async def test_shared_memory_put_must_announce_each_slot_once(
    shard: ShardFactory, announced: int, error: str
) -> None:
    blocks, hashes = make_blocks(2), make_hashes(2)
    payloads = [as_bytes(b) for b in blocks]
    async with shard() as server, client_for(server) as client:
        shard_client = client._client(f"127.0.0.1:{server.port}")
        segment = await shard_client.shared_segment()
        assert segment is not None
        call = shard_client.stub.PutShared(timeout=30)
        headers = [header(h, p) for h, p in zip(hashes, payloads, strict=True)]
        await call.write(
            pb.PutSharedRequest(
                reserve=pb.PutSharedReserve(start=START, headers=headers, token=segment.token)
            )
        )
        offsets = (await call.read()).slots.offsets
        for offset, payload in zip(offsets, payloads, strict=True):
            segment.view[offset : offset + len(payload)] = payload
        if announced:
            checksums = [xxhash.xxh3_64_intdigest(p) for p in payloads] * 2
            written = pb.PutSharedWritten(checksums=checksums[:announced])
            await call.write(pb.PutSharedRequest(written=written))
        await call.write(pb.PutSharedRequest(commit=pb.PutSharedCommit()))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error in (failure.value.details() or "")
        assert nothing_stored(server)


async def test_shared_memory_put_verifies_written_batches_as_they_arrive(
    shard: ShardFactory,
) -> None:
    blocks, hashes = make_blocks(4), make_hashes(4)
    payloads = [as_bytes(b) for b in blocks]
    async with shard() as server, client_for(server) as client:
        shard_client = client._client(f"127.0.0.1:{server.port}")
        segment = await shard_client.shared_segment()
        assert segment is not None
        call = shard_client.stub.PutShared(timeout=30)
        headers = [header(h, p, checksum=0) for h, p in zip(hashes, payloads, strict=True)]
        await call.write(
            pb.PutSharedRequest(
                reserve=pb.PutSharedReserve(start=START, headers=headers, token=segment.token)
            )
        )
        offsets = (await call.read()).slots.offsets
        checksums = [xxhash.xxh3_64_intdigest(p) for p in payloads]
        for batch in (slice(0, 1), slice(1, 4)):
            for offset, payload in zip(offsets[batch], payloads[batch], strict=True):
                segment.view[offset : offset + len(payload)] = payload
            written = pb.PutSharedWritten(checksums=checksums[batch])
            await call.write(pb.PutSharedRequest(written=written))
        await call.write(pb.PutSharedRequest(commit=pb.PutSharedCommit()))
        result = await call.read()
        assert result.result == pb.PutResponse(stored=4, deduplicated=0)
        stored = {b.meta.hash: b.meta.checksum for b in server.store.arena}
        assert stored == dict(zip(hashes, checksums, strict=True))  # the verified checksums
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 4
        assert as_bytes(out) == as_bytes(blocks)


@pytest.mark.parametrize("second_start", [False, True], ids=["headers-only", "with-start"])
async def test_shared_memory_put_may_reserve_in_several_steps(
    shard: ShardFactory, second_start: bool
) -> None:
    blocks, hashes = make_blocks(3), make_hashes(3)
    payloads = [as_bytes(b) for b in blocks]
    headers = [header(h, p) for h, p in zip(hashes, payloads, strict=True)]
    async with shard() as server, client_for(server) as client:
        shard_client = client._client(f"127.0.0.1:{server.port}")
        segment = await shard_client.shared_segment()
        assert segment is not None
        call = shard_client.stub.PutShared(timeout=30)
        first = pb.PutSharedReserve(start=START, headers=headers[:1], token=segment.token)
        await call.write(pb.PutSharedRequest(reserve=first))
        offsets = list((await call.read()).slots.offsets)
        later = pb.PutSharedReserve(headers=headers[1:])
        if second_start:
            later.start.CopyFrom(START)
        await call.write(pb.PutSharedRequest(reserve=later))
        if second_start:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call.read()
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "only the first `reserve` carries `start`" in (failure.value.details() or "")
            assert nothing_stored(server)
            return
        offsets += (await call.read()).slots.offsets
        assert len(set(offsets)) == 3 and 0 not in offsets
        for offset, payload in zip(offsets, payloads, strict=True):
            segment.view[offset : offset + len(payload)] = payload
        checksums = [xxhash.xxh3_64_intdigest(p) for p in payloads]
        await call.write(pb.PutSharedRequest(written=pb.PutSharedWritten(checksums=checksums)))
        await call.write(pb.PutSharedRequest(commit=pb.PutSharedCommit()))
        assert (await call.read()).result == pb.PutResponse(stored=3, deduplicated=0)
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 3
    assert as_bytes(out) == as_bytes(blocks)


async def test_client_reserves_its_first_batch_alone_and_announces_in_batches(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_client_module, "WRITTEN_BATCH_BYTES", 3 * BLOCK)
    reserved: list[int] = []  # headers per `reserve` message
    handed: list[int] = []  # batches the copy loop hands over
    sent: list[int] = []  # `written` messages (a slow write's successors travel together)
    add, written, reserve = (
        shard_client_module._Announcer.add,
        pb.PutSharedWritten,
        pb.PutSharedReserve,
    )

    def counting_add(self: shard_client_module._Announcer, checksums: list[int]) -> None:
        handed.append(len(checksums))
        add(self, checksums)

    def counting_written(checksums: list[int]) -> pb.PutSharedWritten:
        sent.append(len(checksums))
        return written(checksums=checksums)

    def counting_reserve(**fields: Any) -> pb.PutSharedReserve:
        reserved.append(len(fields["headers"]))
        return reserve(**fields)

    monkeypatch.setattr(shard_client_module._Announcer, "add", counting_add)
    monkeypatch.setattr(pb, "PutSharedWritten", counting_written)
    monkeypatch.setattr(pb, "PutSharedReserve", counting_reserve)
    blocks, hashes = make_blocks(8), make_hashes(8)
    async with shard() as server, client_for(server) as client:
        await client.put(hashes[:2], list(blocks[:2]))  # held already: skipped, not announced
        reserved.clear()
        handed.clear()
        sent.clear()
        assert await client.put(hashes, list(blocks)) == PutSummary(stored=6, deduplicated=2)
        assert reserved == [3, 5]  # the first batch's bytes alone, then the rest
        assert handed == [3, 3, 0]
        assert sum(sent) == 6 and all(n % 3 == 0 for n in sent), sent
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 8
    assert as_bytes(out) == as_bytes(blocks)


async def test_shared_memory_put_of_a_bad_batch_fails_and_stores_nothing(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_client_module, "WRITTEN_BATCH_BYTES", 2 * BLOCK)
    copy_hashed = shard_client_module.copy_hashed
    copies = 0

    def third_copy_misreported(dest: memoryview, source: memoryview) -> int:
        nonlocal copies
        copies += 1
        return copy_hashed(dest, source) ^ (copies == 3)

    monkeypatch.setattr(shard_client_module, "copy_hashed", third_copy_misreported)
    blocks, hashes = make_blocks(8), make_hashes(8)
    async with shard() as server, client_for(server) as client:
        with pytest.raises(KVStoreError) as failure:
            await client.put(hashes, list(blocks))
        assert failure.value.code == grpc.StatusCode.DATA_LOSS
        assert f"block {hashes[2].hex()}: its slot holds checksum" in str(failure.value)
        await eventually(lambda: server.store.arena.used_bytes == 0)
        assert nothing_stored(server)


async def test_get_messages_are_packed_to_the_configured_size(shard: ShardFactory) -> None:
    blocks, hashes = make_blocks(40), make_hashes(40)  # 160 KiB
    message_bytes = 64 * 1024
    async with shard(message_bytes=message_bytes) as server, client_for(server) as client:
        await client.put(hashes, list(blocks))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            get = channel.unary_stream(
                "/baton.v1.KVStore/Get", request_serializer=pb.GetRequest.SerializeToString
            )
            sizes = [len(raw) async for raw in get(pb.GetRequest(block_hashes=hashes))]
    assert all(size <= message_bytes for size in sizes)
    assert len(sizes) == 3  # 40 blocks of 4 KiB plus headers need three 64 KiB messages
    assert sum(sizes) > 40 * BLOCK


@pytest.mark.parametrize("message_bytes", [4095, MAX_MESSAGE_BYTES + 1])
def test_message_size_outside_the_limits_is_refused(message_bytes: int) -> None:
    with pytest.raises(
        ValueError, match=f"message_bytes must be in \\[4096, {MAX_MESSAGE_BYTES}\\]"
    ):
        ClientConfig(message_bytes=message_bytes)
    with pytest.raises(ValueError, match="message_bytes must be in"):
        ServerConfig(shard_id="s", capacity_bytes=BLOCK, message_bytes=message_bytes)


async def test_stale_shared_memory_token_is_failed_precondition(shard: ShardFactory) -> None:
    async with shard() as server, client_for(server) as client:
        call = client._client(f"127.0.0.1:{server.port}").stub.GetShared(timeout=30)
        start = pb.GetSharedStart(block_hashes=make_hashes(1), token=b"stale")
        await call.write(pb.GetSharedRequest(get=start))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_shard_without_shared_memory_serves_bytes(shard: ShardFactory) -> None:
    blocks, hashes = make_blocks(3), make_hashes(3)
    async with shard(shared_memory_dir=None) as server, client_for(server) as client:
        assert server.store.arena.segment.path is None
        await client.put(hashes, list(blocks))
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 3
        stats = (await client.stats())["s0"]
    assert as_bytes(out) == as_bytes(blocks)
    assert stats['baton_kv_transfer_bytes_total{direction="put",transport="grpc"}'] == 3 * BLOCK


async def test_client_rejects_blocks_of_another_fingerprint(
    shard: ShardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A block under another fingerprint is never used: a miss, with a warning saying why."""
    blocks, hashes = make_blocks(2), make_hashes(2)
    other = KVFingerprint("test/other", "digest-2", "bf16", 1, "fp8", 16)
    async with shard() as server:
        async with client_for(server) as client:
            await client.put(hashes, list(blocks))
        target = [f"127.0.0.1:{server.port}"]
        for shared_memory in (False, True):
            config = ClientConfig(shared_memory=shared_memory)
            async with KVStoreClient(target, other, FORMAT, config) as stranger:
                with caplog.at_level(logging.WARNING, logger="services.kvstore.client"):
                    assert await stranger.get_into(hashes, list(torch.zeros_like(blocks))) == 0
                assert stranger.get_failures == {"rejected": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == "services.kvstore.client"]
    assert len(warnings) == 2
    assert all("this client expects bf16" in w for w in warnings), warnings


async def test_leases_pin_and_expire_over_grpc(shard: ShardFactory) -> None:
    blocks, hashes = make_blocks(3), make_hashes(3)
    async with shard(capacity_blocks=3) as server, client_for(server) as client:
        lease = Lease.new(ttl_s=0.3)
        await client.put(hashes[:2], list(blocks[:2]), lease=lease)
        assert await client.lease(hashes, Lease(lease.lease_id, 0.3)) == hashes[:2]
        began = time.monotonic()
        await client.put(hashes[2:], list(blocks[2:]))
        stats = (await client.stats())["s0"]
        assert stats["baton_kv_store_leased_blocks"] == 2
        assert stats["baton_kv_store_leases"] == 1
        await eventually(lambda: len(server.store.leases) == 0)
        assert time.monotonic() - began >= 0.25  # not before its TTL
        stats = (await client.stats())["s0"]
        assert stats["baton_kv_store_lease_expiries_total"] == 1
        assert await client.release(lease.lease_id) == 0


async def test_release_unpins_at_once(shard: ShardFactory) -> None:
    blocks, hashes = make_blocks(2), make_hashes(2)
    async with shard() as server, client_for(server) as client:
        lease = Lease.new(ttl_s=60)
        await client.put(hashes, list(blocks), lease=lease)
        assert [b.pins for b in server.store.arena] == [1, 1]
        assert await client.release(lease.lease_id) == 2
        assert [b.pins for b in server.store.arena] == [0, 0]


async def test_bad_lookup_hash_is_invalid_argument(shard: ShardFactory) -> None:
    async with (
        shard() as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Lookup(pb.LookupRequest(block_hashes=[b"short"]), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "block_hashes[0] is 5 bytes; block hashes are 32 bytes"


async def test_health_and_reflection(shard: ShardFactory) -> None:
    async with (
        shard() as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "baton.v1.KVStore"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in reflection.ServerReflectionInfo(iter([request])):
            names = {s.name for s in answer.list_services_response.service}
            assert {"baton.v1.KVStore", "grpc.health.v1.Health"} <= names


async def test_a_second_shard_on_a_taken_port_fails_instead_of_sharing_it(
    shard: ShardFactory,
) -> None:
    """gRPC sets SO_REUSEPORT by default: a second shard on the port started, and the
    kernel split connections between two unrelated stores."""
    async with shard() as first:
        with pytest.raises(OSError, match="cannot listen"):
            KVStoreServer(ServerConfig("s1", 4 * BLOCK, host="127.0.0.1", port=first.port))


async def test_an_index_unreachable_from_the_start_is_reported(
    shard: ShardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning was logged only after a first success, so a shard whose Redis was never
    reachable (wrong host, port, database or password) said nothing at all."""
    with caplog.at_level(logging.WARNING, logger="services.kvstore.index_sync"):
        async with shard(index_url="redis://127.0.0.1:1/0", index_timeout_s=0.2):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prefix index heartbeat failed" in warnings[0]
