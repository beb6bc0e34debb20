import pytest

from services.kvstore.allocator import ALIGNMENT, ArenaAllocator


def test_allocations_are_first_fit_and_aligned() -> None:
    arena = ArenaAllocator(base=4096, size=1024)
    assert [arena.allocate(100), arena.allocate(64), arena.allocate(1)] == [4096, 4224, 4288]
    assert arena.used_bytes == 128 + 64 + ALIGNMENT
    assert arena.free_ranges() == [(4352, 768)]


def test_free_coalesces_with_both_neighbours() -> None:
    arena = ArenaAllocator(base=0, size=640)
    a, b, c = (arena.allocate(128) for _ in range(3))
    assert (a, b, c) == (0, 128, 256)
    arena.free(a, 128)
    arena.free(c, 128)
    assert arena.free_ranges() == [(0, 128), (256, 384)]
    arena.free(b, 128)
    assert arena.free_ranges() == [(0, 640)] and arena.used_bytes == 0


def test_no_room_is_none_and_a_hole_is_reused() -> None:
    arena = ArenaAllocator(base=0, size=256)
    first, second = arena.allocate(128), arena.allocate(128)
    assert arena.allocate(1) is None
    arena.free(first, 128)
    assert arena.allocate(100) == 0 and second == 128


def test_double_free_is_an_invariant_violation() -> None:
    arena = ArenaAllocator(base=0, size=256)
    offset = arena.allocate(64)
    assert offset is not None
    arena.free(offset, 64)
    with pytest.raises(AssertionError):
        arena.free(offset, 64)
