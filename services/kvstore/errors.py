"""What can go wrong with a KV block transfer, and which gRPC status says so."""

from __future__ import annotations

import grpc


class KVStoreError(Exception):
    """A KV store call failed; `code` is the gRPC status the shard answered (or would)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MalformedMessageError(KVStoreError):
    """Bytes that do not form a valid message, or messages in an order the protocol forbids."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BlockFormatError(KVStoreError):
    """A block whose fingerprint, dtype, shape or size disagrees with its KV block format."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ChecksumError(KVStoreError):
    """A payload whose xxh3-64 differs from the checksum in its header: corrupted in flight."""

    code = grpc.StatusCode.DATA_LOSS


class RejectedBlockError(KVStoreError):
    """A block a get received that failed the receiver's checks (checksum, fingerprint,
    format, or a stream that breaks the protocol): it is never used. The blocks verified
    before it still are."""

    code = grpc.StatusCode.DATA_LOSS


class StreamIdleError(KVStoreError):
    """A client stream that sent (or, on a get, read) nothing for the shard's idle limit
    while holding slots or pins: abandoned, so that a live but stalled client cannot hold
    the arena."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CapacityError(KVStoreError):
    """The arena cannot hold the blocks even after evicting every unleased block."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
