import pytest

from engine.block_pool import BlockPool


def ids(blocks):
    return [b.block_id for b in blocks]


def h(i: int) -> bytes:
    return bytes([i]) * 32


def test_fresh_pool_hands_out_blocks_in_order():
    pool = BlockPool(6)
    assert list(pool.free_queue) == [0, 1, 2, 3, 4, 5]
    got = pool.allocate(3)
    assert ids(got) == [0, 1, 2]
    assert [b.ref_cnt for b in got] == [1, 1, 1]
    assert list(pool.free_queue) == [3, 4, 5]
    assert pool.allocate(4) is None
    assert list(pool.free_queue) == [3, 4, 5], "a refused allocation must change nothing"
    pool.check_invariants()


def test_freed_blocks_join_the_tail_in_given_order():
    pool = BlockPool(5)
    a = pool.allocate(3)
    pool.free(reversed(a))
    assert list(pool.free_queue) == [3, 4, 2, 1, 0]
    pool.check_invariants()


def test_cached_block_is_reused_until_evicted():
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.cache(a[0], h(1))
    pool.cache(a[1], h(2))
    pool.free(reversed(a))
    assert list(pool.free_queue) == [2, 1, 0]
    hit = pool.lookup(h(1))
    assert hit is a[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and list(pool.free_queue) == [2, 1]
    # The next allocation takes block 2 (no hash), then block 1, evicting hash 2.
    assert ids(pool.allocate(1)) == [2]
    assert pool.lookup(h(2)) is a[1]
    assert ids(pool.allocate(1)) == [1]
    assert pool.lookup(h(2)) is None
    assert pool.lookup(h(1)) is a[0]
    pool.check_invariants()


def test_touch_of_shared_block_counts_references():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache(b, h(7))
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free([b])
    assert b.ref_cnt == 1 and 0 not in pool.free_queue
    pool.free([b])
    assert list(pool.free_queue) == [1, 0]
    pool.check_invariants()


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, h(3))
    pool.cache(b, h(3))
    assert pool.lookup(h(3)) is a and b.block_hash is None
    pool.check_invariants()


def test_double_free_is_an_invariant_violation():
    pool = BlockPool(1)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([b])


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.allocate(1)
    pool.cache(b, h(1))
    assert pool.lookup(h(1)) is None and b.block_hash is None


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache(b, h(1))
    assert not pool.reset_prefix_cache()
    pool.free([b])
    assert pool.reset_prefix_cache()
    assert pool.lookup(h(1)) is None
    pool.check_invariants()


def test_invalid_size():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
