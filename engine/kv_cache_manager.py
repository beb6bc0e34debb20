"""Which KV blocks each request holds: prefix-cache hits, growth, and release.

The scheduler talks to this class only; it hands out block ids for block tables and
never exposes the pool's queue or cache map.
"""

from __future__ import annotations

from engine.block_pool import BlockPool, KVBlock
from engine.sequence import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_published: dict[str, int] = {}

    def computed_prefix(self, request: Request) -> list[KVBlock]:
        """Cached blocks holding the longest prefix of the request's full blocks.

        At least one token is always left to compute, since the next token's logits come
        from the last position: a fully cached prompt recomputes its last block.
        """
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= request.num_tokens:
            hits.pop()
        return hits

    def allocate(
        self, request: Request, num_new_tokens: int, prefix: list[KVBlock] | None = None
    ) -> bool:
        """Hold blocks for `num_new_tokens` more tokens (after `prefix`, if given).

        Returns False, changing nothing, when the pool is short.
        """
        held = self._blocks.get(request.request_id, [])
        prefix = prefix or []
        num_computed = request.num_computed_tokens + len(prefix) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(held) - len(prefix)
        # Prefix blocks sitting in the free queue stop being free once touched.
        reclaimed = sum(1 for b in prefix if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - reclaimed:
            return False
        self.pool.touch(prefix)
        fresh = self.pool.allocate(max(need, 0)) or []
        blocks = self._blocks.setdefault(request.request_id, held)
        blocks.extend(prefix)
        blocks.extend(fresh)
        self._publish_full_blocks(request, blocks, total)
        return True

    def _publish_full_blocks(self, request: Request, blocks: list[KVBlock], total: int) -> None:
        # Safe to publish before the forward pass: no other request can read them until the
        # next step, by which time this step has written their K/V.
        start = self._num_published.get(request.request_id, 0)
        end = min(total // self.block_size, len(request.block_hashes))
        if request.publish_limit is not None:
            end = min(end, request.publish_limit)
        for i in range(start, end):
            self.pool.cache(blocks[i], request.block_hashes[i])
        self._num_published[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        blocks = self._blocks.pop(request.request_id, [])
        self._num_published.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def hold_prefix(self, request: Request, num_blocks: int) -> list[KVBlock]:
        """An extra reference on the request's first blocks, which outlives the request."""
        blocks = self._blocks.get(request.request_id, [])[:num_blocks]
        self.pool.touch(blocks)
        return blocks

    def unpin(self, request: Request) -> None:
        """Drop the references that kept imported prefix blocks alive until admission; the
        tail joins the free queue first, so it is evicted before the head."""
        self.pool.free(reversed(request.pinned))
        request.pinned = []

    def block_ids(self, request: Request) -> list[int]:
        return [b.block_id for b in self._blocks.get(request.request_id, ())]

    def num_held(self, request: Request) -> int:
        return len(self._blocks.get(request.request_id, ()))

    @property
    def usage(self) -> float:
        return self.pool.usage
