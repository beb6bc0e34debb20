"""Where KV blocks enter and leave an engine: the handoff between prefill and decode.

    prefill engine                                   decode engine
    add_request(hold_prompt_blocks=True)             reserve(n) -> block ids
    ... request finishes ...                         fill block(i) views (kvstore / copy)
    held(rid) -> [(hash, block id)] ── transfer ──>  publish(ids, hashes)
    block(id) views, then release_held(rid)          add_request(pinned_blocks=ids, ...)

Every method runs between engine steps (`AsyncEngine.call`), except reading or writing a
`block(id)` view, which is safe from any thread while the block is pinned: the engine never
writes a pinned block, and a reserved block is invisible to every request.
"""

from __future__ import annotations

import torch

from engine.block_pool import BlockPool, KVBlock


def copy_blocks(
    src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]
) -> None:
    """Copy whole blocks (every layer) between two block-major caches in one gather and one
    scatter, device to device where both live on one GPU (no host round trip, two launches
    however many blocks)."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destinations")
    if not src_ids:
        return
    gather = torch.tensor(src_ids, dtype=torch.int64).to(src.device, non_blocking=True)
    scatter = torch.tensor(dst_ids, dtype=torch.int64).to(dst.device, non_blocking=True)
    dst.index_copy_(0, scatter, src.index_select(0, gather).to(dst.device))


class KVPort:
    def __init__(self, pool: BlockPool, kv_cache: torch.Tensor) -> None:
        self.pool = pool
        self.kv_cache = kv_cache
        self._held: dict[str, list[KVBlock]] = {}

    def block(self, block_id: int) -> torch.Tensor:
        """One block of every layer, [num_layers, 2, block_size, kv_heads, head_dim], contiguous."""
        return self.kv_cache[block_id]

    # -- staging (a cache in device memory, a transport in host memory) ---------------

    def read_blocks(self, block_ids: list[int], out: torch.Tensor) -> None:
        """Copy whole blocks into `out` [n, *block shape]: for a GPU cache, pinned host
        memory the KV store's client can send, filled by one gather on the device and one
        DMA. Returns once `out` holds them."""
        if len(block_ids) != out.shape[0]:
            raise ValueError(f"{len(block_ids)} blocks into a buffer of {out.shape[0]}")
        ids = torch.tensor(block_ids, dtype=torch.int64).to(self.kv_cache.device)
        out.copy_(self.kv_cache.index_select(0, ids), non_blocking=True)
        _wait(self.kv_cache.device)

    def write_blocks(self, block_ids: list[int], src: torch.Tensor) -> None:
        """Copy `src` [n, *block shape] (pinned host memory from the KV store's client, or
        any tensor) into whole blocks: one DMA and one scatter. Returns once they hold it."""
        if len(block_ids) != src.shape[0]:
            raise ValueError(f"{src.shape[0]} blocks for {len(block_ids)} destinations")
        ids = torch.tensor(block_ids, dtype=torch.int64).to(self.kv_cache.device)
        self.kv_cache.index_copy_(0, ids, src.to(self.kv_cache.device, non_blocking=True))
        _wait(self.kv_cache.device)

    # -- export (prefill) -------------------------------------------------------------

    def keep(self, request_id: str, blocks: list[KVBlock]) -> None:
        self._held[request_id] = blocks

    def held(self, request_id: str) -> list[tuple[bytes, int]]:
        """(hash, block id) of a finished request's full prompt blocks, still pinned."""
        blocks = self._held.get(request_id)
        if blocks is None:
            raise KeyError(f"no held blocks for request {request_id!r}")
        out = []
        for b in blocks:
            assert b.block_hash is not None, f"held {b} lost its hash"
            out.append((b.block_hash, b.block_id))
        return out

    def holds(self, request_id: str) -> bool:
        """Whether a finished request's prompt blocks are still held under this id."""
        return request_id in self._held

    def release_held(self, request_id: str) -> None:
        self.pool.free(reversed(self._held.pop(request_id, [])))

    # -- import (decode) --------------------------------------------------------------

    def cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading hashes this engine already has cached."""
        n = 0
        for h in hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def pin_cached(self, hashes: list[bytes]) -> list[int]:
        """Pin the blocks of the leading hashes already cached; returns their ids."""
        blocks = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        self.pool.touch(blocks)
        return [b.block_id for b in blocks]

    def reserve(self, n: int) -> list[int] | None:
        """`n` private blocks to fill, or None if the pool is short."""
        blocks = self.pool.allocate(n)
        return None if blocks is None else [b.block_id for b in blocks]

    def publish(self, block_ids: list[int], hashes: list[bytes]) -> None:
        """Name filled blocks so requests find them; they stay pinned (see add_request)."""
        assert len(block_ids) == len(hashes)
        for i, h in zip(block_ids, hashes, strict=True):
            self.pool.cache(self.pool.blocks[i], h)

    def release(self, block_ids: list[int]) -> None:
        """Drop pins (from `reserve` or `pin_cached`) not handed to a request."""
        self.pool.free(self.pool.blocks[i] for i in reversed(block_ids))

    @property
    def num_held(self) -> int:
        return sum(len(b) for b in self._held.values())


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
