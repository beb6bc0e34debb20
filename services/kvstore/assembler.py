"""BlockAssembler: rebuilds blocks from a stream of chunks and verifies their checksums.

Both ends of a bulk transfer use it: the shard on Put (payloads land in arena slots) and
the client on Get (payloads land in the caller's block buffers). Chunks arrive in order;
a block's first chunk carries its header, the rest continue its payload.
"""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.codec import Chunk
from services.kvstore.errors import ChecksumError, MalformedMessageError

BeginBlock = Callable[[pb.BlockHeader], memoryview | None]
"""Validates a header and returns where its payload goes; None verifies and drops it."""


class BlockAssembler:
    def __init__(self, begin: BeginBlock) -> None:
        self._begin = begin
        self._header: pb.BlockHeader | None = None
        self._dest: memoryview | None = None
        self._filled = 0
        self._hasher = xxhash.xxh3_64()

    @property
    def in_block(self) -> bool:
        return self._header is not None

    def feed(self, chunk: Chunk) -> pb.BlockHeader | None:
        """Takes the next chunk; returns the header of the block it completes, if any."""
        if chunk.header is not None:
            if self._header is not None:
                raise MalformedMessageError(
                    f"block {self._header.hash.hex()} ended after {self._filled} of its "
                    f"{self._header.size} bytes: the next block's header arrived first"
                )
            self._dest = self._begin(chunk.header)
            self._header, self._filled = chunk.header, 0
            self._hasher.reset()
        header = self._header
        if header is None:
            raise MalformedMessageError(
                "payload chunk outside any block: a block's first chunk must carry its header"
            )
        data = chunk.data
        end = self._filled + len(data)
        if end > header.size:
            raise MalformedMessageError(
                f"block {header.hash.hex()}: chunks carry {end} bytes, its header says "
                f"{header.size}"
            )
        if self._dest is not None:
            self._dest[self._filled : end] = data
        if end == header.size and self._filled == 0:
            checksum = xxhash.xxh3_64_intdigest(data)  # whole block in one chunk: one pass
        else:
            self._hasher.update(data)
            checksum = self._hasher.intdigest() if end == header.size else -1
        self._filled = end
        if end < header.size:
            return None
        self._header = self._dest = None
        if checksum != header.checksum:
            raise ChecksumError(
                f"block {header.hash.hex()}: payload checksum {checksum:016x} differs from "
                f"its header's {header.checksum:016x}; the block was corrupted in transit"
            )
        return header

    def finish(self) -> None:
        """Ends the stream; raises if it stopped mid-block."""
        if self._header is not None:
            raise MalformedMessageError(
                f"stream ended inside block {self._header.hash.hex()} after {self._filled} "
                f"of its {self._header.size} bytes"
            )
