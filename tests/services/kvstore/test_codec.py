import pytest

from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.codec import (
    MAX_MESSAGE_BYTES,
    decode_get_response,
    decode_put_request,
    encode_get_response,
    encode_put_request,
    pack_pieces,
)
from services.kvstore.errors import MalformedMessageError

HEADER = pb.BlockHeader(
    hash=b"h" * 32,
    fingerprint=b"f" * 32,
    dtype="bf16",
    shape=[2, 2, 16, 2, 16],
    size=300,
    checksum=2**64 - 1,
)


def test_put_request_encoding_is_protobufs() -> None:
    start = pb.PutStart(fingerprint=pb.KVFingerprint(model_id="m", block_size=16), lease_id="l")
    data = bytes(range(256)) * 2
    pieces = [(HEADER.SerializeToString(), memoryview(data)[:300]), (None, memoryview(data)[300:])]
    reference = pb.PutRequest(
        start=start,
        chunks=[pb.BlockChunk(header=HEADER, data=data[:300]), pb.BlockChunk(data=data[300:])],
    )
    assert encode_put_request(start, pieces) == reference.SerializeToString()


def test_get_response_round_trips_through_protobuf() -> None:
    data = b"x" * 300
    raw = pb.GetResponse(chunks=[pb.BlockChunk(header=HEADER, data=data)]).SerializeToString()
    (chunk,) = decode_get_response(raw)
    assert chunk.header == HEADER and bytes(chunk.data) == data
    assert encode_get_response([(HEADER.SerializeToString(), memoryview(data))]) == raw


def test_decoder_skips_unknown_fields_like_protobuf() -> None:
    raw = pb.PutRequest(chunks=[pb.BlockChunk(data=b"abc")]).SerializeToString()
    raw = b"\x78\x05" + raw + b"\x4d\x01\x02\x03\x04"  # varint field 15, fixed32 field 9
    start, chunks = decode_put_request(raw)
    assert start is None and [bytes(c.data) for c in chunks] == [b"abc"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x12\x05ab", "claims 5 bytes, 2 remain"),
        (b"\x12", "truncated or overlong varint"),
        (b"\x13", "wire type 3 unsupported"),
        (b"\x0a\x02\x0a\xff", "malformed PutStart"),
    ],
)
def test_malformed_bytes_raise_invalid_argument(raw: bytes, error: str) -> None:
    with pytest.raises(MalformedMessageError, match=error):
        decode_put_request(raw)


def test_packing_splits_blocks_across_messages_within_budget() -> None:
    header = HEADER.SerializeToString()
    blocks = [(header, memoryview(bytes([i]) * 1000)) for i in range(5)]
    messages = list(pack_pieces(blocks, budget=2200))
    encoded = [encode_get_response(m) for m in messages]
    assert all(len(e) <= 2200 for e in encoded)
    # several blocks per message; a block that does not fit continues in the next message
    assert [[len(data) for _, data in m] for m in messages] == [
        [1000, 948],
        [52, 1000, 874],
        [126, 1000],
    ]
    joined = b"".join(bytes(c.data) for e in encoded for c in decode_get_response(e))
    assert joined == b"".join(bytes([i]) * 1000 for i in range(5))
    headers = [c.header for e in encoded for c in decode_get_response(e) if c.header]
    assert len(headers) == 5


def test_default_budget_is_four_mib() -> None:
    assert MAX_MESSAGE_BYTES == 4 * 2**20
    big = [(HEADER.SerializeToString(), memoryview(bytes(6 * 2**20)))]
    sizes = [len(encode_get_response(m)) for m in pack_pieces(big, MAX_MESSAGE_BYTES)]
    assert len(sizes) == 2 and max(sizes) <= MAX_MESSAGE_BYTES
