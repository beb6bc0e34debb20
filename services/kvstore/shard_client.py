"""ShardClient: one shard's channel, and the bulk transfers to and from it.

Puts and gets take the shared-memory path when the shard's segment can be mapped from
this host (negotiated once per shard, see segment.py), and gRPC bytes otherwise. Large
transfers over gRPC are split over several parallel streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager

import grpc
import xxhash

from proto.baton.v1 import kvstore_pb2 as pb
from proto.baton.v1 import kvstore_pb2_grpc as pb_grpc
from services.grpc_tracing import client_interceptors
from services.kvstore.assembler import BlockAssembler
from services.kvstore.block_meta import BlockMeta
from services.kvstore.codec import (
    MAX_MESSAGE_BYTES,
    decode_get_response,
    encode_put_request,
    pack_pieces,
)
from services.kvstore.errors import (
    BlockFormatError,
    ChecksumError,
    KVStoreError,
    MalformedMessageError,
    RejectedBlockError,
)
from services.kvstore.gather import gather_or_cancel
from services.kvstore.security import ClientSecurity
from services.kvstore.segment import SharedSegment, copy_hashed

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

Verify = Callable[[pb.BlockHeader], None]
"""Raises unless a received header is in the format the caller expects."""

NewMeta = Callable[[bytes, int], BlockMeta]
"""The header of the caller's block with this hash and checksum."""

PutItem = tuple[bytes, memoryview]
"""A block to put: its hash and payload."""

WRITTEN_BATCH_BYTES = 8 * 2**20
"""A shared-memory put announces its written slots in batches this large, so the shard
verifies one batch on its own core while this client copies the next."""

_NOT_NEGOTIATED = object()


def _split(items: Sequence[PutItem], parts: int) -> list[list[int]]:
    """Indices of `items` in `parts` contiguous groups of about equal bytes."""
    total = sum(len(view) for _, view in items)
    groups: list[list[int]] = [[] for _ in range(parts)]
    running = 0
    for i, (_, view) in enumerate(items):
        groups[min(parts - 1, running * parts // max(total, 1))].append(i)
        running += len(view)
    return [g for g in groups if g]


def _first_batch(blocks: Sequence[PutItem]) -> int:
    """How many of `blocks` make the first announced batch."""
    total = 0
    for i, (_, view) in enumerate(blocks):
        total += len(view)
        if total >= WRITTEN_BATCH_BYTES:
            return i + 1
    return len(blocks)


def _headers(blocks: Sequence[PutItem], new_meta: NewMeta) -> list[pb.BlockHeader]:
    # checksum 0: the shard takes each from `written`, once it has verified the slot
    return [new_meta(block_hash, 0).to_proto() for block_hash, _ in blocks]


async def _slots(call: grpc.aio.StreamStreamCall) -> list[int]:
    """The offsets answering the next `reserve` of a shared-memory put."""
    answer = await call.read()
    if answer is grpc.aio.EOF or answer.WhichOneof("step") != "slots":
        raise MalformedMessageError("PutShared did not answer a `reserve` with slots")
    return list(answer.slots.offsets)


class _Announcer:
    """Tells the shard which slots of a shared-memory put are written, so it verifies them
    while the next batch is copied, without making the copy wait for gRPC: checksums queue
    here and each write carries all that queued behind the one before it. Awaiting each
    write before copying on stalled the copy ~0.4 ms a batch (a sixth of a put), more when
    the cores are busy."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self._queued: list[int] = []
        self._sending: asyncio.Task[None] | None = None

    def add(self, checksums: list[int]) -> None:
        """Queues checksums of written slots, in slot order; raises a failed write's error."""
        self._queued += checksums
        if self._sending is not None and self._sending.done():
            self._sending.result()
            self._sending = None
        if self._sending is None and self._queued:
            self._sending = asyncio.ensure_future(self._drain())

    async def flush(self) -> None:
        """Returns once every queued checksum is sent."""
        if self._sending is not None:
            await self._sending
        await self._drain()

    def cancel(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            # its failure, if any, is the caller's consequence: retrieved, not raised
            self._sending.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _drain(self) -> None:
        while self._queued:
            checksums, self._queued = self._queued, []
            written = pb.PutSharedWritten(checksums=checksums)
            await self._call.write(pb.PutSharedRequest(written=written))


class ShardClient:
    def __init__(
        self,
        address: str,
        *,
        streams: int,
        stream_min_bytes: int,
        message_bytes: int,
        shared_memory: bool,
        security: ClientSecurity,
    ) -> None:
        self.address = address
        self.metadata = security.metadata
        """Every call's metadata (the token): pass it as `metadata=` to each stub call."""
        self._streams = streams
        self._stream_min_bytes = stream_min_bytes
        self._message_bytes = message_bytes
        self._want_shared_memory = shared_memory
        self._segment: SharedSegment | object | None = _NOT_NEGOTIATED
        self._negotiation = asyncio.Lock()
        self.channel = security.channel(address, CHANNEL_OPTIONS, client_interceptors())
        self.stub = pb_grpc.KVStoreStub(self.channel)
        # Put and Get skip protobuf objects for payloads: raw bytes through `codec`
        self._put = self.channel.stream_unary(
            "/baton.v1.KVStore/Put", response_deserializer=pb.PutResponse.FromString
        )
        self._get = self.channel.unary_stream(
            "/baton.v1.KVStore/Get", request_serializer=pb.GetRequest.SerializeToString
        )

    async def close(self) -> None:
        await self.channel.close()
        if isinstance(self._segment, SharedSegment):
            self._segment.close()
        self._segment = _NOT_NEGOTIATED

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turns gRPC failures into KVStoreError naming this shard."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise KVStoreError(
                f"kvstore shard at {self.address}: {exc.details()}", exc.code()
            ) from None

    async def shared_segment(self) -> SharedSegment | None:
        """The shard's arena mapped here, or None when it is not reachable as shared memory."""
        async with self._negotiation:
            if self._segment is _NOT_NEGOTIATED:
                self._segment = None
                if self._want_shared_memory:
                    with self.errors():
                        offer = await self.stub.OpenSharedMemory(
                            pb.OpenSharedMemoryRequest(), metadata=self.metadata
                        )
                    if offer.path:
                        self._segment = SharedSegment.attach(offer.path, offer.size, offer.token)
            assert self._segment is None or isinstance(self._segment, SharedSegment)
            return self._segment

    async def put(
        self,
        start: pb.PutStart,
        blocks: Sequence[PutItem],
        new_meta: NewMeta,
        timeout: float,
    ) -> pb.PutResponse:
        segment = await self.shared_segment()
        if segment is not None:
            try:
                return await self._put_shared(segment, start, blocks, new_meta, timeout)
            except KVStoreError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                await self._forget_segment()
        total = sum(len(view) for _, view in blocks)
        parts = max(1, min(self._streams, total // self._stream_min_bytes, len(blocks)))
        groups = _split(blocks, parts)
        results = await gather_or_cancel(
            *(self._put_bytes(start, [blocks[i] for i in g], new_meta, timeout) for g in groups)
        )
        return pb.PutResponse(
            stored=sum(r.stored for r in results),
            deduplicated=sum(r.deduplicated for r in results),
        )

    async def get(
        self,
        hashes: Sequence[bytes],
        out: dict[bytes, memoryview],
        verify: Verify,
        timeout: float,
        filled: set[bytes],
    ) -> None:
        """Copies the blocks this shard holds into `out`, adding each hash to `filled` once
        its block is verified. A block that fails verification is not added, and raises
        RejectedBlockError; a failed call raises KVStoreError with the shard's status.
        Either way `filled` keeps the blocks verified before the failure."""
        try:
            segment = await self.shared_segment()
            if segment is not None:
                try:
                    await self._get_shared(segment, hashes, out, verify, timeout, filled)
                    return
                except KVStoreError as exc:
                    if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    await self._forget_segment()
            total = sum(len(out[h]) for h in hashes)
            parts = max(1, min(self._streams, total // self._stream_min_bytes, len(hashes)))
            size = -(-len(hashes) // parts)
            await gather_or_cancel(
                *(
                    self._get_bytes(hashes[i : i + size], out, verify, timeout, filled)
                    for i in range(0, len(hashes), size)
                )
            )
        except (ChecksumError, BlockFormatError, MalformedMessageError) as exc:
            # raised here, on receipt: shard statuses arrive as plain KVStoreError
            raise RejectedBlockError(f"shard at {self.address}: {exc}") from exc

    def _receipt(self, asked: Sequence[bytes], verify: Verify, filled: set[bytes]) -> Verify:
        """Checks a header received on a stream that asked for `asked`, before any of its
        bytes are written: a verified block is never written again."""
        wanted = set(asked)

        def check(header: pb.BlockHeader) -> None:
            if header.hash not in wanted:
                raise BlockFormatError(f"block {header.hash.hex()} was not asked of this shard")
            if header.hash in filled:
                raise BlockFormatError(f"block {header.hash.hex()} arrived twice")
            verify(header)

        return check

    async def _put_bytes(
        self,
        start: pb.PutStart,
        blocks: Sequence[PutItem],
        new_meta: NewMeta,
        timeout: float,
    ) -> pb.PutResponse:
        start_bytes = len(start.SerializeToString()) + 16

        def payloads() -> Iterator[tuple[bytes, memoryview]]:
            for block_hash, view in blocks:
                # hashed right before it is packed: the copy into the message reads it
                # from cache instead of from memory a second time
                meta = new_meta(block_hash, xxhash.xxh3_64_intdigest(view))
                yield meta.to_proto().SerializeToString(), view

        async def messages() -> AsyncIterator[bytes]:
            first: pb.PutStart | None = start
            for pieces in pack_pieces(payloads(), self._message_bytes, start_bytes):
                yield encode_put_request(first, pieces)
                first = None

        with self.errors():
            response: pb.PutResponse = await self._put(
                messages(), timeout=timeout, metadata=self.metadata
            )
        return response

    async def _get_bytes(
        self,
        hashes: Sequence[bytes],
        out: dict[bytes, memoryview],
        verify: Verify,
        timeout: float,
        filled: set[bytes],
    ) -> None:
        check = self._receipt(hashes, verify, filled)

        def begin(header: pb.BlockHeader) -> memoryview:
            check(header)
            return out[header.hash]

        assembler = BlockAssembler(begin)
        with self.errors():
            call = self._get(
                pb.GetRequest(block_hashes=hashes), timeout=timeout, metadata=self.metadata
            )
            try:
                async for raw in call:
                    for chunk in decode_get_response(raw):
                        done = assembler.feed(chunk)
                        if done is not None:
                            filled.add(done.hash)
            except BaseException:
                # gRPC leaves the call running if this reader is cancelled between its
                # request going out and its first read: the shard would stream on
                call.cancel()
                raise
        assembler.finish()

    async def _put_shared(
        self,
        segment: SharedSegment,
        start: pb.PutStart,
        blocks: Sequence[PutItem],
        new_meta: NewMeta,
        timeout: float,
    ) -> pb.PutResponse:
        with self.errors():
            call = self.stub.PutShared(timeout=timeout, metadata=self.metadata)
            # The first batch is reserved alone, so its copy starts while the shard
            # stages the rest (a 256 MiB put waited ~3 ms for 128 slots at once).
            first = _first_batch(blocks)
            await call.write(
                pb.PutSharedRequest(
                    reserve=pb.PutSharedReserve(
                        start=start, headers=_headers(blocks[:first], new_meta), token=segment.token
                    )
                )
            )
            if first < len(blocks):
                rest = _headers(blocks[first:], new_meta)
                await call.write(pb.PutSharedRequest(reserve=pb.PutSharedReserve(headers=rest)))
            offsets = await _slots(call)
            announcer = _Announcer(call)
            checksums: list[int] = []
            batch_bytes = 0
            try:
                for i, (_, view) in enumerate(blocks):
                    if i == len(offsets):
                        offsets += await _slots(call)
                    offset = offsets[i]
                    if not offset:  # 0: the shard already holds this block
                        continue
                    slot = segment.view[offset : offset + len(view)]
                    checksums.append(copy_hashed(slot, view))
                    batch_bytes += len(view)
                    if batch_bytes >= WRITTEN_BATCH_BYTES:
                        announcer.add(checksums)
                        await asyncio.sleep(0)  # the write is handed to gRPC before copying on
                        checksums, batch_bytes = [], 0
                announcer.add(checksums)
                await announcer.flush()
            except BaseException:
                call.cancel()  # the shard frees the reserved slots at once
                announcer.cancel()
                raise
            await call.write(pb.PutSharedRequest(commit=pb.PutSharedCommit()))
            await call.done_writing()
            result = await call.read()
            if result is grpc.aio.EOF:
                raise _ended_silently("PutShared")
        return result.result

    async def _get_shared(
        self,
        segment: SharedSegment,
        hashes: Sequence[bytes],
        out: dict[bytes, memoryview],
        verify: Verify,
        timeout: float,
        filled: set[bytes],
    ) -> None:
        check = self._receipt(hashes, verify, filled)
        with self.errors():
            call = self.stub.GetShared(timeout=timeout, metadata=self.metadata)
            start = pb.GetSharedStart(block_hashes=hashes, token=segment.token)
            await call.write(pb.GetSharedRequest(get=start))
            response = await call.read()
            if response is grpc.aio.EOF:
                raise _ended_silently("GetShared")
            try:
                for block in response.blocks:
                    header = block.header
                    check(header)
                    source = segment.view[block.offset : block.offset + header.size]
                    checksum = copy_hashed(out[header.hash], source)
                    if checksum != header.checksum:
                        raise ChecksumError(
                            f"block {header.hash.hex()}: checksum {checksum:016x} of the "
                            f"shared-memory copy differs from its header's {header.checksum:016x}"
                        )
                    filled.add(header.hash)
            finally:
                await call.write(pb.GetSharedRequest(done=pb.GetSharedDone()))
                await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise MalformedMessageError("GetShared answered more than once")

    async def _forget_segment(self) -> None:
        # not closed here: a concurrent transfer may still hold views; the mapping goes
        # with the last of them
        async with self._negotiation:
            self._segment = _NOT_NEGOTIATED


def _ended_silently(rpc: str) -> KVStoreError:
    """A shard ended `rpc` with OK but without the answer the protocol owes: its fault."""
    return KVStoreError(f"the shard ended {rpc} without an answer", grpc.StatusCode.INTERNAL)
