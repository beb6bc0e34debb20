"""The pool of paged KV blocks: reference counts, an LRU free queue and the prefix cache.

    free queue (head evicted first)                      in use
    ┌────┬────┬────┬────┐                        ┌────┐ ┌────┐
    │ b7 │ b2 │ b9 │ b4 │  <- freed blocks        │ b0 │ │ b3 │  ref_cnt >= 1
    └────┴────┴────┴────┘     join the tail       └────┘ └────┘
      ^ b2, b4 still hold a hash: a later request with the same prefix takes them
        back out of the queue (`touch`) instead of recomputing their K/V.

A block is in exactly one of two states: ref_cnt > 0 and out of the free queue, or
ref_cnt == 0 and in it. A cached block keeps its hash until it is handed out again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else "-"
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[KVBlock] | None:
        """`n` fresh blocks (ref_cnt 1) from the head of the free queue, or None if too few."""
        if n > len(self.free_queue):
            return None
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._forget_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks found by `lookup`."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero join the queue's tail in the given order.

        Callers pass a request's blocks last-first, so a prefix's tail is evicted before its
        head and shared heads stay cached longest.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block's hash. If another block already holds the hash, keep that one."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; refused (False) while any block is in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def check_invariants(self) -> None:
        """Assert the pool's structural invariants (tests call this after every step)."""
        for block in self.blocks:
            in_queue = block.block_id in self.free_queue
            assert block.ref_cnt >= 0, block
            assert in_queue == (block.ref_cnt == 0), f"{block} queue membership wrong"
        assert len(set(self.free_queue)) == len(self.free_queue)
        for h, block in self.cached.items():
            assert block.block_hash == h, f"cache entry {h.hex()[:8]} -> {block}"
        hashed = [b for b in self.blocks if b.block_hash is not None]
        assert len(hashed) == len(self.cached), "a hashed block is missing from the cache map"
