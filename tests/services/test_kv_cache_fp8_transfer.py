"""FP8 KV blocks through a real KV store shard: an FP8-weight prefill engine's blocks, with
the scales their payload carries, reach an INT4-weight decode engine; a decode engine whose
scales differ refuses them, and its fetch ends holding no block."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from engine.sampling_params import SamplingParams
from services.kv_bridge import KVBridge
from tests.services.stack import Shard
from tests.unit.tiny_model import tiny_checkpoint


@pytest.fixture
def engines(default_checkpoint: LoadedCheckpoint) -> Iterator[tuple[AsyncEngine, AsyncEngine]]:
    tiny = tiny_checkpoint(default_checkpoint)

    def engine(linear: str) -> AsyncEngine:
        args = EngineArgs(
            linear=linear, max_model_len=256, kv_cache_bytes=2**20, kv_cache_dtype="fp8"
        )
        return AsyncEngine(args.create_engine(tiny))

    prefill, decode = engine("fp8"), engine("int4")
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def _prefill_and_fetch(
    prefill: AsyncEngine, decode: AsyncEngine, shard: Shard
) -> tuple[list[bytes], list[int]]:
    """Prefill a prompt, put its blocks in the store, fetch them into `decode`."""
    put, get = KVBridge(prefill, [shard.address], 5, 30), KVBridge(decode, [shard.address], 5, 30)
    fingerprint = prefill.engine.fingerprint
    prompt = list(range(1000, 1040))  # two full blocks
    params = SamplingParams(max_tokens=1)
    async for _ in prefill.generate(prompt, params, "p", hold_prompt_blocks=True):
        pass
    hashes = [h for h, _ in await prefill.acall(lambda e: e.port.held("p"))]
    try:
        await put.export(fingerprint, "p", 0, "lease-p")
        return hashes, await get.fetch(fingerprint, hashes)
    finally:
        await prefill.acall(lambda e: e.port.release_held("p"))
        put.release(fingerprint, "lease-p")
        await put.close()
        await get.close()


def test_blocks_reach_the_decode_pool_with_their_scales(
    engines: tuple[AsyncEngine, AsyncEngine], shard: Shard
) -> None:
    prefill, decode = engines
    hashes, pinned = asyncio.run(_prefill_and_fetch(prefill, decode, shard))
    assert len(pinned) == len(hashes) == 2
    port = decode.engine.port
    assert [port.block(i).tolist() for i in pinned] == [
        prefill.engine.port.block(prefill.engine.pool.lookup(h).block_id).tolist()  # type: ignore[union-attr]
        for h in hashes
    ]
    decode.call(lambda e: e.port.release(pinned))


def test_a_decode_pool_with_other_scales_refuses_them(
    engines: tuple[AsyncEngine, AsyncEngine], shard: Shard
) -> None:
    prefill, decode = engines
    scales = decode.engine.model.kv_scales
    assert scales is not None
    scales[3 % scales.shape[0], 1, 0] *= 2  # as if decode had calibrated otherwise
    with pytest.raises(ValueError, match="carries FP8 scales that differ from this engine's"):
        asyncio.run(_prefill_and_fetch(prefill, decode, shard))
    pool = decode.engine.pool
    assert decode.call(lambda e: pool.num_free_blocks == pool.num_blocks and not pool.cached)
