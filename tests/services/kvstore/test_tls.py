"""A shard serving TLS (and mutual TLS) with certificates made here, over real gRPC."""

from pathlib import Path

import grpc
import pytest
import torch

from services.kvstore import main as kvstore_main
from services.kvstore.errors import KVStoreError
from services.kvstore.security import ClientSecurity, ShardSecurity
from services.kvstore.server import KVStoreServer, ServerConfig

from .certs import Authority
from .conftest import BLOCK, ShardFactory, client_for, make_blocks, make_hashes

TOKEN = "kv-tls-3kQ9"


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def as_bytes(blocks: torch.Tensor) -> bytes:
    return blocks.view(torch.uint8).numpy().tobytes()


async def test_tls_with_a_token_round_trips(shard: ShardFactory, ca: Authority) -> None:
    cert = ca.issue("shard", server=True)
    blocks, hashes = make_blocks(3), make_hashes(3)
    security = ShardSecurity(token=TOKEN, tls_cert=cert.cert, tls_key=cert.key)
    async with shard(security=security) as server:
        trusted = ClientSecurity(token=TOKEN, tls=True, ca_file=ca.ca)
        async with client_for(server, security=trusted, shared_memory=False) as client:
            assert (await client.put(hashes, list(blocks))).stored == 3
            out = torch.zeros_like(blocks)
            assert await client.get_into(hashes, list(out)) == 3
        assert as_bytes(out) == as_bytes(blocks)
        assert server.store.arena.used_bytes == 3 * BLOCK


async def test_clients_that_cannot_verify_the_shard_are_refused(
    shard: ShardFactory, ca: Authority, tmp_path: Path
) -> None:
    cert = ca.issue("shard", server=True)
    stranger_ca = Authority(tmp_path, "another CA")
    async with shard(security=ShardSecurity(tls_cert=cert.cert, tls_key=cert.key)) as server:
        for security in (
            ClientSecurity(),  # plaintext to a TLS port
            ClientSecurity(tls=True, ca_file=stranger_ca.ca),  # a certificate it cannot trust
        ):
            async with client_for(server, security=security, timeout_s=5) as client:
                with pytest.raises(KVStoreError) as failure:
                    await client.put(make_hashes(1), list(make_blocks(1)))
                assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(server.store.arena) == 0


async def test_mutual_tls_admits_only_clients_with_a_certificate_of_its_ca(
    shard: ShardFactory, ca: Authority, tmp_path: Path
) -> None:
    cert = ca.issue("shard", server=True)
    security = ShardSecurity(tls_cert=cert.cert, tls_key=cert.key, client_ca=ca.ca)
    pool = ca.issue("prefill", server=False)
    forged = Authority(tmp_path, "another CA").issue("intruder", server=False)
    async with shard(security=security) as server:
        for identity in (None, forged):
            refused = ClientSecurity(
                tls=True,
                ca_file=ca.ca,
                cert_file=identity and identity.cert,
                key_file=identity and identity.key,
            )
            async with client_for(server, security=refused, timeout_s=5) as client:
                with pytest.raises(KVStoreError) as failure:
                    await client.lookup(make_hashes(1))
                assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        admitted = ClientSecurity(tls=True, ca_file=ca.ca, cert_file=pool.cert, key_file=pool.key)
        async with client_for(server, security=admitted) as client:
            await client.put(make_hashes(2), list(make_blocks(2)))
            assert len(await client.lookup(make_hashes(2))) == 2


def test_incomplete_tls_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="needs both a certificate and its key"):
        ShardSecurity(tls_cert=Path("shard.crt"))
    with pytest.raises(ValueError, match=r"client CA \(mutual TLS\) needs the shard"):
        ShardSecurity(client_ca=Path("ca.pem"))
    with pytest.raises(ValueError, match="needs tls=True"):
        ClientSecurity(ca_file=Path("ca.pem"))
    with pytest.raises(ValueError, match="needs its key"):
        ClientSecurity(tls=True, cert_file=Path("pool.crt"))


async def test_unreadable_certificates_fail_before_the_shard_holds_anything(
    ca: Authority, tmp_path: Path
) -> None:
    cert = ca.issue("shard", server=True)
    not_pem = tmp_path / "cert.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    shm = tmp_path / "shm"
    shm.mkdir()
    for bad, message in (
        (ShardSecurity(tls_cert=tmp_path / "none.crt", tls_key=cert.key), "cannot read the TLS"),
        (ShardSecurity(tls_cert=not_pem, tls_key=cert.key), f"certificate {not_pem} is not PEM"),
        (ShardSecurity(tls_cert=cert.cert, tls_key=not_pem), f"key {not_pem} is not PEM"),
    ):
        config = ServerConfig("s0", 16 * BLOCK, "127.0.0.1", 0, shared_memory_dir=shm, security=bad)
        with pytest.raises(ValueError, match=message):
            KVStoreServer(config)
    assert list(shm.iterdir()) == []


def test_cli_refuses_unusable_tls_flags(
    ca: Authority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = ca.issue("shard", server=True)
    for flags, message in (
        (["--tls-cert", str(cert.cert)], "needs both a certificate and its key (--tls-key)"),
        (
            ["--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(cert.key)],
            f"cannot read the TLS certificate {tmp_path}/none.crt",
        ),
    ):
        with pytest.raises(SystemExit) as exit:
            kvstore_main.main(["--port", "0", "--no-shared-memory", *flags])
        assert exit.value.code == 2
        assert message in capsys.readouterr().err
