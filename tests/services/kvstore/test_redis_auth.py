"""A shard against a real redis-server that requires a password (and ACL users, and TLS):
without the right credentials it refuses to start, says why, and leaves nothing behind."""

import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis

from services.kvstore.index import IndexRefusedError, open_index, redact_url
from services.kvstore.redis_index import RedisPrefixIndex
from services.kvstore.server import KVStoreServer, ServerConfig

from .certs import Authority
from .conftest import BLOCK, RedisProcess, client_for, free_port, make_blocks, make_hashes

PASSWORD = "pw-Zq81rT"


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, "--requirepass", PASSWORD)
    admin = redis.Redis(port=server.port, password=PASSWORD)
    # an ACL user of the index's keys, and one that may only read
    admin.acl_setuser(
        "baton", enabled=True, passwords=["+pw-user"], keys=["baton:kv:*"], commands=["+@all"]
    )
    admin.acl_setuser(
        "reader",
        enabled=True,
        passwords=["+pw-read"],
        keys=["baton:kv:*"],
        commands=["+@read", "+@connection"],
    )
    admin.close()
    yield server
    server.kill()


def with_credentials(url: str, credentials: str) -> str:
    return url.replace("redis://", f"redis://{credentials}@")


@asynccontextmanager
async def started(config: ServerConfig) -> AsyncIterator[KVStoreServer]:
    server = KVStoreServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s=None)


def shard_config(index_url: str, shm: Path | None = None, **more: object) -> ServerConfig:
    return ServerConfig(
        "s0", 64 * BLOCK, "127.0.0.1", 0, index_url=index_url, shared_memory_dir=shm, **more
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("credentials", [None, ":not-it", "baton:not-it"])
async def test_a_shard_without_the_password_refuses_to_start_and_leaves_nothing(
    locked_redis: RedisProcess, tmp_path: Path, credentials: str | None
) -> None:
    url = (
        locked_redis.url if credentials is None else with_credentials(locked_redis.url, credentials)
    )
    shm = tmp_path / "shm"
    shm.mkdir()
    server = KVStoreServer(shard_config(url, shm))
    assert len(list(shm.iterdir())) == 1  # the arena, until start fails
    with pytest.raises(IndexRefusedError) as failure:
        await server.start()
    message = str(failure.value)
    assert message.startswith(f"prefix index at {redact_url(url)} refused this shard's credentials")
    assert "give Redis's password in the URL (redis://:PASSWORD@host:6379/0" in message
    assert "not-it" not in message  # a wrong password is never echoed
    assert list(shm.iterdir()) == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))  # the port is free again
    admin = redis.Redis(port=locked_redis.port, password=PASSWORD)
    assert admin.keys("baton:kv:*") == []
    admin.close()


@pytest.mark.parametrize(
    ("credentials", "password"),
    [(f":{PASSWORD}", None), ("baton:pw-user", None), (None, PASSWORD)],
    ids=["password-in-url", "acl-user-in-url", "password-from-environment"],
)
async def test_with_the_credentials_the_shard_serves_through_redis(
    locked_redis: RedisProcess, credentials: str | None, password: str | None
) -> None:
    url = (
        locked_redis.url if credentials is None else with_credentials(locked_redis.url, credentials)
    )
    hashes = make_hashes(3)
    async with (
        started(shard_config(url, index_password=password)) as server,
        client_for(server) as client,
    ):
        await client.put(hashes, list(make_blocks(3)))
        assert [loc.shard.shard_id for loc in await client.lookup(hashes)] == ["s0"] * 3
    admin = redis.Redis(port=locked_redis.port, password=PASSWORD)
    assert admin.smembers("baton:kv:shards") == {b"s0"}
    assert admin.scard("baton:kv:shard:s0:blocks") == 3
    admin.close()


async def test_a_user_without_the_needed_commands_is_named_as_the_problem(
    locked_redis: RedisProcess,
) -> None:
    url = with_credentials(locked_redis.url, "reader:pw-read")
    with pytest.raises(IndexRefusedError) as failure:
        await KVStoreServer(shard_config(url)).start()
    assert str(failure.value).startswith(
        f"prefix index at {redact_url(url)}: the Redis user may not run a command the index needs"
    )
    assert "scripting commands on keys baton:kv:*" in str(failure.value)


def test_urls_are_redacted_and_credentials_reach_redis() -> None:
    assert redact_url("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("rediss://:secret@h:6380/2?ssl_ca_certs=/ca.pem") == (
        "rediss://:***@h:6380/2?ssl_ca_certs=/ca.pem"
    )
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    index = open_index("redis://h:6379/0", "user", "from-env")
    assert isinstance(index, RedisPrefixIndex) and index.url == "redis://h:6379/0"
    kwargs = index._redis.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("user", "from-env")
    url_wins = open_index("redis://other:in-url@h:6379/0", "user", "from-env")
    kwargs = url_wins._redis.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("other", "in-url")
    with pytest.raises(ValueError, match=r"unknown prefix index 'http://u:\*\*\*@h'"):
        open_index("http://u:secret@h")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Authority]]:
    """A redis-server that speaks only TLS (and wants a password), certified by a CA made
    here; yields its rediss:// URL and the CA."""
    ca = Authority(tmp_path)
    cert = ca.issue("redis", server=True)
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
            "--tls-ca-cert-file", str(ca.ca), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=ca.ca)
    deadline = time.monotonic() + 10
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server with TLS did not start") from None
            time.sleep(0.02)
    yield f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca.ca}", ca
    process.kill()
    process.wait()


async def test_rediss_urls_reach_redis_over_tls(tls_redis: tuple[str, Authority]) -> None:
    url, _ = tls_redis
    hashes = make_hashes(2)
    async with started(shard_config(url)) as server, client_for(server) as client:
        await client.put(hashes, list(make_blocks(2)))
        assert len(await client.lookup(hashes)) == 2
        index = server.sync.index
        assert isinstance(index, RedisPrefixIndex)
        assert [s.shard_id for s in await index.live_shards()] == ["s0"]
