"""PrefixIndex: which shard holds which block, shared by every shard of a cache.

Two backends implement it: `InProcessPrefixIndex` (one shard, the embedded default) and
`RedisPrefixIndex` (several shards sharing one Redis). `open_index` picks one from a URL.
The index may lag the shards (an update lost while Redis was down); a shard heals it by
re-announcing its inventory (`reconcile`). A stale entry costs a miss, never wrong data:
shards return only blocks they hold, and receivers verify every block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import grpc

from services.kvstore.errors import KVStoreError

INDEX_BACKENDS = ("memory", "redis", "rediss", "unix")


class ShardInfo(NamedTuple):
    shard_id: str
    address: str


class IndexEntry(NamedTuple):
    """What the index knows of one block a shard holds."""

    block_hash: bytes
    size: int
    checksum: int
    last_access_ms: int


class Location(NamedTuple):
    """Where one block of a looked-up prefix lives (a tuple: lookups build hundreds)."""

    shard: ShardInfo
    size: int
    checksum: int


class IndexRefusedError(KVStoreError):
    """The index refused this shard's credentials (wrong or missing password, an ACL user
    without the needed permissions): waiting will not help. To clients, whose lookups it
    fails, the index is simply unavailable."""

    code = grpc.StatusCode.UNAVAILABLE


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class PrefixIndex(ABC):
    @abstractmethod
    async def lookup(self, hashes: Sequence[bytes]) -> list[Location]:
        """Locations of the longest prefix of `hashes` held by live shards, in one round
        trip; a block whose shard is gone ends the prefix like any other miss."""

    @abstractmethod
    async def live_shards(self) -> list[ShardInfo]:
        """Shards whose heartbeat is current, sorted by id."""

    @abstractmethod
    async def heartbeat(self, shard: ShardInfo, ttl_s: float) -> bool:
        """Marks `shard` live for `ttl_s` seconds. True when the index may have lost what
        the shard announced before (first heartbeat, Redis restarted or flushed, or the
        shard's liveness lapsed): the shard must `reconcile`."""

    @abstractmethod
    async def update(
        self, shard_id: str, added: Sequence[IndexEntry], removed: Sequence[bytes]
    ) -> None:
        """Records blocks a shard stored and forgets blocks it evicted."""

    @abstractmethod
    async def reconcile(self, shard_id: str, inventory: Sequence[IndexEntry]) -> None:
        """Makes the index's view of `shard_id` exactly `inventory`."""

    @abstractmethod
    async def close(self) -> None:
        """Releases connections; the index is unusable afterwards."""


def open_index(
    url: str | None, username: str | None = None, password: str | None = None
) -> PrefixIndex:
    """`None` or "memory" for the in-process index, a redis:// (rediss:// for TLS, unix://)
    URL for Redis. The URL's user and password (redis://user:pass@host) win over
    `username` and `password`."""
    from services.kvstore.memory_index import InProcessPrefixIndex
    from services.kvstore.redis_index import RedisPrefixIndex

    scheme = "memory" if url is None or url == "memory" else url.partition("://")[0]
    if scheme == "memory":
        return InProcessPrefixIndex()
    if scheme in INDEX_BACKENDS:
        return RedisPrefixIndex(url or "", username=username, password=password)
    raise ValueError(
        f"unknown prefix index {redact_url(url or '')!r}; use 'memory' or a URL with one of "
        f"the schemes {', '.join(INDEX_BACKENDS[1:])}"
    )
