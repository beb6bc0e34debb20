"""Get over real gRPC on 127.0.0.1: a client that stops reading or cancels, and the
verified prefix `get_into` keeps when a block or a shard fails part-way."""

import asyncio
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.codec import decode_get_response
from services.kvstore.errors import KVStoreError
from services.kvstore.server import KVStoreServer
from services.kvstore.servicer import KVStoreServicer
from services.kvstore.shard_client import ShardClient

from .conftest import ShardFactory, client_for, eventually, make_blocks, make_hashes

MESSAGE = 64 * 1024  # the shard's message size here: about fifteen blocks a message


def pinned(server: KVStoreServer) -> int:
    return sum(b.pins for b in server.store.arena)


def reading_slowly(server: KVStoreServer) -> grpc.aio.Channel:
    """A channel that takes only what its reader asks for: with BDP probing off its HTTP/2
    window stays at 64 KiB, so the shard's next write waits until the client reads."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)]
    )


def open_get(channel: grpc.aio.Channel, hashes: list[bytes]) -> grpc.aio.UnaryStreamCall:
    get = channel.unary_stream(
        "/baton.v1.KVStore/Get", request_serializer=pb.GetRequest.SerializeToString
    )
    return get(pb.GetRequest(block_hashes=hashes), timeout=30)


@contextmanager
def no_garbage_collection() -> Iterator[None]:
    """What the handler frees, it frees itself, not the collector behind it."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_get_whose_client_stops_reading_is_abandoned_after_the_idle_limit(
    shard: ShardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that opened a Get and then read nothing kept its blocks pinned for as long
    as it stayed connected. Once the shard has waited `stream_idle_s` to hand it the next
    message, it unpins them and ends the call."""
    caplog.set_level(logging.WARNING)
    blocks, hashes = make_blocks(128), make_hashes(128)  # nine messages
    async with shard(capacity_blocks=256, stream_idle_s=0.5, message_bytes=MESSAGE) as server:
        async with client_for(server) as client:
            await client.put(hashes, list(blocks))
        async with reading_slowly(server) as channel:
            call = open_get(channel, hashes)
            await call.read()  # then nothing: the shard's writes wait on this client
            assert pinned(server) == 128
            await eventually(lambda: pinned(server) == 0)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                while await call.read() is not grpc.aio.EOF:  # what gRPC held, then the end
                    pass
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "the client read nothing for 0.5 s" in (failure.value.details() or "")
    assert errors_logged(caplog) == []


async def test_a_get_read_slowly_is_not_cut_off(shard: ShardFactory) -> None:
    """The idle limit bounds each wait for the client, not the stream: a client that takes
    every message a little later than the shard could send it gets all the blocks."""
    blocks, hashes = make_blocks(256), make_hashes(256)  # seventeen messages
    async with shard(capacity_blocks=256, stream_idle_s=0.5, message_bytes=MESSAGE) as server:
        async with client_for(server) as client:
            await client.put(hashes, list(blocks))
        received: list[bytes] = []
        async with reading_slowly(server) as channel:
            call = open_get(channel, hashes)
            while (raw := await call.read()) is not grpc.aio.EOF:
                received += [c.header.hash for c in decode_get_response(raw) if c.header]
                await asyncio.sleep(0.05)  # seventeen waits: longer than the limit, in all
            assert await call.code() == grpc.StatusCode.OK
        assert received == hashes
        assert pinned(server) == 0


async def test_a_cancelled_get_unpins_at_once_and_logs_no_error(
    shard: ShardFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's cancel is normal operation, but gRPC failed the shard's pending write
    under the handler and logged that as an ERROR with a traceback. The handler sees the
    failed write now, and unpins the blocks itself."""
    caplog.set_level(logging.WARNING)
    blocks, hashes = make_blocks(128), make_hashes(128)
    async with shard(capacity_blocks=256, message_bytes=MESSAGE) as server:
        async with client_for(server) as client:
            await client.put(hashes, list(blocks))
        async with reading_slowly(server) as channel:
            with no_garbage_collection():
                for _ in range(20):  # gRPC's error log lost a race to the cancel at times
                    call = open_get(channel, hashes)
                    await call.read()  # the shard's next write waits on this client
                    call.cancel()
                    await eventually(lambda: pinned(server) == 0)
    assert errors_logged(caplog) == []


async def test_a_get_given_up_as_its_request_goes_out_cancels_its_call(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC does not cancel a streaming call whose reader is cancelled between its request
    going out and its first read: a get_into given up then left the call running, and
    the shard streamed into a window nobody read, the blocks pinned, until the idle limit."""
    blocks, hashes = make_blocks(1024), make_hashes(1024)  # 4 MiB: more than the window
    async with (
        shard(capacity_blocks=1024) as server,
        client_for(server, shared_memory=False) as client,
    ):
        await client.put(hashes, list(blocks))
        shard_client = client._client(f"127.0.0.1:{server.port}")
        start_get = shard_client._get

        def start_then_give_up(*args: Any, **kwargs: Any) -> Any:
            call = start_get(*args, **kwargs)
            task = asyncio.current_task()
            assert task is not None
            # cancelled once the request is out, before the reader resumes: that wait is
            # the one gRPC does not cancel the call for
            call._preparation.add_done_callback(lambda _: task.cancel())
            return call

        with no_garbage_collection():
            monkeypatch.setattr(shard_client, "_get", start_then_give_up)
            with pytest.raises(asyncio.CancelledError):
                await client.get_into(hashes, list(torch.zeros_like(blocks)))
            monkeypatch.setattr(shard_client, "_get", start_get)
            out = torch.zeros_like(blocks[:1])
            assert await client.get_into(hashes[:1], list(out)) == 1  # after the first request
            await eventually(lambda: pinned(server) == 0)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
async def test_a_corrupted_block_ends_the_prefix_before_it(
    shard: ShardFactory, caplog: pytest.LogCaptureFixture, shared_memory: bool
) -> None:
    """A block that fails its checksum on receipt is never used, but the verified blocks
    before it are a prefix hit: the whole get used to fail."""
    blocks, hashes = make_blocks(6), make_hashes(6)
    async with shard() as server, client_for(server, shared_memory=shared_memory) as client:
        await client.put(hashes, list(blocks))
        stored = server.store.arena.get(hashes[3])
        assert stored is not None
        view = server.store.arena.view(stored.offset, stored.meta.size)
        view[0] ^= 0xFF  # one flipped bit in the shard's copy of block 3
        out = torch.zeros_like(blocks)
        with caplog.at_level(logging.WARNING, logger="services.kvstore.client"):
            assert await client.get_into(hashes, list(out)) == 3
        assert torch.equal(out[:3].view(torch.int16), blocks[:3].view(torch.int16))
        assert client.get_failures == {"rejected": 1}
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "services.kvstore.client"]
    assert warning.startswith("KV get: 3 of 6 blocks fetched, the rest are misses: shard at")
    assert f"block {hashes[3].hex()}: " in warning and "checksum" in warning


@pytest.mark.parametrize(
    ("code", "miss"),
    [
        (grpc.StatusCode.INTERNAL, True),
        (grpc.StatusCode.UNKNOWN, True),
        (grpc.StatusCode.DATA_LOSS, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
    ],
)
async def test_a_shard_failing_mid_get_costs_only_what_it_did_not_send(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch, code: grpc.StatusCode, miss: bool
) -> None:
    """A shard that fails part-way through a get loses only the blocks it had not sent
    (the caller recomputes them), unless its status is one the caller must act on."""
    real_get = KVStoreServicer.get

    async def two_then_fail(
        self: KVStoreServicer, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await real_get(self, pb.GetRequest(block_hashes=request.block_hashes[:2]), context)
        await context.abort(code, "the shard failed")

    monkeypatch.setattr(KVStoreServicer, "get", two_then_fail)
    blocks, hashes = make_blocks(4), make_hashes(4)
    async with shard() as server, client_for(server, shared_memory=False) as client:
        await client.put(hashes, list(blocks))
        out = torch.zeros_like(blocks)
        if not miss:
            with pytest.raises(KVStoreError, match="the shard failed") as failure:
                await client.get_into(hashes, list(out))
            assert failure.value.code == code
            return
        assert await client.get_into(hashes, list(out)) == 2
        assert torch.equal(out[:2].view(torch.int16), blocks[:2].view(torch.int16))
        assert client.get_failures == {code.name.lower(): 1}


async def test_a_get_spends_one_timeout_over_its_lookup_and_its_transfers(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow lookup leaves the transfers what is left of the call's timeout, not all of it
    again: `get_into(timeout=...)` bounds the whole call."""
    lookup = KVStoreServicer.lookup

    async def slow_lookup(self: KVStoreServicer, request: Any, context: Any) -> Any:
        await asyncio.sleep(0.4)
        return await lookup(self, request, context)

    given: list[float] = []
    get = ShardClient.get

    async def recording_get(self: ShardClient, *args: Any) -> None:
        given.append(args[3])  # (hashes, out, verify, timeout, filled)
        await get(self, *args)

    monkeypatch.setattr(KVStoreServicer, "lookup", slow_lookup)  # before the shard binds it
    monkeypatch.setattr(ShardClient, "get", recording_get)
    hashes, blocks = make_hashes(4), make_blocks(4)
    async with shard() as server, client_for(server) as client:
        await client.put(hashes, list(blocks))
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out), timeout=1.0) == 4
    assert torch.equal(out.view(torch.uint8), blocks.view(torch.uint8))
    assert len(given) == 1 and given[0] <= 0.6  # at least 0.4 s of the 1.0 went to the lookup


async def test_a_shard_ending_get_shared_without_an_answer_is_a_shard_fault(
    shard: ShardFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GetShared owes the client an answer: a shard that ends it with OK and none is at
    fault (INTERNAL), and a get counts it as that shard's failure and misses its blocks."""

    async def silent(self: KVStoreServicer, requests: Any, context: Any) -> Any:
        await anext(aiter(requests))
        return
        yield

    monkeypatch.setattr(KVStoreServicer, "get_shared", silent)  # before the shard binds it
    blocks, hashes = make_blocks(4), make_hashes(4)
    async with (
        shard() as server,
        client_for(server, shared_memory=False) as plain,
        client_for(server) as client,
    ):
        await plain.put(hashes, list(blocks))  # stored through Put, which is not patched
        out = torch.zeros_like(blocks)
        assert await client.get_into(hashes, list(out)) == 0
        assert client.get_failures == {"internal": 1}
