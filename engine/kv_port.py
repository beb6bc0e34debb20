"""Where KV blocks enter and leave an engine: the handoff between prefill and decode.

    prefill engine                                   decode engine
    add_request(hold_prompt_blocks=True)             reserve(n) -> block ids
    ... request finishes ...                         fill block(i) views (kvstore / copy)
    held(rid) -> [(hash, block id)] ── transfer ──>  publish(ids, hashes)
    block(id) views, then release_held(rid)          add_request(pinned_blocks=ids, ...)

Every method runs between engine steps (`AsyncEngine.call`), except reading or writing a
`block(id)` view, which is safe from any thread while the block is pinned: the engine never
writes a pinned block, and a reserved block is invisible to every request.

A block is its payload (engine.kv_format). An fp8_e4m3 block carries the scales its K/V
were divided by; `publish` refuses blocks whose scales are not this engine's, so a
request never reads KV quantized with other scales, and `release` gives a refused (or
half-filled) block this engine's scales back before the pool reuses it.
"""

from __future__ import annotations

import torch

from engine.block_pool import BlockPool, KVBlock
from engine.kv_format import KVBlockFormat


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
    def __init__(
        self,
        pool: BlockPool,
        kv_cache: torch.Tensor,
        fp8: tuple[KVBlockFormat, torch.Tensor] | None = None,
    ) -> None:
        """`kv_cache` holds one block payload a row; `fp8`, for an fp8_e4m3 cache, is its
        format and this engine's scales [num_layers, 2, num_kv_heads] fp32."""
        self.pool = pool
        self.kv_cache = kv_cache
        self._held: dict[str, list[KVBlock]] = {}
        self._scales: torch.Tensor | None = None
        self._block_scales: torch.Tensor | None = None  # [blocks, layers, 2, kv heads]
        if fp8 is not None:
            fmt, self._scales = fp8
            self._block_scales = fmt.scales_view(kv_cache)
        self._filling: set[int] = set()  # reserved, not yet published: scales unchecked

    def block(self, block_id: int) -> torch.Tensor:
        """One block's payload, contiguous: every layer's [num_layers, 2, block_size,
        kv_heads, head_dim] (for fp8_e4m3 as bytes, then its scales)."""
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
        if blocks is None:
            return None
        ids = [b.block_id for b in blocks]
        if self._scales is not None:
            self._filling.update(ids)
        return ids

    def publish(self, block_ids: list[int], hashes: list[bytes]) -> None:
        """Name filled blocks so requests find them; they stay pinned (see add_request).

        Raises ValueError, naming none of them, if an fp8 block carries scales other than
        this engine's: its K/V were quantized by an engine that calibrated differently.
        The caller still holds the pins (`release` them)."""
        assert len(block_ids) == len(hashes)
        self._check_scales(block_ids, hashes)
        self._filling.difference_update(block_ids)
        for i, h in zip(block_ids, hashes, strict=True):
            self.pool.cache(self.pool.blocks[i], h)

    def release(self, block_ids: list[int]) -> None:
        """Drop pins (from `reserve` or `pin_cached`) not handed to a request."""
        unchecked = [i for i in block_ids if i in self._filling]
        if unchecked:
            assert self._block_scales is not None and self._scales is not None
            ids = torch.tensor(unchecked, device=self._block_scales.device)
            self._block_scales[ids] = self._scales  # what this engine writes its KV with
            self._filling.difference_update(unchecked)
        self.pool.free(self.pool.blocks[i] for i in reversed(block_ids))

    def _check_scales(self, block_ids: list[int], hashes: list[bytes]) -> None:
        if self._block_scales is None or self._scales is None or not block_ids:
            return
        ids = torch.tensor(block_ids, device=self._block_scales.device)
        same = (self._block_scales[ids] == self._scales).flatten(1).all(dim=1).tolist()
        if all(same):
            return
        bad = same.index(False)
        theirs = self._block_scales[block_ids[bad]]
        differ = int((theirs != self._scales).sum())
        raise ValueError(
            f"KV block {hashes[bad].hex()[:16]} carries FP8 scales that differ from this "
            f"engine's in {differ} of {theirs.numel()} (layer, K|V, head) entries: it was "
            "quantized by an engine with other KV scales (another checkpoint, calibration "
            "text or Baton version); refusing it rather than reading it with the wrong scales"
        )

    @property
    def num_held(self) -> int:
        return sum(len(b) for b in self._held.values())


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
