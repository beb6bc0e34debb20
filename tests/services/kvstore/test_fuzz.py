"""Every method of the KV store's gRPC service under random and mutated input: each call
ends with a clear client-side status (INVALID_ARGUMENT, DATA_LOSS, NOT_FOUND, ...) or
succeeds, never INTERNAL or UNKNOWN, and the shard keeps serving a real client after.

Raw bytes go on the wire through a generic channel (identity serializers), so what the
shard parses is exactly what hypothesis made: garbage, messages that parse into random
field values, and valid messages with a few bytes changed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.block_meta import fingerprint_to_proto
from services.kvstore.server import KVStoreServer, ServerConfig
from tests.services.kvstore.conftest import BLOCK, FINGERPRINT, client_for, make_blocks, make_hashes

SERVICE = "/baton.v1.KVStore/"
UNARY = ("Lookup", "Lease", "Release", "Stats", "ListShards", "OpenSharedMemory")
REQUEST_STREAM = ("Put",)
RESPONSE_STREAM = ("Get",)
BIDI = ("PutShared", "GetShared")
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Shard:
    """A shard on its own event loop thread, reached through a plain channel."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        config = ServerConfig(shard_id="fuzz", capacity_bytes=64 * BLOCK, host="127.0.0.1", port=0)
        started = threading.Event()

        async def start() -> KVStoreServer:
            server = KVStoreServer(config)  # grpc.aio binds to the loop it is made on
            await server.start()
            return server

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")

    def call(self, method: str, requests: list[bytes]) -> grpc.StatusCode:
        """Sends raw request bytes; the status the call ended with."""
        path = SERVICE + method
        try:
            if method in UNARY:
                self.channel.unary_unary(path)(requests[0], timeout=10)
            elif method in REQUEST_STREAM:
                self.channel.stream_unary(path)(iter(requests), timeout=10)
            elif method in RESPONSE_STREAM:
                for _ in self.channel.unary_stream(path)(requests[0], timeout=10):
                    pass
            else:
                for _ in self.channel.stream_stream(path)(iter(requests), timeout=10):
                    pass
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def still_serves(self) -> None:
        async def round_trip() -> None:
            client = client_for(self.server)
            try:
                hashes = make_hashes(2, seed=99)
                await client.put(hashes, list(make_blocks(2, seed=99)))
                assert len(await client.lookup(hashes)) == 2
            finally:
                await client.close()

        asyncio.run_coroutine_threadsafe(round_trip(), self.loop).result(timeout=30)

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def shard() -> Iterator[Shard]:
    s = Shard()
    yield s
    s.stop()


def valid_requests() -> dict[str, bytes]:
    """One well-formed request per method, for mutation."""
    hashes = make_hashes(3, seed=7)
    fingerprint = fingerprint_to_proto(FINGERPRINT)
    header = pb.BlockHeader(
        hash=hashes[0],
        fingerprint=b"\x01" * 32,
        dtype="bf16",
        shape=[2, 2, 16, 2, 16],
        size=BLOCK,
        checksum=12345,
    )
    return {
        "Lookup": pb.LookupRequest(block_hashes=hashes).SerializeToString(),
        "Put": pb.PutRequest(
            start=pb.PutStart(fingerprint=fingerprint),
            chunks=[pb.BlockChunk(header=header, data=b"\x00" * BLOCK)],
        ).SerializeToString(),
        "Get": pb.GetRequest(block_hashes=hashes).SerializeToString(),
        "Lease": pb.LeaseRequest(block_hashes=hashes, ttl_ms=1000).SerializeToString(),
        "Release": pb.ReleaseRequest(lease_id="nope").SerializeToString(),
        "Stats": pb.StatsRequest().SerializeToString(),
        "ListShards": pb.ListShardsRequest().SerializeToString(),
        "OpenSharedMemory": pb.OpenSharedMemoryRequest().SerializeToString(),
        "PutShared": pb.PutSharedRequest().SerializeToString(),
        "GetShared": pb.GetSharedRequest().SerializeToString(),
    }


METHODS = UNARY + REQUEST_STREAM + RESPONSE_STREAM + BIDI


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes_are_client_errors_or_served(shard: Shard, method: str) -> None:
    @FUZZ
    @given(st.lists(st.binary(max_size=512), min_size=1, max_size=4))
    def check(requests: list[bytes]) -> None:
        assert shard.call(method, requests) not in SERVER_FAULTS

    check()
    shard.still_serves()


@pytest.mark.parametrize("method", METHODS)
def test_mutated_valid_messages_are_client_errors_or_served(shard: Shard, method: str) -> None:
    original = valid_requests()[method]

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
    def check(flips: list[tuple[int, int]]) -> None:
        data = bytearray(original)
        for at, value in flips:
            if data:
                data[at % len(data)] = value
        assert shard.call(method, [bytes(data)] * 2) not in SERVER_FAULTS

    check()
    shard.still_serves()
