"""SharedSegment copies and the process tuning bulk transfers rely on."""

import os

import pytest
import xxhash

from services.kvstore.malloc_tuning import tune_malloc
from services.kvstore.segment import COPY_PIECE_BYTES, SharedSegment, copy_hashed


@pytest.mark.parametrize(
    "nbytes",
    [1, COPY_PIECE_BYTES - 1, COPY_PIECE_BYTES, COPY_PIECE_BYTES + 1, 3 * COPY_PIECE_BYTES + 5],
)
@pytest.mark.parametrize("offset", [64, 65], ids=["aligned", "unaligned"])
def test_copy_hashed_copies_exactly_and_returns_the_payload_checksum(
    nbytes: int, offset: int
) -> None:
    source = os.urandom(nbytes)
    segment = SharedSegment.create(nbytes + 128, directory=None)
    slot = segment.view[offset : offset + nbytes]
    checksum = copy_hashed(slot, memoryview(source))
    assert checksum == xxhash.xxh3_64_intdigest(source)
    assert bytes(slot) == source
    assert bytes(segment.view[offset - 1 : offset]) == b"\0"  # nothing written outside
    assert bytes(segment.view[offset + nbytes : offset + nbytes + 1]) == b"\0"
    slot.release()
    segment.close()


def test_copy_hashed_refuses_mismatched_lengths() -> None:
    with pytest.raises(AssertionError, match="copy of 3 bytes into 2"):
        copy_hashed(memoryview(bytearray(2)), memoryview(b"abc"))


def test_tune_malloc_applies_on_glibc_once() -> None:
    assert tune_malloc() is True  # the CI image is glibc: mallopt accepted both settings
    assert tune_malloc.cache_info().currsize == 1
