"""ArenaAllocator: first-fit byte ranges inside one arena, with coalescing of free ranges.

Blocks of one model all have the same size, so a freed slot is usually reused as is;
mixed sizes (several models on one shard) are served first-fit from coalesced holes.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 64
"""Slot alignment: a cache line, and every KV dtype's element size divides it."""


def aligned(nbytes: int) -> int:
    """The bytes a slot of `nbytes` occupies."""
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class ArenaAllocator:
    """Hands out aligned ranges of [base, base + size)."""

    def __init__(self, base: int, size: int) -> None:
        if base % ALIGNMENT or size <= 0:
            raise ValueError(f"arena must start {ALIGNMENT}-aligned and be non-empty")
        self.base = base
        self.size = size - size % ALIGNMENT
        self._starts = [base]  # free ranges, sorted by start; never adjacent (coalesced)
        self._lengths = {base: self.size}
        self.used_bytes = 0

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh range of `nbytes`, or None if no free range is large enough."""
        need = aligned(nbytes)
        for i, start in enumerate(self._starts):
            length = self._lengths[start]
            if length >= need:
                del self._lengths[start]
                if length == need:
                    del self._starts[i]
                else:
                    self._starts[i] = start + need
                    self._lengths[start + need] = length - need
                self.used_bytes += need
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        length = aligned(nbytes)
        i = bisect.bisect_left(self._starts, offset)
        assert i == len(self._starts) or self._starts[i] >= offset + length, "double free"
        assert i == 0 or self._starts[i - 1] + self._lengths[self._starts[i - 1]] <= offset
        self.used_bytes -= length
        if i < len(self._starts) and self._starts[i] == offset + length:
            length += self._lengths.pop(self._starts.pop(i))
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] == offset:
            self._lengths[self._starts[i - 1]] += length
            return
        self._starts.insert(i, offset)
        self._lengths[offset] = length

    def free_ranges(self) -> list[tuple[int, int]]:
        """(start, length) of every free range, in address order."""
        return [(s, self._lengths[s]) for s in self._starts]
