"""The pool workers on an engine thread: what their event loop asks of the engine (routing
stats, stats, /metrics, a KV fetch's pins) waits for no step, and a fetch cancelled while
its pins are being taken ends holding none."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from engine.async_engine import AsyncEngine
from engine.hashing import block_hashes
from engine.sampling_params import SamplingParams
from services.kv_bridge import KVBridge
from services.prefill.server import PrefillServer
from services.router.replica_choice import prefix_key
from tests.unit.conftest import MakeEngine, tick_gaps

T = TypeVar("T")
STEP_S = 1.0  # a long prefill: torch computes with the GIL released, as sleep does
PROMPT = [100 + i for i in range(40)]  # two full blocks
UNREACHABLE = "127.0.0.1:1"  # a store these tests must never get to


@pytest.fixture
def engine(make_engine: MakeEngine) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(make_engine())
    yield engine
    engine.shutdown()


class LongStep:
    """Makes the engine's next step last STEP_S; `gaps` are the loop's, every 5 ms, from
    the start of the step until `measuring` ends."""

    def __init__(self, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.took: list[float] = []
        self.gaps: list[float] = []
        step = engine.engine.step

        def long_step() -> Any:
            if self.started.is_set():
                return step()
            self.started.set()
            start = time.perf_counter()
            time.sleep(STEP_S)
            outputs = step()
            self.took.append(time.perf_counter() - start)
            return outputs

        monkeypatch.setattr(engine.engine, "step", long_step)

    @asynccontextmanager
    async def measuring(self) -> AsyncIterator[None]:
        stop = asyncio.Event()
        ticker = asyncio.create_task(tick_gaps(self.gaps, stop))
        await asyncio.to_thread(self.started.wait, 30)
        try:
            yield
        finally:
            stop.set()
            await ticker

    def assert_the_loop_kept_serving(self) -> None:
        assert len(self.took) == 1 and self.took[0] >= STEP_S
        assert max(self.gaps) < self.took[0] / 4, (max(self.gaps), self.took[0])


async def test_routing_stats_stats_and_metrics_wait_for_no_step(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read the engine by a blocking `call` on the replica's loop, which froze it (and
    every stream it served) for the rest of the step: Ray Serve asks for routing stats every
    second, the router's /metrics for stats."""
    server = PrefillServer(engine, None, "m")
    step = LongStep(engine, monkeypatch)
    running = asyncio.create_task(_collect(engine.generate(PROMPT, SamplingParams(max_tokens=8))))
    async with step.measuring():
        routing, stats, metrics = await _within(
            asyncio.gather(server.record_routing_stats(), server.stats(), server.metrics())
        )
    step.assert_the_loop_kept_serving()
    # Read between the prefill step and the next one: the request runs, its blocks cached.
    total = engine.engine.pool.num_blocks
    hashes = block_hashes(engine.engine.fingerprint, PROMPT)
    assert routing == {
        "running": 1,
        "waiting": 0,
        "free_blocks": total - 3,
        "total_blocks": total,
        "cached_prefixes": frozenset(prefix_key(h) for h in hashes),
    }
    assert (stats.running, stats.waiting, stats.free_blocks) == (1, 0, total - 3)
    assert stats.prompt_tokens == len(PROMPT) and stats.fallbacks == {}
    gauges = {s.metric.name: s.value for s in metrics.series}
    assert gauges["baton_num_requests_running"] == 1
    assert gauges["baton_prompt_tokens_total"] == len(PROMPT)
    assert (await running)[-1].finished


async def test_a_kv_fetch_waits_for_no_step(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fetch` took its pins by a blocking `call`, freezing the loop for the rest of the
    step. The blocks are cached here already: the store is never asked."""
    await _collect(engine.generate(PROMPT, SamplingParams(max_tokens=1)))
    cached = [b.block_id for b in map(engine.engine.pool.lookup, _hashes(engine)) if b]
    assert len(cached) == 2
    bridge = KVBridge(engine, [UNREACHABLE], timeout_s=5, lease_ttl_s=30)
    step = LongStep(engine, monkeypatch)
    running = asyncio.create_task(_collect(engine.generate([7, 8, 9], SamplingParams())))
    async with step.measuring():
        pinned = await _within(bridge.fetch(engine.engine.fingerprint, _hashes(engine)))
    step.assert_the_loop_kept_serving()
    assert pinned == cached
    await engine.acall(lambda e: e.port.release(pinned))
    await running


async def test_a_kv_fetch_cancelled_while_taking_its_pins_holds_none(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its pins were queued behind a step, `fetch` lost the answer that
    named them: the blocks it reserved stayed pinned for good."""
    bridge = KVBridge(engine, [UNREACHABLE], timeout_s=5, lease_ttl_s=30)
    step = LongStep(engine, monkeypatch)
    running = asyncio.create_task(_collect(engine.generate([7, 8, 9], SamplingParams())))
    async with step.measuring():
        fetch = asyncio.create_task(bridge.fetch(engine.engine.fingerprint, _hashes(engine)))
        await asyncio.sleep(0.1)
        assert not step.took  # its pins are still queued behind the step
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await _within(fetch)
        # It ends once what it pinned is back: every block but the running request's is free.
        free = await engine.acall(lambda e: (e.pool.num_free_blocks, e.pool.num_blocks))
        assert free[0] == free[1] - 1
    step.assert_the_loop_kept_serving()
    await running
    assert engine.call(lambda e: e.pool.num_free_blocks == e.pool.num_blocks)


def _hashes(engine: AsyncEngine) -> list[bytes]:
    return block_hashes(engine.engine.fingerprint, PROMPT)


async def _within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, timeout=30)


async def _collect(outputs: Any) -> list[Any]:
    return [out async for out in outputs]
