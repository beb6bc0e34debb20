"""KVStoreClient: how prefill and decode workers put, find, pin and fetch KV blocks.

    client = KVStoreClient(["kvstore-0:50052"], fingerprint, block_format)
    hit = await client.lookup(hashes)                    # longest cached prefix
    lease = Lease.new(ttl_s=30)
    await client.lease(hashes[: len(hit)], lease)        # pin the cached prefix
    await client.put(hashes[len(hit):], blocks, lease=lease)
    ...                                                   # hand (hashes, lease.lease_id) over
    n = await client.get_into(hashes, cache_slots)       # decode side
    await client.release(lease.lease_id)                 # or LeaseReleaser, which retries

A block is any buffer of exactly one block payload (`KVBlockFormat.nbytes`): a contiguous
CPU tensor such as one block of the block-major paged cache, a memoryview, bytes. Puts go
to the shard that rendezvous hashing picks among the live shards; gets go where the
prefix index says each block is. Every received block is checked against the requested
hash, this client's fingerprint and format, and its checksum before `get_into` uses it:
a block that fails, like a shard that is down, is a miss, and the prefix ends before it.
A malformed Lookup answer is the answering shard's fault too: a miss, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TypeVar

import grpc
import torch

from engine.hashing import HASH_BYTES, KVFingerprint
from engine.kv_format import KVBlockFormat
from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.block_meta import BlockMeta, fingerprint_to_proto
from services.kvstore.codec import MAX_MESSAGE_BYTES, MESSAGE_BYTES
from services.kvstore.deadline import Deadline
from services.kvstore.errors import (
    BlockFormatError,
    KVStoreError,
    RejectedBlockError,
)
from services.kvstore.index import Location, ShardInfo
from services.kvstore.malloc_tuning import tune_malloc
from services.kvstore.placement import rendezvous_owner
from services.kvstore.security import ClientSecurity
from services.kvstore.shard_client import ShardClient

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BlockBuffer = torch.Tensor | memoryview | bytes | bytearray

# a shard that cannot answer makes its blocks misses; any other failure is an error
_MISS_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A get takes more failures for misses of the blocks it has not verified yet: a block that
# failed verification on receipt (RejectedBlockError, DATA_LOSS) and a shard that failed
# mid-stream (DATA_LOSS, INTERNAL, UNKNOWN); the caller recomputes those blocks. What the
# caller must fix (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, ...) still raises.
_GET_MISS_CODES = (
    *_MISS_CODES,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 30.0
    """Deadline of each call unless the call passes its own."""
    streams: int = 2
    """Parallel gRPC streams per shard for one large transfer (more streams on one
    HTTP/2 connection contend for its flow-control window: see bench/RESULTS.md)."""
    stream_min_bytes: int = 16 * 2**20
    """A transfer is split only into streams of at least this many bytes."""
    message_bytes: int = MESSAGE_BYTES
    """Size of the bulk messages puts are packed into (at most MAX_MESSAGE_BYTES)."""
    shared_memory: bool = True
    """Use a same-host shard's shared-memory arena when it can be mapped."""
    topology_ttl_s: float = 5.0
    """How long the live shard list is trusted before it is asked for again."""
    tune_malloc: bool = True
    """Tune this process's glibc malloc for receiving bulk gRPC messages (see
    malloc_tuning.py: without it a get costs ~1.5x the CPU)."""
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """The token every call carries and the shards' TLS (security.py)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.streams < 1 or self.stream_min_bytes < 1:
            raise ValueError("timeout_s must be > 0, streams and stream_min_bytes >= 1")
        if not 4096 <= self.message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"message_bytes must be in [4096, {MAX_MESSAGE_BYTES}], got {self.message_bytes}"
            )


@dataclass(frozen=True)
class Lease:
    """A lease id and TTL; blocks pinned under it stay until it is released or expires."""

    lease_id: str
    ttl_s: float

    @classmethod
    def new(cls, ttl_s: float, lease_id: str = "") -> Lease:
        """A lease of `ttl_s` under `lease_id`, or under a fresh random id."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        return cls(lease_id or uuid.uuid4().hex, ttl_s)


@dataclass(frozen=True)
class PutSummary:
    stored: int
    """Blocks newly stored."""
    deduplicated: int
    """Blocks the store already held (still pinned by the put's lease, if any)."""


def block_view(block: BlockBuffer, nbytes: int, *, writable: bool) -> memoryview:
    """The bytes of one whole block, without a copy."""
    if isinstance(block, torch.Tensor):
        if block.device.type != "cpu":
            raise ValueError(
                f"KV blocks must be in host memory, got a tensor on {block.device}; "
                "copy it to a (pinned) host buffer first"
            )
        if not block.is_contiguous():
            raise ValueError("a KV block tensor must be contiguous (one slice of the cache)")
        view = memoryview(block.detach().reshape(-1).view(torch.uint8).numpy().data)
    else:
        view = memoryview(block).cast("B")
    if view.nbytes != nbytes:
        raise ValueError(f"a KV block is {nbytes} bytes in this format, got {view.nbytes}")
    if writable and view.readonly:
        raise ValueError("get_into needs writable block buffers")
    return view


def _series(sample: pb.MetricSample) -> str:
    """`name{label="value",...}` without the constant pool label, or just `name`."""
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "pool")
    return f"{sample.name}{{{labels}}}" if labels else sample.name


class KVStoreClient:
    def __init__(
        self,
        targets: Sequence[str],
        fingerprint: KVFingerprint,
        block_format: KVBlockFormat,
        config: ClientConfig | None = None,
    ) -> None:
        if not targets:
            raise ValueError("KVStoreClient needs at least one shard address")
        if (fingerprint.kv_dtype, fingerprint.block_size) != (
            block_format.dtype,
            block_format.block_size,
        ):
            raise ValueError(
                f"fingerprint (kv_dtype {fingerprint.kv_dtype}, block_size "
                f"{fingerprint.block_size}) disagrees with the block format "
                f"({block_format.dtype}, {block_format.block_size})"
            )
        self.fingerprint = fingerprint
        self.block_format = block_format
        self._meta(bytes(HASH_BYTES), 0).validate()  # every block this client sends looks alike
        self.config = config or ClientConfig()
        if self.config.tune_malloc:
            tune_malloc()
        self._seeds = list(targets)
        self._shard_clients: dict[str, ShardClient] = {}
        self._topology: list[ShardInfo] = []
        self._topology_at = -float("inf")
        self.get_failures: Counter[str] = Counter()
        """Shard transfers of `get_into` cut short by a block that failed verification
        ("rejected") or by the shard's fault ("data_loss", "internal", "unknown"): their
        blocks not yet verified became misses."""

    async def __aenter__(self) -> KVStoreClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._shard_clients.values()))
        self._shard_clients.clear()

    async def lookup(self, hashes: Sequence[bytes], timeout: float | None = None) -> list[Location]:
        """Where each block of the longest cached prefix of `hashes` lives. A malformed
        answer (more hits than asked, columns that disagree) is logged and is no hit."""
        return await self._lookup(hashes, self._deadline(timeout))

    async def _lookup(self, hashes: Sequence[bytes], deadline: Deadline) -> list[Location]:
        request = pb.LookupRequest(block_hashes=hashes)

        async def ask(c: ShardClient) -> tuple[str, pb.LookupResponse]:
            return c.address, await c.stub.Lookup(
                request, timeout=deadline.left(), metadata=c.metadata
            )

        address, response = await self._any_shard(ask)
        shards = [ShardInfo(s.shard_id, s.address) for s in response.shards]
        hit = len(response.shard_index)
        problem = ""
        if (len(response.sizes), len(response.checksums)) != (hit, hit):
            problem = "columns of different lengths"
        elif hit > len(hashes):
            problem = f"a hit of {hit} blocks to a lookup of {len(hashes)}"
        elif hit and max(response.shard_index) >= len(shards):
            problem = "an unknown shard index"
        if problem:
            # The shard's fault, not the request's: its answer is a miss, like no answer.
            log.warning(
                "KV lookup: the shard at %s answered %s; counted as a miss", address, problem
            )
            return []
        return list(
            map(
                tuple.__new__,
                repeat(Location),
                zip(
                    map(shards.__getitem__, response.shard_index),
                    response.sizes,
                    response.checksums,
                    strict=True,
                ),
            )
        )

    async def put(
        self,
        hashes: Sequence[bytes],
        blocks: Sequence[BlockBuffer],
        *,
        lease: Lease | None = None,
        timeout: float | None = None,
    ) -> PutSummary:
        """Stores blocks (all or none per shard stream); pins them under `lease` if given."""
        if len(hashes) != len(blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(blocks)} blocks")
        nbytes = self.block_format.nbytes
        # checksums are computed by the transport, each while its block is in cache
        items = [
            (block_hash, block_view(block, nbytes, writable=False))
            for block_hash, block in zip(hashes, blocks, strict=True)
        ]
        for block_hash, _ in items:
            if len(block_hash) != HASH_BYTES:
                raise BlockFormatError(
                    f"block hash must be {HASH_BYTES} bytes, got {len(block_hash)}"
                )
        start = pb.PutStart(fingerprint=fingerprint_to_proto(self.fingerprint))
        if lease is not None:
            start.lease_id, start.lease_ttl_ms = lease.lease_id, max(1, round(lease.ttl_s * 1e3))
        deadline = self._deadline(timeout)
        pending = list(range(len(items)))
        for attempt in range(2):
            shards = await self._shards(refresh=attempt > 0, deadline=deadline)
            by_owner: dict[str, list[int]] = defaultdict(list)
            ids = [s.shard_id for s in shards]
            address = {s.shard_id: s.address for s in shards}
            for i in pending:
                by_owner[address[rendezvous_owner(items[i][0], ids)]].append(i)
            results = await asyncio.gather(
                *(
                    self._client(addr).put(
                        start, [items[i] for i in idx], self._meta, deadline.left()
                    )
                    for addr, idx in by_owner.items()
                ),
                return_exceptions=True,
            )
            summary = PutSummary(0, 0)
            failed: list[int] = []
            for idx, result in zip(by_owner.values(), results, strict=True):
                if isinstance(result, KVStoreError) and result.code in _MISS_CODES:
                    failed += idx
                elif isinstance(result, BaseException):
                    raise result
                else:
                    summary = PutSummary(
                        summary.stored + result.stored,
                        summary.deduplicated + result.deduplicated,
                    )
            if not failed:
                return summary
            pending = failed  # a shard went away: place its blocks again among the living
        raise KVStoreError(
            f"{len(pending)} blocks could not be stored: their shards are unavailable",
            grpc.StatusCode.UNAVAILABLE,
        )

    async def get_into(
        self,
        hashes: Sequence[bytes],
        out: Sequence[BlockBuffer],
        timeout: float | None = None,
    ) -> int:
        """Fetches the longest available prefix of `hashes` into `out`; returns its length.

        `out[i]` receives block `hashes[i]`; buffers past the returned length may hold
        partial data and must not be used. Every block of the prefix was verified on
        receipt. A block that fails verification (checksum, fingerprint, format) is a miss
        like a block no shard holds: the prefix ends before it and the caller recomputes
        the rest. So are the blocks a shard did not deliver because it is down, too slow
        for `timeout`, or failed mid-stream. A rejected block or a failed shard is logged
        (one warning a call) and counted in `get_failures`. Bad arguments (ValueError) and
        errors the caller must fix (INVALID_ARGUMENT, UNAUTHENTICATED, ...) raise.
        """
        if len(hashes) != len(out):
            raise ValueError(f"{len(hashes)} hashes for {len(out)} output buffers")
        if not hashes:
            return 0
        nbytes = self.block_format.nbytes
        views = {h: block_view(b, nbytes, writable=True) for h, b in zip(hashes, out, strict=True)}
        if len(views) != len(hashes):
            raise ValueError("get_into got the same block hash twice")
        deadline = self._deadline(timeout)
        by_address: dict[str, list[bytes]] = defaultdict(list)
        for block_hash, address in zip(hashes, await self._locate(hashes, deadline), strict=False):
            by_address[address].append(block_hash)
        filled: set[bytes] = set()  # verified blocks, whatever failed after them
        results = await asyncio.gather(
            *(
                self._client(addr).get(wanted, views, self._verify, deadline.left(), filled)
                for addr, wanted in by_address.items()
            ),
            return_exceptions=True,
        )
        failures: list[KVStoreError] = []
        for result in results:
            if isinstance(result, KVStoreError) and result.code in _GET_MISS_CODES:
                if result.code not in _MISS_CODES:
                    failures.append(result)
            elif isinstance(result, BaseException):
                raise result
        count = 0
        while count < len(hashes) and hashes[count] in filled:
            count += 1
        if failures:
            self.get_failures.update(
                "rejected" if isinstance(f, RejectedBlockError) else f.code.name.lower()
                for f in failures
            )
            log.warning(
                "KV get: %d of %d blocks fetched, the rest are misses: %s",
                count,
                len(hashes),
                "; ".join(map(str, failures)),
            )
        return count

    async def lease(
        self, hashes: Sequence[bytes], lease: Lease, timeout: float | None = None
    ) -> list[bytes]:
        """Pins the blocks of `hashes` the store holds under `lease`; returns those, in order.
        Leasing again with the same lease adds blocks and restarts its TTL."""
        request = pb.LeaseRequest(
            lease_id=lease.lease_id, block_hashes=hashes, ttl_ms=max(1, round(lease.ttl_s * 1e3))
        )
        deadline = self._deadline(timeout)
        # a shard that does not answer pins nothing: its blocks are not in the answer
        responses, _ = await self._every_shard(
            lambda c: c.stub.Lease(request, timeout=deadline.left(), metadata=c.metadata), deadline
        )
        leased = {h for r in responses for h in r.leased}
        return [h for h in hashes if h in leased]

    async def release(self, lease_id: str, timeout: float | None = None) -> int:
        """Unpins a lease on every live shard; returns how many blocks it held (0 if it
        expired or was released already: releasing again is safe).

        Raises KVStoreError (UNAVAILABLE or DEADLINE_EXCEEDED) when a shard did not
        answer: it may still pin the lease's blocks, so the release is not done (the
        shards that answered did release theirs)."""
        request = pb.ReleaseRequest(lease_id=lease_id)
        deadline = self._deadline(timeout)
        responses, missed = await self._every_shard(
            lambda c: c.stub.Release(request, timeout=deadline.left(), metadata=c.metadata),
            deadline,
        )
        if missed:
            raise KVStoreError(
                f"lease {lease_id}: {len(missed)} of {len(missed) + len(responses)} shards did "
                f"not answer its release: {'; '.join(map(str, missed))}",
                missed[0].code,
            )
        return sum(r.released for r in responses)

    async def stats(self, timeout: float | None = None) -> dict[str, dict[str, float]]:
        """Each live shard's metric samples, keyed by shard id then `name{label="value"}`."""
        deadline = self._deadline(timeout)
        responses, _ = await self._every_shard(
            lambda c: c.stub.Stats(pb.StatsRequest(), timeout=deadline.left(), metadata=c.metadata),
            deadline,
        )
        return {r.shard_id: {_series(s): s.value for s in r.samples} for r in responses}

    def _deadline(self, timeout: float | None) -> Deadline:
        """The call's deadline: `timeout` seconds from now, or the configured default."""
        return Deadline(self.config.timeout_s if timeout is None else timeout)

    def _client(self, address: str) -> ShardClient:
        client = self._shard_clients.get(address)
        if client is None:
            client = self._shard_clients[address] = ShardClient(
                address,
                streams=self.config.streams,
                stream_min_bytes=self.config.stream_min_bytes,
                message_bytes=self.config.message_bytes,
                shared_memory=self.config.shared_memory,
                security=self.config.security,
            )
        return client

    async def _any_shard(self, call: Callable[[ShardClient], Awaitable[_T]]) -> _T:
        """The first answer to `call` from a known shard (seeds first)."""
        addresses = dict.fromkeys([*self._seeds, *(s.address for s in self._topology)])
        last: KVStoreError | None = None
        for address in addresses:
            client = self._client(address)
            try:
                with client.errors():
                    return await call(client)
            except KVStoreError as exc:
                if exc.code not in _MISS_CODES:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _every_shard(
        self, call: Callable[[ShardClient], Awaitable[_T]], deadline: Deadline
    ) -> tuple[list[_T], list[KVStoreError]]:
        """The answers of every live shard to `call`, and the errors of those that could
        not answer (unreachable, past the deadline); any other failure raises."""
        shards = await self._shards(deadline=deadline)
        results = await asyncio.gather(
            *(self._guarded(self._client(s.address), call) for s in shards),
            return_exceptions=True,
        )
        answers: list[_T] = []
        missed: list[KVStoreError] = []
        for result in results:
            if isinstance(result, KVStoreError) and result.code in _MISS_CODES:
                missed.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(result)
        return answers, missed

    @staticmethod
    async def _guarded(client: ShardClient, call: Callable[[ShardClient], Awaitable[_T]]) -> _T:
        with client.errors():
            return await call(client)

    async def _shards(self, deadline: Deadline, refresh: bool = False) -> list[ShardInfo]:
        """Live shards, asked of the index through any reachable shard when stale."""
        if refresh or time.monotonic() - self._topology_at > self.config.topology_ttl_s:
            try:
                response = await self._any_shard(
                    lambda c: c.stub.ListShards(
                        pb.ListShardsRequest(), timeout=deadline.left(), metadata=c.metadata
                    )
                )
            except KVStoreError as exc:
                if exc.code not in _MISS_CODES or not self._topology:
                    raise
                return self._topology  # the index is down: the last known shards still serve
            shards = [ShardInfo(s.shard_id, s.address) for s in response.shards]
            if not shards:
                raise KVStoreError("no live kvstore shards", grpc.StatusCode.UNAVAILABLE)
            self._topology, self._topology_at = shards, time.monotonic()
        return self._topology

    async def _locate(self, hashes: Sequence[bytes], deadline: Deadline) -> list[str]:
        """Addresses of the longest indexed prefix of `hashes`. If the index cannot answer,
        every block is looked for where rendezvous placement would have put it."""
        try:
            return [loc.shard.address for loc in await self._lookup(hashes, deadline)]
        except KVStoreError as exc:
            if exc.code not in _MISS_CODES:
                raise
        try:
            shards = await self._shards(deadline)
        except KVStoreError as exc:
            if exc.code not in _MISS_CODES:
                raise
            return []
        ids = [s.shard_id for s in shards]
        address = {s.shard_id: s.address for s in shards}
        return [address[rendezvous_owner(h, ids)] for h in hashes]

    def _meta(self, block_hash: bytes, checksum: int) -> BlockMeta:
        return BlockMeta.for_payload(block_hash, self.fingerprint, self.block_format, checksum)

    def _verify(self, header: pb.BlockHeader) -> None:
        fmt = self.block_format
        if (header.fingerprint, header.dtype, tuple(header.shape), header.size) != (
            self.fingerprint.digest,
            fmt.dtype,
            fmt.shape,
            fmt.nbytes,
        ):
            raise BlockFormatError(
                f"block {header.hash.hex()} arrived as {header.dtype} {list(header.shape)} "
                f"({header.size} bytes) under fingerprint {header.fingerprint.hex()}; this "
                f"client expects {fmt.dtype} {list(fmt.shape)} ({fmt.nbytes} bytes) under "
                f"{self.fingerprint.hex}"
            )
