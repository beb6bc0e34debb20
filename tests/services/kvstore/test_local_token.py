"""The token from configuration to the wire: ServingConfig's kvstore section, the bridge
the pools move blocks through, and `baton serve`, whose local shard requires a token of
its own making that only the pools are given."""

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from baton.serve import start_kvstore, with_kvstore_token
from services.kv_bridge import KVBridge
from services.kvstore.client import ClientConfig, KVStoreClient
from services.kvstore.errors import KVStoreError
from services.kvstore.security import TOKEN_ENV, ClientSecurity, ShardSecurity
from services.serving_config import KVStoreSection, ServingConfig

from .conftest import FINGERPRINT, FORMAT, ShardFactory, free_port, make_blocks, make_hashes

TOKEN = "kv-local-Yt5e"


def test_the_section_resolves_the_token_where_the_pool_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert KVStoreSection().client_security() == ClientSecurity()
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert KVStoreSection().client_security().token == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    section = KVStoreSection(token_file=str(tmp_path / "token"))
    assert section.client_security().token == "from-file"
    assert KVStoreSection(token=TOKEN).client_security().token == TOKEN
    tls = KVStoreSection(tls=True, tls_ca_file="/etc/ca.pem").client_security()
    assert (tls.tls, tls.ca_file) == (True, Path("/etc/ca.pem"))
    assert TOKEN not in repr(KVStoreSection(token=TOKEN))
    # the config crosses to Ray replicas as JSON: the token must survive the trip
    assert (
        ServingConfig.model_validate_json(
            ServingConfig(kvstore=KVStoreSection(token=TOKEN)).model_dump_json()
        ).kvstore.token
        == TOKEN
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"token": TOKEN, "token_file": "/t"},
            "kvstore.token and kvstore.token_file are exclusive",
        ),
        ({"token": "two words"}, "kvstore token must be 1 to 4096 printable ASCII"),
        ({"tls_ca_file": "/etc/ca.pem"}, "a CA bundle or client certificate needs tls=True"),
        ({"tls": True, "tls_key_file": "/k"}, "a client certificate needs its key"),
    ],
)
def test_the_section_refuses_inconsistent_security(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KVStoreSection.model_validate(fields)


async def test_the_bridge_sends_the_configured_token(shard: ShardFactory) -> None:
    engine = SimpleNamespace(engine=SimpleNamespace(block_format=FORMAT))
    async with shard(security=ShardSecurity(token=TOKEN)) as server:
        target = [f"127.0.0.1:{server.port}"]
        bridge = KVBridge(engine, target, 5, 30, ClientSecurity(token=TOKEN))  # type: ignore[arg-type]
        await bridge.client(FINGERPRINT).put(make_hashes(2), list(make_blocks(2)))
        assert await bridge.cached_in_store(FINGERPRINT, make_hashes(2)) == 2
        await bridge.close()
        anonymous = KVBridge(engine, target, 5, 30)  # type: ignore[arg-type]
        with pytest.raises(KVStoreError, match="requires a token"):
            await anonymous.cached_in_store(FINGERPRINT, make_hashes(2))
        await anonymous.close()


def test_baton_serve_makes_a_token_unless_one_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    made = [with_kvstore_token(ServingConfig()).kvstore.token for _ in range(2)]
    assert all(t is not None and len(t) >= 32 for t in made) and made[0] != made[1]
    configured = ServingConfig(kvstore=KVStoreSection(token=TOKEN))
    assert with_kvstore_token(configured).kvstore.token == TOKEN
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert with_kvstore_token(ServingConfig()).kvstore.token == "from-env"


async def test_baton_serve_starts_a_shard_that_admits_only_the_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    port = free_port()
    kv = KVStoreSection(targets=[f"127.0.0.1:{port}"], capacity="4MiB")
    config = with_kvstore_token(ServingConfig(kvstore=kv))
    shard = start_kvstore(config)
    try:
        assert TOKEN_ENV not in os.environ  # given to the shard alone, not to this process
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert shard.poll() is None, "the shard exited"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "the shard did not start"
                await asyncio.sleep(0.1)
        pools = ClientConfig(security=config.kvstore.client_security(), shared_memory=False)
        async with KVStoreClient(kv.targets, FINGERPRINT, FORMAT, pools) as client:
            await client.put(make_hashes(1), list(make_blocks(1)))
            assert len(await client.lookup(make_hashes(1))) == 1
        async with KVStoreClient(kv.targets, FINGERPRINT, FORMAT) as stranger:
            with pytest.raises(KVStoreError) as failure:
                await stranger.lookup(make_hashes(1))
            assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        shard.terminate()
        assert shard.wait(timeout=30) == 0
