"""KVStoreServicer: the gRPC face of one shard (proto/baton/v1/kvstore.proto).

Bulk methods (Put, Get) move raw message bytes through `codec` so payloads are copied
once between socket buffers and the arena; the rest use the generated protobuf classes.
Errors a client can cause end the call with the status of its `KVStoreError`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
import xxhash
from google.protobuf.message import DecodeError, Message
from grpc import RpcMethodHandler
from grpc.aio import ServicerContext as Context

from engine.hashing import HASH_BYTES
from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.assembler import BeginBlock, BlockAssembler
from services.kvstore.block_meta import BlockMeta
from services.kvstore.codec import (
    MESSAGE_BYTES,
    decode_put_request,
    encode_get_response,
    pack_pieces,
)
from services.kvstore.errors import (
    ChecksumError,
    KVStoreError,
    MalformedMessageError,
    StreamIdleError,
)
from services.kvstore.idle_watch import IdleWatch
from services.kvstore.index import ShardInfo
from services.kvstore.index_sync import IndexSync
from services.kvstore.put_transaction import PutOutcome, PutTransaction
from services.kvstore.store import BlockStore

SERVICE_NAME = "baton.v1.KVStore"
STREAM_IDLE_S = 30.0
"""A stream whose client sends nothing (put) or reads nothing (get) this long while it
holds slots or pins is abandoned."""
_T = TypeVar("_T")
MAX_HASHES_PER_REQUEST = 65_536

Handler = Callable[..., Any]


async def _abort(context: Context, exc: KVStoreError) -> NoReturn:
    await context.abort(exc.code, str(exc))
    raise AssertionError("context.abort returned")


async def _abort_stalled(context: Context, exc: KVStoreError) -> None:
    """Ends, with `exc`'s status, a call whose last write stalled or failed. The status
    reaches the client behind the messages gRPC already holds, once it reads them; if the
    call is over already (the client cancelled, its deadline passed), this returns, and
    gRPC closes the call quietly: an error raised from the handler it logs as a fault."""
    try:
        await context.abort(exc.code, str(exc))
    except grpc.aio.InternalError:
        return  # the status could not be sent: the call has ended
    raise AssertionError("context.abort returned")


async def _parsed(message_type: type[Any], raw: bytes, context: Context) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        name = message_type.DESCRIPTOR.full_name
        await _abort(context, MalformedMessageError(f"malformed {name} message: {e}"))


def _check_hashes(hashes: Sequence[bytes], field: str = "block_hashes") -> None:
    if len(hashes) > MAX_HASHES_PER_REQUEST:
        raise MalformedMessageError(
            f"{field} has {len(hashes)} hashes; at most {MAX_HASHES_PER_REQUEST} per request"
        )
    if set(map(len, hashes)) - {HASH_BYTES}:  # C-level: lookups carry hundreds of hashes
        i, h = next((i, h) for i, h in enumerate(hashes) if len(h) != HASH_BYTES)
        raise MalformedMessageError(
            f"{field}[{i}] is {len(h)} bytes; block hashes are {HASH_BYTES} bytes"
        )


class KVStoreServicer:
    def __init__(
        self,
        store: BlockStore,
        sync: IndexSync,
        message_bytes: int = MESSAGE_BYTES,
        stream_idle_s: float = STREAM_IDLE_S,
    ) -> None:
        self._store = store
        self._sync = sync
        self._message_bytes = message_bytes
        self._stream_idle_s = stream_idle_s

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        # Requests arrive as bytes and are parsed here: gRPC's own deserializer would
        # answer a message that does not parse with UNKNOWN instead of INVALID_ARGUMENT.
        def unary(fn: Handler, request: type[Message], response: type[Message]) -> RpcMethodHandler:
            async def handle(raw: bytes, context: Context) -> Message:
                return await fn(await _parsed(request, raw, context), context)

            return grpc.unary_unary_rpc_method_handler(handle, None, response.SerializeToString)

        def bidi(fn: Handler, request: type[Message], response: type[Message]) -> RpcMethodHandler:
            async def handle(
                raws: AsyncIterator[bytes], context: Context
            ) -> AsyncIterator[Message]:
                async def parsed() -> AsyncIterator[Message]:
                    async for raw in self._until_idle(raws):
                        yield await _parsed(request, raw, context)

                async for out in fn(parsed(), context):
                    yield out

            return grpc.stream_stream_rpc_method_handler(handle, None, response.SerializeToString)

        async def put(raws: AsyncIterator[bytes], context: Context) -> pb.PutResponse:
            return await self.put(self._until_idle(raws), context)

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Lookup": unary(self.lookup, pb.LookupRequest, pb.LookupResponse),
                # raw bytes in, decoded by `codec` inside the handler
                "Put": grpc.stream_unary_rpc_method_handler(
                    put, None, pb.PutResponse.SerializeToString
                ),
                # raw bytes out, encoded by `codec`
                "Get": grpc.unary_stream_rpc_method_handler(self._get_raw),
                "Lease": unary(self.lease, pb.LeaseRequest, pb.LeaseResponse),
                "Release": unary(self.release, pb.ReleaseRequest, pb.ReleaseResponse),
                "Stats": unary(self.stats, pb.StatsRequest, pb.StatsResponse),
                "ListShards": unary(self.list_shards, pb.ListShardsRequest, pb.ListShardsResponse),
                "OpenSharedMemory": unary(
                    self.open_shared_memory, pb.OpenSharedMemoryRequest, pb.OpenSharedMemoryResponse
                ),
                "PutShared": bidi(self.put_shared, pb.PutSharedRequest, pb.PutSharedResponse),
                "GetShared": bidi(self.get_shared, pb.GetSharedRequest, pb.GetSharedResponse),
            },
        )

    async def _get_raw(self, raw: bytes, context: Context) -> AsyncIterator[bytes]:
        # An async generator only in form: gRPC and the tracing interceptor
        # (services.grpc_tracing) take Get's handler for one, but `get` writes its messages
        # itself, so nothing is yielded here.
        await self.get(await _parsed(pb.GetRequest, raw, context), context)
        return
        yield

    async def lookup(self, request: pb.LookupRequest, context: Context) -> pb.LookupResponse:
        try:
            _check_hashes(request.block_hashes)
            locations = await self._sync.index.lookup(request.block_hashes)
        except KVStoreError as exc:
            await _abort(context, exc)
        metrics = self._store.metrics
        metrics.lookup_queried_blocks += len(request.block_hashes)
        metrics.lookup_hit_blocks += len(locations)
        shards: dict[ShardInfo, int] = {}
        shard_index = [shards.setdefault(loc.shard, len(shards)) for loc in locations]
        return pb.LookupResponse(
            shards=[pb.Shard(shard_id=s.shard_id, address=s.address) for s in shards],
            shard_index=shard_index,
            sizes=[loc.size for loc in locations],
            checksums=[loc.checksum for loc in locations],
        )

    async def _until_idle(self, requests: AsyncIterator[_T]) -> AsyncIterator[_T]:
        """The client's messages; StreamIdleError once the handler has waited the idle
        limit for one (it then frees what the stream holds: reserved slots, pins)."""
        it = aiter(requests)
        with IdleWatch(self._stream_idle_s, "no message from the client") as watch:
            while True:
                try:
                    item = await watch.wait(anext(it))
                except StopAsyncIteration:
                    return
                yield item

    async def put(self, requests: AsyncIterator[bytes], context: Context) -> pb.PutResponse:
        began = time.perf_counter()
        start: pb.PutStart | None = None
        txn: PutTransaction | None = None
        outcome: PutOutcome | None = None
        nbytes = 0
        try:
            async for raw in requests:
                first, chunks = decode_put_request(raw)
                if txn is None:
                    if first is None:
                        raise MalformedMessageError("the first PutRequest must carry `start`")
                    start, txn = first, self._store.begin_put(first)
                    assembler = BlockAssembler(self._stager(txn))
                elif first is not None:
                    raise MalformedMessageError("only the first PutRequest may carry `start`")
                for chunk in chunks:
                    assembler.feed(chunk)
                    nbytes += len(chunk.data)
            if txn is None or start is None:
                return pb.PutResponse()
            assembler.finish()
            outcome = self._store.commit_put(txn, start)
        except KVStoreError as exc:
            self._abandon(txn)  # before the client hears of the failure
            await _abort(context, exc)
        finally:
            if outcome is None:
                self._abandon(txn)
        await self._sync.publish(outcome.stored, self._store.drain_evicted())
        self._store.metrics.record_transfer("put", "grpc", nbytes, time.perf_counter() - began)
        return pb.PutResponse(stored=len(outcome.stored), deduplicated=len(outcome.deduplicated))

    async def get(self, request: pb.GetRequest, context: Context) -> None:
        """Sends the requested blocks this shard holds, in request order, pinned while
        they are sent. The handler writes each message itself, so that it sees the write
        that stalls (a client that reads nothing for the idle limit is cut off) or fails
        (a client that cancelled), and unpins at once in both cases."""
        began = time.perf_counter()
        try:
            _check_hashes(request.block_hashes)
        except KVStoreError as exc:
            await _abort(context, exc)
        blocks = self._store.pin_for_read(request.block_hashes)
        arena = self._store.arena
        payloads = (
            (b.meta.to_proto().SerializeToString(), arena.view(b.offset, b.meta.size))
            for b in blocks
        )
        failure: KVStoreError | None = None
        try:
            with IdleWatch(self._stream_idle_s, "the client read nothing") as watch:
                for pieces in pack_pieces(payloads, self._message_bytes):
                    await watch.wait(context.write(encode_get_response(pieces)))
        except StreamIdleError as exc:
            failure = exc
        except grpc.aio.InternalError:  # the write failed: the client cancelled or went away
            failure = KVStoreError(
                "the call ended while blocks were sent", grpc.StatusCode.CANCELLED
            )
        finally:
            self._store.unpin(blocks)  # a message gRPC still holds is a copy
        if failure is not None:
            await _abort_stalled(context, failure)
            return
        nbytes = sum(b.meta.size for b in blocks)
        self._store.metrics.record_transfer("get", "grpc", nbytes, time.perf_counter() - began)

    async def lease(self, request: pb.LeaseRequest, context: Context) -> pb.LeaseResponse:
        try:
            _check_hashes(request.block_hashes)
            blocks = self._store.lease(request.lease_id, request.block_hashes, request.ttl_ms)
        except KVStoreError as exc:
            await _abort(context, exc)
        return pb.LeaseResponse(leased=[b.meta.hash for b in blocks])

    async def release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self._store.release(request.lease_id))

    async def stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        return pb.StatsResponse(shard_id=self._sync.shard.shard_id, samples=self._store.samples())

    async def list_shards(
        self, request: pb.ListShardsRequest, context: Context
    ) -> pb.ListShardsResponse:
        try:
            shards = await self._sync.index.live_shards()
        except KVStoreError as exc:
            await _abort(context, exc)
        return pb.ListShardsResponse(
            shards=[pb.Shard(shard_id=s.shard_id, address=s.address) for s in shards]
        )

    async def open_shared_memory(
        self, request: pb.OpenSharedMemoryRequest, context: Context
    ) -> pb.OpenSharedMemoryResponse:
        segment = self._store.arena.segment
        if segment.path is None:
            return pb.OpenSharedMemoryResponse()
        return pb.OpenSharedMemoryResponse(
            path=str(segment.path), size=segment.size, token=segment.token
        )

    async def put_shared(
        self, requests: AsyncIterator[pb.PutSharedRequest], context: Context
    ) -> AsyncIterator[pb.PutSharedResponse]:
        began = time.perf_counter()
        txn: PutTransaction | None = None
        outcome: PutOutcome | None = None
        try:
            self._require_shared_memory()
            reserve = await anext(requests, None)
            if reserve is None:
                return
            if reserve.WhichOneof("step") != "reserve":
                raise MalformedMessageError("PutShared must start with `reserve`")
            self._check_token(reserve.reserve.token)
            start = reserve.reserve.start
            txn = self._store.begin_put(start)
            slots: list[tuple[BlockMeta, int]] = []  # written in this order
            yield self._reserve_slots(txn, reserve.reserve.headers, slots)
            written = 0
            # A bad batch is reported when the client commits: one that is still writing
            # would only see its next write fail, without the reason.
            failure: KVStoreError | None = None
            async for request in requests:
                step = request.WhichOneof("step")
                if step == "commit":
                    break
                if step == "reserve":  # more blocks, while the first ones are copied
                    if request.reserve.HasField("start") or request.reserve.token:
                        raise MalformedMessageError(
                            "only the first `reserve` carries `start` and `token`"
                        )
                    yield self._reserve_slots(txn, request.reserve.headers, slots)
                    continue
                if step != "written":
                    raise MalformedMessageError(f"PutShared got `{step}` after `reserve`")
                checksums = request.written.checksums
                written += len(checksums)
                if failure is not None:
                    continue
                try:
                    # verified now, while the client copies the next batch on another core
                    self._verify_written(txn, slots[written - len(checksums) :], checksums)
                except KVStoreError as exc:
                    failure = exc
            else:
                return  # the client gave up before committing: nothing is stored
            if failure is not None:
                raise failure
            if written != len(slots):
                raise MalformedMessageError(
                    f"commit after {written} of {len(slots)} reserved slots were written"
                )
            outcome = self._store.commit_put(txn, start)
        except KVStoreError as exc:
            self._abandon(txn)  # before the client hears of the failure
            await _abort(context, exc)
        finally:
            if outcome is None:
                self._abandon(txn)
        await self._sync.publish(outcome.stored, self._store.drain_evicted())
        nbytes = sum(b.meta.size for b in outcome.stored)
        self._store.metrics.record_transfer("put", "shm", nbytes, time.perf_counter() - began)
        yield pb.PutSharedResponse(
            result=pb.PutResponse(
                stored=len(outcome.stored), deduplicated=len(outcome.deduplicated)
            )
        )

    async def get_shared(
        self, requests: AsyncIterator[pb.GetSharedRequest], context: Context
    ) -> AsyncIterator[pb.GetSharedResponse]:
        began = time.perf_counter()
        try:
            self._require_shared_memory()
            first = await anext(requests, None)
            if first is None:
                return
            if first.WhichOneof("step") != "get":
                raise MalformedMessageError("GetShared must start with `get`")
            self._check_token(first.get.token)
            _check_hashes(first.get.block_hashes)
        except KVStoreError as exc:
            await _abort(context, exc)
        blocks = self._store.pin_for_read(first.get.block_hashes)
        try:
            yield pb.GetSharedResponse(
                blocks=[pb.SharedBlock(header=b.meta.to_proto(), offset=b.offset) for b in blocks]
            )
            await anext(requests, None)  # `done`, or the end of the stream: copies are finished
        finally:
            self._store.unpin(blocks)
        nbytes = sum(b.meta.size for b in blocks)
        self._store.metrics.record_transfer("get", "shm", nbytes, time.perf_counter() - began)

    def _stager(self, txn: PutTransaction) -> BeginBlock:
        arena = self._store.arena

        def begin(header: pb.BlockHeader) -> memoryview | None:
            meta = BlockMeta.from_proto(header)
            offset = txn.stage(meta)
            return None if offset is None else arena.view(offset, meta.size)

        return begin

    @staticmethod
    def _reserve_slots(
        txn: PutTransaction,
        headers: Sequence[pb.BlockHeader],
        slots: list[tuple[BlockMeta, int]],
    ) -> pb.PutSharedResponse:
        """Stages `headers` in `txn`, appends the slots to write to `slots`, and answers
        with one offset per header (0: the shard holds that block already)."""
        metas = [BlockMeta.from_proto(h) for h in headers]
        offsets = [txn.stage(meta) for meta in metas]
        slots += [(m, o) for m, o in zip(metas, offsets, strict=True) if o is not None]
        return pb.PutSharedResponse(slots=pb.SharedSlots(offsets=[o or 0 for o in offsets]))

    def _abandon(self, txn: PutTransaction | None) -> None:
        """Frees the slots of a put that will not commit; a second call does nothing."""
        if txn is not None:
            txn.abort()
        self._sync.forget(self._store.drain_evicted())

    def _check_token(self, token: bytes) -> None:
        if token != self._store.arena.segment.token:
            raise KVStoreError(
                "shared-memory token does not match this shard's segment (the shard "
                "restarted?); call OpenSharedMemory again",
                grpc.StatusCode.FAILED_PRECONDITION,
            )

    def _verify_written(
        self, txn: PutTransaction, slots: Sequence[tuple[BlockMeta, int]], checksums: Sequence[int]
    ) -> None:
        """Checks the slots a `written` announces against their checksums, and records them."""
        if len(checksums) > len(slots):
            raise MalformedMessageError(
                f"`written` announces {len(checksums)} slots; {len(slots)} reserved slots are left"
            )
        for (meta, offset), checksum in zip(slots, checksums, strict=False):
            actual = xxhash.xxh3_64_intdigest(self._store.arena.view(offset, meta.size))
            if actual != checksum:
                raise ChecksumError(
                    f"block {meta.hash.hex()}: its slot holds checksum {actual:016x}, the "
                    f"client announced {checksum:016x}; the write was incomplete or went to "
                    "the wrong slot"
                )
            txn.set_checksum(meta.hash, checksum)

    def _require_shared_memory(self) -> None:
        if self._store.arena.segment.path is None:
            raise KVStoreError(
                "this shard runs without shared memory; use Put/Get",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
