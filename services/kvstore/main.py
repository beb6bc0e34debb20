"""`baton kvstore`: runs one KV store shard until SIGINT or SIGTERM.

Secrets never go on the command line, where `ps` shows them: the shard's token comes from
--token-file or BATON_KVSTORE_TOKEN, Redis's password from the --redis-url (itself often
`$(REDIS_URL)` from a Secret) or BATON_REDIS_PASSWORD (and BATON_REDIS_USERNAME).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

from services.kvstore.codec import MESSAGE_BYTES
from services.kvstore.errors import KVStoreError
from services.kvstore.malloc_tuning import tune_malloc
from services.kvstore.metrics_endpoint import MetricsEndpoint
from services.kvstore.security import TOKEN_ENV, ShardSecurity, read_token_file, token_from_env
from services.kvstore.server import DEFAULT_PORT, KVStoreServer, ServerConfig
from services.tracing import configure_tracing

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """Bytes in a size such as "4GiB", "512MiB" or "1073741824"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; use a number with an optional unit "
            f"({', '.join(u for u in ('KiB', 'MiB', 'GiB', 'TiB', 'KB', 'MB', 'GB'))})"
        )
    return int(float(match.group(1)) * _UNITS[unit or ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton kvstore", description="Run one shard of Baton's KV block store."
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port")
    parser.add_argument(
        "--capacity",
        type=parse_size,
        default=parse_size("4GiB"),
        help="bytes of KV blocks to hold, e.g. 16GiB (default 4GiB)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="prefix index shared by all shards, e.g. redis://redis:6379/0 "
        "(default: an in-process index, for a single shard)",
    )
    parser.add_argument(
        "--shard-id",
        default=socket.gethostname(),
        help="this shard's name in the index (default: the host name)",
    )
    parser.add_argument(
        "--advertise-address",
        default=None,
        help="host:port clients reach this shard at (default: host name and --port)",
    )
    parser.add_argument(
        "--shm-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where the shared-memory arena lives (default /dev/shm)",
    )
    parser.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="keep the arena private; clients on this host use gRPC bytes",
    )
    parser.add_argument(
        "--message-bytes",
        type=parse_size,
        default=MESSAGE_BYTES,
        help=f"size of the bulk messages Get streams are packed into, at most 4MiB "
        f"(default {MESSAGE_BYTES // 2**20}MiB)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics on this port at /metrics (default: none)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"require clients to send the token in this file (default: ${TOKEN_ENV} if set, "
        "else no token)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate: serve TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="INFO",
    )
    return parser


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {port}")
    return port


def security_from(args: argparse.Namespace) -> ShardSecurity:
    token = read_token_file(args.token_file) if args.token_file else token_from_env()
    return ShardSecurity(token, args.tls_cert, args.tls_key, args.tls_client_ca)


async def serve(config: ServerConfig, metrics_port: int | None = None) -> None:
    # Handlers first: SIGINT/SIGTERM while the arena is populated (seconds for GiBs) then
    # stop the shard through the `finally` below instead of killing it with its segment.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = KVStoreServer(config)
    endpoint = None
    try:  # every start-up failure (a metrics port in use) removes the segment too
        await server.start()
        if metrics_port is not None:
            endpoint = MetricsEndpoint(server.store, config.host, metrics_port)
            try:
                await endpoint.start()
            except OSError as exc:
                raise OSError(f"--metrics-port {metrics_port}: {exc.strerror or exc}") from exc
        await stop.wait()
    finally:
        if endpoint is not None:
            await endpoint.stop()
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = ServerConfig(
            shard_id=args.shard_id,
            capacity_bytes=args.capacity,
            host=args.host,
            port=args.port,
            index_url=args.redis_url,
            advertise_address=args.advertise_address,
            shared_memory_dir=None if args.no_shared_memory else args.shm_dir,
            message_bytes=args.message_bytes,
            security=security_from(args),
            index_username=os.environ.get("BATON_REDIS_USERNAME") or None,
            index_password=os.environ.get("BATON_REDIS_PASSWORD") or None,
        )
        config.security.credentials()  # unreadable TLS files: a usage error, now
    except ValueError as exc:
        build_parser().error(str(exc))
    tune_malloc()
    configure_tracing("baton-kvstore")
    try:
        asyncio.run(serve(config, args.metrics_port))
    except KVStoreError as exc:  # the index refused this shard's credentials
        print(f"baton kvstore: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a port in use, no room for the arena, a bad URL
        print(f"baton kvstore: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
