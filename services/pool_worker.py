"""What prefill and decode replicas share: an engine on its thread, a KV store bridge, the
counters routing and /metrics read, and each request's span on this pool."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from typing import Any

from opentelemetry import trace

from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from services.kv_bridge import KVBridge
from services.pool_requests import DecodeRequest, ModelCard, PoolStats, PrefillRequest
from services.router.replica_choice import prefix_key
from services.telemetry import (
    FALLBACKS,
    GENERATION_TOKENS,
    KV_TRANSFER_BYTES,
    KV_USAGE,
    PREFIX_HIT,
    PREFIX_QUERIED,
    PROMPT_TOKENS,
    QUEUE_TIME,
    RUNNING,
    WAITING,
    Reading,
    Snapshot,
    Telemetry,
)
from services.tracing import extract, request_attributes, tracer


class PoolWorker:
    pool: str

    def __init__(self, engine: AsyncEngine, bridge: KVBridge | None, model_id: str) -> None:
        self.engine = engine
        self.bridge = bridge
        self.model_id = model_id
        self.fallbacks: Counter[str] = Counter()
        self.telemetry = Telemetry(self.pool, model_id)
        self._observed: PoolStats | None = None  # what `metrics` read for its collection
        self.telemetry.observe(self._readings)
        if bridge is not None:
            bridge.telemetry = self.telemetry

    def begin(self, request: PrefillRequest | DecodeRequest) -> trace.Span:
        """This pool's span of the request's trace, a child of the router's; it is not made
        current (a streaming caller chooses where). Records how long the request waited for
        this replica to take it up."""
        self.telemetry.record(QUEUE_TIME, max(0.0, time.time() - request.sent_at))
        attributes = request_attributes(
            self.model_id, request.request_id, request.params, len(request.prompt_token_ids)
        )
        return tracer.start_span(
            self.pool,
            context=extract(request.trace_context) if request.trace_context else None,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )

    def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine thread died (a bug in a step) is
        replaced, instead of failing every request it is sent."""
        self.engine.check_alive()

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

    async def stats(self) -> PoolStats:
        """The engine's load and totals, read between steps by the engine thread (the loop
        waits for no step), with this worker's own counters, read on the loop that keeps
        them."""
        s = await self.engine.acall(self._engine_stats)
        return replace(
            s,
            fallbacks=dict(self.fallbacks),
            kv_transfer_bytes=dict(self.bridge.bytes) if self.bridge else {},
        )

    def _engine_stats(self, e: LLMEngine) -> PoolStats:
        """Only on the engine thread, between steps."""
        return PoolStats(
            pool=self.pool,
            running=len(e.scheduler.running),
            waiting=len(e.scheduler.waiting),
            free_blocks=e.pool.num_free_blocks,
            total_blocks=e.pool.num_blocks,
            computed_tokens=e.stats.computed_tokens,
            prompt_tokens=e.stats.prompt_tokens,
            cached_prompt_tokens=e.stats.cached_prompt_tokens,
            handed_over_prompt_tokens=e.stats.handed_over_prompt_tokens,
            generated_tokens=e.stats.generated_tokens,
        )

    async def metrics(self) -> Snapshot:
        """This replica's series; the router merges every replica's into its /metrics."""
        self._observed = await self.stats()
        return self.telemetry.snapshot()  # no await in between: it observes these stats

    def _readings(self) -> list[Reading]:
        s = self._observed
        if s is None:
            return []  # collected before `metrics` read the engine
        used = 1 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0
        readings = [
            Reading(RUNNING, s.running),
            Reading(WAITING, s.waiting),
            Reading(KV_USAGE, used),
            # The prompt tokens this engine computed: a prompt prefilled remotely counts on
            # prefill, and on decode only its tail past the imported blocks, so a sum over
            # pools is the prompt work done, each token once per computation.
            Reading(PROMPT_TOKENS, s.prompt_tokens - s.cached_prompt_tokens),
            # Prefix-cache hits are the cache's (this engine's or the KV store's), as vLLM
            # counts them: a handoff's KV, computed for the request by the prefill pool, is
            # neither looked up nor hit on decode.
            Reading(PREFIX_QUERIED, s.prompt_tokens - s.handed_over_prompt_tokens),
            Reading(PREFIX_HIT, s.cached_prompt_tokens - s.handed_over_prompt_tokens),
            Reading(GENERATION_TOKENS, s.generated_tokens),
        ]
        # Whichever pool noticed it, a fallback means decode prefilled the prompt itself.
        readings += [
            Reading(FALLBACKS, n, {"pool": "decode", "reason": reason})
            for reason, n in sorted(s.fallbacks.items())
        ]
        readings += [
            Reading(KV_TRANSFER_BYTES, n, {"direction": direction})
            for direction, n in sorted(s.kv_transfer_bytes.items())
        ]
        return readings

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every ROUTING_STATS_PERIOD_S, on the replica's loop, which
        waits for no step; the pools' request routers read it
        (services.router.replica_choice)."""
        prefill = self.pool == "prefill"

        def read(e: LLMEngine) -> tuple[PoolStats, frozenset[int] | None]:
            cached = frozenset(prefix_key(h) for h in e.pool.cached) if prefill else None
            return self._engine_stats(e), cached

        s, cached = await self.engine.acall(read)
        out: dict[str, Any] = {
            "running": s.running,
            "waiting": s.waiting,
            "free_blocks": s.free_blocks,
            "total_blocks": s.total_blocks,
        }
        if cached is not None:
            out["cached_prefixes"] = cached
        return out

    async def shutdown(self) -> None:
        if self.bridge is not None:
            await self.bridge.close()
        self.engine.shutdown()
