"""A shard given a token admits only KVStore calls that carry it, over real gRPC; the
client library sends it on every call, the shared-memory path included."""

from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.client import Lease
from services.kvstore.errors import KVStoreError
from services.kvstore.security import (
    TOKEN_ENV,
    ClientSecurity,
    ShardSecurity,
    TokenCheck,
    read_token_file,
    token_from_env,
)

from .conftest import BLOCK, ShardFactory, client_for, make_blocks, make_hashes

TOKEN = "kv-7Gq2xN1pVw9"
KVSTORE = pb.DESCRIPTOR.services_by_name["KVStore"]
MISSING = "this kvstore shard requires a token: send `authorization: Bearer <token>` metadata"
WRONG = "kvstore token rejected: it is not the token this shard was given"


def as_bytes(blocks: torch.Tensor) -> bytes:
    return blocks.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
async def test_the_right_token_opens_every_client_call(
    shard: ShardFactory, shared_memory: bool
) -> None:
    blocks, hashes = make_blocks(4), make_hashes(4)
    async with shard(security=ShardSecurity(token=TOKEN)) as server:
        security = ClientSecurity(token=TOKEN)
        async with client_for(server, shared_memory=shared_memory, security=security) as client:
            lease = Lease.new(ttl_s=60)
            assert (await client.put(hashes, list(blocks), lease=lease)).stored == 4
            assert len(await client.lookup(hashes)) == 4
            assert await client.lease(hashes[:2], lease) == hashes[:2]
            out = torch.zeros_like(blocks)
            assert await client.get_into(hashes, list(out)) == 4
            assert await client.release(lease.lease_id) == 4
            stats = (await client.stats())["s0"]
    assert as_bytes(out) == as_bytes(blocks)
    transport = "shm" if shared_memory else "grpc"
    for direction in ("put", "get"):
        key = f'baton_kv_transfer_bytes_total{{direction="{direction}",transport="{transport}"}}'
        assert stats[key] == 4 * BLOCK


@pytest.mark.parametrize(
    ("token", "message"), [(None, MISSING), ("kv-wrong", WRONG), (TOKEN + "x", WRONG)]
)
@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
async def test_a_client_without_the_token_is_unauthenticated_and_changes_nothing(
    shard: ShardFactory, token: str | None, message: str, shared_memory: bool
) -> None:
    blocks, hashes = make_blocks(2), make_hashes(2)
    async with shard(security=ShardSecurity(token=TOKEN)) as server:
        security = ClientSecurity(token=token)
        async with client_for(server, shared_memory=shared_memory, security=security) as client:
            calls = {
                "put": client.put(hashes, list(blocks), lease=Lease.new(60)),
                "get": client.get_into(hashes, list(torch.zeros_like(blocks))),
                "lookup": client.lookup(hashes),
                "lease": client.lease(hashes, Lease.new(60)),
                "release": client.release("lease-1"),
                "stats": client.stats(),
            }
            for name, call in calls.items():
                with pytest.raises(KVStoreError) as failure:
                    await call
                assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED, name
                assert str(failure.value).startswith(f"kvstore shard at 127.0.0.1:{server.port}: ")
                assert message in str(failure.value), name
                assert TOKEN not in str(failure.value)
            # the shared-memory offer (the segment's path and secret) is a gated call too
            (shard_client,) = client._shard_clients.values()
            with pytest.raises(grpc.aio.AioRpcError) as offer:
                await shard_client.stub.OpenSharedMemory(
                    pb.OpenSharedMemoryRequest(), metadata=shard_client.metadata, timeout=10
                )
            assert offer.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert offer.value.details().startswith(message)
        assert len(server.store.arena) == 0 and server.store.arena.used_bytes == 0
        assert len(server.store.leases) == 0
        assert server.store.metrics.transfers == {}


def _raw_call(channel: grpc.aio.Channel, method: MethodDescriptor) -> Awaitable[object]:
    """Calls `method` with an empty request and no metadata, whatever its shape."""
    path = f"/{KVSTORE.full_name}/{method.name}"
    if method.client_streaming and method.server_streaming:
        call = channel.stream_stream(path)(iter([b""]), timeout=10)
        return call.read()
    if method.client_streaming:
        return channel.stream_unary(path)(iter([b""]), timeout=10)
    if method.server_streaming:
        return channel.unary_stream(path)(b"", timeout=10).read()
    return channel.unary_unary(path)(b"", timeout=10)


async def test_every_kvstore_method_is_gated(shard: ShardFactory) -> None:
    """Straight from the proto: a method added later is gated, or this fails."""
    async with (
        shard(security=ShardSecurity(token=TOKEN)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert len(KVSTORE.methods) == 10
        for method in KVSTORE.methods:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await _raw_call(channel, method)
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
            assert failure.value.details().startswith(MISSING), method.name
        assert len(server.store.arena) == 0


async def test_health_and_reflection_stay_open(shard: ShardFactory) -> None:
    """Kubernetes' gRPC probes cannot send a token; reflection describes public protos."""
    async with (
        shard(security=ShardSecurity(token=TOKEN)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=KVSTORE.full_name), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in reflection.ServerReflectionInfo(iter([request]), timeout=10):
            assert KVSTORE.full_name in {s.name for s in answer.list_services_response.service}


async def test_a_shard_without_a_token_admits_anyone(shard: ShardFactory) -> None:
    async with shard() as server:
        assert server.config.security.interceptors() == []
        async with client_for(server, security=ClientSecurity(token=TOKEN)) as client:
            await client.put(make_hashes(1), list(make_blocks(1)))
        async with client_for(server) as client:
            assert len(await client.lookup(make_hashes(1))) == 1


@pytest.mark.parametrize("token", ["", "two words", "tab\there", "é-accent", "x" * 4097])
def test_tokens_that_cannot_travel_as_metadata_are_refused(token: str) -> None:
    for make in (ShardSecurity, ClientSecurity, TokenCheck):
        with pytest.raises(ValueError, match="printable ASCII characters without spaces"):
            make(token=token)  # type: ignore[operator]


def test_token_is_kept_out_of_reprs() -> None:
    assert TOKEN not in repr(ShardSecurity(token=TOKEN))
    assert TOKEN not in repr(ClientSecurity(token=TOKEN))
    assert ClientSecurity(token=TOKEN).metadata == (("authorization", f"Bearer {TOKEN}"),)
    assert ClientSecurity().metadata == ()


def test_token_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # a Secret's file or `echo` leaves a newline
    assert read_token_file(path) == TOKEN
    with pytest.raises(ValueError, match=f"cannot read the kvstore token file {tmp_path}/none"):
        read_token_file(tmp_path / "none")
    path.write_text("\n")
    with pytest.raises(ValueError, match=f"the kvstore token in {path} must be 1 to 4096"):
        read_token_file(path)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert token_from_env() is None
    monkeypatch.setenv(TOKEN_ENV, f" {TOKEN}\n")
    assert token_from_env() == TOKEN
    monkeypatch.setenv(TOKEN_ENV, "two words")
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} must be"):
        token_from_env()
