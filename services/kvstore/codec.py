"""Zero-copy codec for the bulk KVStore messages: PutRequest and GetResponse.

The bytes are exactly protobuf's encoding of those messages (any protobuf client can
talk to a shard), but payloads are never copied through message objects: encoding joins
serialized headers with views of the payloads, decoding hands out views into the
received message. Building a 4 MiB protobuf message in Python costs far more than the
copy it wraps (bench/kv_transfer.py); the small messages go through protobuf as usual.

    PutRequest  = [1: PutStart] [2: BlockChunk]*      GetResponse = [1: BlockChunk]*
    BlockChunk  = [1: BlockHeader] [2: bytes data]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.errors import MalformedMessageError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest bulk message either side sends or accepts."""

MESSAGE_BYTES = 1024 * 1024
"""Size bulk senders pack messages to. grpcio copies each received message two to three
times in Python; at 1 MiB those copies stay in cache, at 4 MiB they go to memory
(bench/RESULTS.md)."""

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
# tag + length varint, counted at their largest so a packed message never exceeds its budget
_FIELD_OVERHEAD = 1 + _MAX_VARINT_BYTES

_M = TypeVar("_M", bound=Message)

Piece = tuple[bytes | None, memoryview]
"""One chunk to encode: a serialized BlockHeader on a block's first chunk, and payload bytes."""


@dataclass(frozen=True)
class Chunk:
    """One decoded BlockChunk; `data` is a view into the received message."""

    header: pb.BlockHeader | None
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field: int, length: int) -> bytes:
    return bytes(((field << 3) | _LEN,)) + _varint(length)


def _encode_chunks(field: int, pieces: Sequence[Piece], parts: list[bytes | memoryview]) -> None:
    for header, data in pieces:
        head = _len_field(1, len(header)) + header if header else b""
        body = _len_field(2, len(data)) if len(data) else b""
        parts.append(_len_field(field, len(head) + len(body) + len(data)))
        parts.append(head + body)
        parts.append(data)


def encode_put_request(start: pb.PutStart | None, pieces: Sequence[Piece]) -> bytes:
    parts: list[bytes | memoryview] = []
    if start is not None:
        raw = start.SerializeToString()
        parts += [_len_field(1, len(raw)), raw]
    _encode_chunks(2, pieces, parts)
    return b"".join(parts)


def encode_get_response(pieces: Sequence[Piece]) -> bytes:
    parts: list[bytes | memoryview] = []
    _encode_chunks(1, pieces, parts)
    return b"".join(parts)


def pack_pieces(
    blocks: Iterable[tuple[bytes, memoryview]], budget: int, first_reserve: int = 0
) -> Iterator[list[Piece]]:
    """Groups (serialized header, payload) pairs into messages of at most `budget` bytes.

    Several blocks share a message; a block that does not fit continues in the next one.
    The first message keeps `first_reserve` bytes free for a PutStart.
    """
    message: list[Piece] = []
    room = budget - first_reserve
    for header, payload in blocks:
        pending: bytes | None = header
        offset = 0
        while pending is not None or offset < len(payload):
            overhead = 2 * _FIELD_OVERHEAD + (_FIELD_OVERHEAD + len(pending) if pending else 0)
            take = min(len(payload) - offset, room - overhead)
            if take <= 0 and (take < 0 or offset < len(payload)):
                if not message:
                    raise ValueError(f"a message budget of {budget} bytes cannot hold a header")
                yield message
                message, room = [], budget
                continue
            message.append((pending, payload[offset : offset + take]))
            room -= overhead + take
            offset += take
            pending = None
    if message:
        yield message


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 7 * _MAX_VARINT_BYTES:
            break
    raise MalformedMessageError("malformed message: truncated or overlong varint")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, stop) of each length-delimited field; others are skipped."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise MalformedMessageError(
                    f"malformed message: field {field} claims {length} bytes, {end - pos} remain"
                )
            yield field, pos, pos + length
            pos += length
        elif wire_type == _VARINT:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise MalformedMessageError(f"malformed message: wire type {wire_type} unsupported")
    if pos != end:
        raise MalformedMessageError("malformed message: last field runs past the end")


def _parse(message_type: type[_M], raw: memoryview) -> _M:
    try:
        return message_type.FromString(raw.tobytes())
    except DecodeError as exc:
        raise MalformedMessageError(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from None


def _decode_chunk(buf: memoryview, pos: int, end: int) -> Chunk:
    header: pb.BlockHeader | None = None
    data = buf[0:0]
    for field, start, stop in _fields(buf, pos, end):
        if field == 1:
            header = _parse(pb.BlockHeader, buf[start:stop])
        elif field == 2:
            data = buf[start:stop]
    return Chunk(header, data)


def decode_put_request(raw: bytes) -> tuple[pb.PutStart | None, list[Chunk]]:
    buf = memoryview(raw)
    start: pb.PutStart | None = None
    chunks: list[Chunk] = []
    for field, begin, stop in _fields(buf, 0, len(buf)):
        if field == 1:
            start = _parse(pb.PutStart, buf[begin:stop])
        elif field == 2:
            chunks.append(_decode_chunk(buf, begin, stop))
    return start, chunks


def decode_get_response(raw: bytes) -> list[Chunk]:
    buf = memoryview(raw)
    return [
        _decode_chunk(buf, begin, stop)
        for field, begin, stop in _fields(buf, 0, len(buf))
        if field == 1
    ]
