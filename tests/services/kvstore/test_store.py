"""BlockStore without gRPC: exact LRU order, pins, leases and all-or-nothing puts."""

import time

import pytest

from engine.hashing import KVFingerprint
from proto.baton.v1 import kvstore_pb2 as pb
from services.kvstore.block_meta import BlockMeta, fingerprint_to_proto
from services.kvstore.errors import BlockFormatError, CapacityError
from services.kvstore.segment import SharedSegment
from services.kvstore.store import BlockStore

from .conftest import BLOCK, FINGERPRINT, FORMAT, make_hashes

START = pb.PutStart(fingerprint=fingerprint_to_proto(FINGERPRINT))


def store_of(blocks: int) -> BlockStore:
    return BlockStore(SharedSegment.create(blocks * BLOCK, directory=None))


def put(store: BlockStore, hashes: list[bytes], start: pb.PutStart = START) -> None:
    txn = store.begin_put(start)
    for h in hashes:
        txn.stage(BlockMeta.for_payload(h, FINGERPRINT, FORMAT, checksum=0))
    store.commit_put(txn, start)


def held(store: BlockStore) -> list[bytes]:
    return [b.meta.hash for b in store.arena]


def test_eviction_is_lru_over_unpinned_blocks() -> None:
    store = store_of(4)
    a, b, c, d, e, f = make_hashes(6)
    put(store, [a, b, c, d])
    store.pin_for_read([a])  # read: a becomes most recently used, and pinned
    store.lease("L", [b], ttl_ms=60_000)
    assert held(store) == [b, c, d, a]
    put(store, [e, f])
    assert held(store) == [b, a, e, f]  # c and d went, least recently used first
    assert store.drain_evicted() == [c, d] and store.metrics.evictions == 2


def test_full_of_pinned_blocks_refuses_and_keeps_nothing() -> None:
    store = store_of(2)
    a, b, c = make_hashes(3)
    put(store, [a, b])
    store.lease("L", [a, b], ttl_ms=60_000)
    txn = store.begin_put(START)
    with pytest.raises(CapacityError, match="every remaining block is leased"):
        txn.stage(BlockMeta.for_payload(c, FINGERPRINT, FORMAT, checksum=0))
    txn.abort()
    assert held(store) == [a, b] and store.arena.used_bytes == 2 * BLOCK


def test_aborted_put_frees_its_slots_and_stores_nothing() -> None:
    store = store_of(4)
    txn = store.begin_put(START)
    for h in make_hashes(3):
        txn.stage(BlockMeta.for_payload(h, FINGERPRINT, FORMAT, checksum=0))
    assert store.arena.used_bytes == 3 * BLOCK and len(store.arena) == 0
    txn.abort()
    assert store.arena.used_bytes == 0 and held(store) == []
    assert store.arena._allocator.free_ranges() == [(4096, 4 * BLOCK)]


def test_leases_expire_on_time_and_unpin() -> None:
    store = store_of(2)
    a, b, c = make_hashes(3)
    put(store, [a, b])
    assert [x.meta.hash for x in store.lease("L", [a, b, c], ttl_ms=50)] == [a, b]
    assert store.leases.leased_blocks == 2
    store.expire_leases()
    assert len(store.leases) == 1
    time.sleep(0.06)
    assert store.expire_leases() == 1
    assert len(store.leases) == 0 and store.metrics.lease_expiries == 1
    assert [x.pins for x in store.arena] == [0, 0]
    assert store.release("L") == 0  # expired: releasing is not an error


def test_regranting_a_lease_restarts_its_ttl() -> None:
    store = store_of(2)
    a, b = make_hashes(2)
    put(store, [a, b])
    store.lease("L", [a], ttl_ms=60)
    time.sleep(0.04)
    store.lease("L", [b], ttl_ms=60)
    time.sleep(0.04)
    assert store.expire_leases() == 0
    assert store.release("L") == 2


def test_put_lease_pins_stored_and_deduplicated_blocks() -> None:
    store = store_of(4)
    a, b = make_hashes(2)
    put(store, [a])
    start = pb.PutStart(
        fingerprint=fingerprint_to_proto(FINGERPRINT), lease_id="H", lease_ttl_ms=60_000
    )
    put(store, [a, b], start)
    assert [x.pins for x in store.arena] == [1, 1]
    assert store.release("H") == 2


def test_blocks_must_match_the_put_fingerprint_and_its_format() -> None:
    store = store_of(4)
    (a,) = make_hashes(1)
    txn = store.begin_put(START)
    other = KVFingerprint("other", "digest", "bf16", 1, "fp8", 16)
    with pytest.raises(BlockFormatError, match="differs from the put's fingerprint"):
        txn.stage(BlockMeta.for_payload(a, other, FORMAT, checksum=0))
    txn.abort()
    put(store, [a])
    wider = BlockMeta(b"z" * 32, FINGERPRINT.digest, "bf16", (3, 2, 16, 2, 16), BLOCK * 3 // 2, 0)
    txn = store.begin_put(START)
    with pytest.raises(BlockFormatError, match=r"differs from the bf16 \[2, 2, 16, 2, 16\]"):
        txn.stage(wider)
    txn.abort()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lease_id", "x" * 129, "lease_id must be 1 to 128 characters"),
        ("lease_ttl_ms", 0, r"lease ttl_ms must be in \(0, 3600000\]"),
    ],
)
def test_bad_lease_parameters_are_rejected(field: str, value: object, message: str) -> None:
    start = pb.PutStart(fingerprint=fingerprint_to_proto(FINGERPRINT), lease_id="L", lease_ttl_ms=1)
    setattr(start, field, value)
    with pytest.raises(BlockFormatError, match=message):
        store_of(1).begin_put(start)


def test_a_failed_put_records_no_block_format() -> None:
    """A put refused mid-way (its blocks never stored) must not fix its fingerprint's
    format: the next, correct put under that fingerprint was refused as "differs"."""
    store = store_of(4)
    a, b = make_hashes(2)
    odd = BlockMeta(a, FINGERPRINT.digest, FORMAT.dtype, (1, 2, 16, 1, 8), 512, 0)
    txn = store.begin_put(START)
    txn.stage(odd)
    txn.abort()
    put(store, [b])  # the model's real format
    assert held(store) == [b]
    txn = store.begin_put(START)
    with pytest.raises(BlockFormatError, match="differs from the"):
        txn.stage(odd)  # now the format exists, and this block differs from it
    txn.abort()


def test_a_slot_no_eviction_could_make_evicts_nothing() -> None:
    """Pinned blocks split the arena: a slot larger than every unpinned run used to evict
    block after block and then fail anyway, losing them all."""
    store = store_of(4)
    a, b, c, d, e = make_hashes(5)
    put(store, [a, b, c, d])
    store.lease("L", [b], ttl_ms=60_000)  # the runs eviction could free: [a] and [c, d]
    other = KVFingerprint("test/other", "digest-2", "bf16", 1, "fp8", 16)
    big = BlockMeta(e, other.digest, FORMAT.dtype, (3, *FORMAT.shape[1:]), 3 * BLOCK, 0)
    txn = store.begin_put(pb.PutStart(fingerprint=fingerprint_to_proto(other)))
    with pytest.raises(CapacityError):
        txn.stage(big)
    txn.abort()
    assert held(store) == [a, b, c, d] and store.metrics.evictions == 0
    store.release("L")  # one run of four slots now: the big block fits, evicting three
    start = pb.PutStart(fingerprint=fingerprint_to_proto(other))
    txn = store.begin_put(start)
    txn.stage(big)
    store.commit_put(txn, start)
    assert e in held(store)


def test_a_lease_that_pins_nothing_is_no_lease() -> None:
    """A Lease call goes to every shard; one that pinned nothing on this shard was counted
    as a live lease there, and as an expiry when its TTL ran out."""
    store = store_of(2)
    a, b = make_hashes(2)
    put(store, [a])
    assert store.lease("L", [b], ttl_ms=50) == []
    assert len(store.leases) == 0
    assert {s.name: s.value for s in store.samples()}["baton_kv_store_leases"] == 0
    time.sleep(0.06)
    assert store.expire_leases() == 0 and store.metrics.lease_expiries == 0
    assert store.release("L") == 0
    store.lease("L", [a], ttl_ms=60_000)  # the same id, once it pins a block, is a lease
    assert len(store.leases) == 1 and store.leases.leased_blocks == 1


def test_regranting_a_lease_keeps_the_deadline_heap_bounded() -> None:
    """Every grant pushed a deadline and only expiry popped them: a lease re-granted for as
    long as its handoff lived grew the heap by one entry each time, without bound."""
    store = store_of(2)
    a, b = make_hashes(2)
    put(store, [a, b])
    store.lease("other", [b], ttl_ms=60_000)
    for _ in range(10_000):
        store.lease("L", [a], ttl_ms=60_000)
    for i in range(1_000):  # released leases leave entries behind too
        store.lease(f"short-{i}", [a], ttl_ms=60_000)
        store.release(f"short-{i}")
    assert len(store.leases) == 2
    assert len(store.leases._deadlines) <= 2 * 2 + 1
    store.lease("L", [a], ttl_ms=20)  # the latest grant's deadline is the one that counts
    time.sleep(0.03)
    assert store.expire_leases() == 1
    assert [x.pins for x in store.arena] == [0, 1]  # "other" still pins b
