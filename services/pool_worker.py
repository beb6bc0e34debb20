"""What prefill and decode replicas share: an engine on its thread, a KV store bridge, and
the counters routing and /metrics read."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from engine.async_engine import AsyncEngine
from services.kv_bridge import KVBridge
from services.pool_requests import ModelCard, PoolStats
from services.router.replica_choice import prefix_key


class PoolWorker:
    pool: str

    def __init__(self, engine: AsyncEngine, bridge: KVBridge | None, model_id: str) -> None:
        self.engine = engine
        self.bridge = bridge
        self.model_id = model_id
        self.fallbacks: Counter[str] = Counter()
        self._background: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run housekeeping (lease releases) without making the request wait for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def describe(self) -> ModelCard:
        e = self.engine.engine
        return ModelCard(
            model_id=self.model_id,
            tokenizer=e.tokenizer,
            fingerprint=e.fingerprint,
            block_format=e.block_format,
            max_model_len=e.config.scheduler.max_model_len,
            vocab_size=e.config.model.vocab_size,
        )

    def stats(self) -> PoolStats:
        def read(e: object) -> PoolStats:
            eng = self.engine.engine
            s = eng.stats
            return PoolStats(
                pool=self.pool,
                running=len(eng.scheduler.running),
                waiting=len(eng.scheduler.waiting),
                free_blocks=eng.pool.num_free_blocks,
                total_blocks=eng.pool.num_blocks,
                computed_tokens=s.computed_tokens,
                prompt_tokens=s.prompt_tokens,
                cached_prompt_tokens=s.cached_prompt_tokens,
                generated_tokens=s.generated_tokens,
                fallbacks=dict(self.fallbacks),
                kv_transfer_bytes=dict(self.bridge.bytes) if self.bridge else {},
                kv_transfer_seconds=self.bridge.seconds if self.bridge else 0.0,
            )

        return self.engine.call(read)

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this periodically; the pools' request routers read it
        (services.router.replica_choice)."""
        s = self.stats()
        out: dict[str, Any] = {
            "running": s.running,
            "waiting": s.waiting,
            "free_blocks": s.free_blocks,
            "total_blocks": s.total_blocks,
        }
        if self.pool == "prefill":
            pool = self.engine.engine.pool
            out["cached_prefixes"] = self.engine.call(
                lambda _: frozenset(prefix_key(h) for h in pool.cached)
            )
        return out

    async def shutdown(self) -> None:
        if self.bridge is not None:
            await self.bridge.close()
        self.engine.shutdown()
