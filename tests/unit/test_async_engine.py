"""AsyncEngine and the pool workers on it: ids reused as soon as they finish, refusals
that touch nothing of other requests, a dead engine reported."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError, RequestRefused
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from services.decode.server import DecodeServer
from services.pool_requests import PrefillRequest
from services.prefill.server import PrefillServer
from tests.unit.conftest import MakeEngine


@pytest.fixture
def engine(make_engine: MakeEngine) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(make_engine())
    yield engine
    engine.shutdown()


async def test_an_id_taken_again_keeps_its_new_stream(engine: AsyncEngine) -> None:
    """The first request's cleanup runs after its last output; by then the id may belong
    to a second request, whose stream it used to remove (the second then waited forever)."""
    first = engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "x")
    outputs = [out async for out in _until_finished(first)]
    assert outputs[-1].finished
    second = engine.generate([4, 5], SamplingParams(max_tokens=3), "x")
    assert not (await anext(second)).finished
    await first.aclose()  # the first request's cleanup, after the id was taken again
    rest = await asyncio.wait_for(_collect(second), timeout=30)
    assert rest[-1].finished and rest[-1].num_output_tokens == 3
    third = engine.generate([6, 7], SamplingParams(max_tokens=4), "x")
    fourth = engine.generate([6, 7], SamplingParams(max_tokens=4), "x")
    assert (await anext(third)).num_output_tokens >= 1
    with pytest.raises(RequestRefused, match="already in use"):
        await anext(fourth)
    assert [out async for out in third][-1].num_output_tokens == 4


async def _collect(outputs: Any) -> list[Any]:
    return [out async for out in outputs]


async def _until_finished(outputs: Any) -> Any:
    """The outputs up to the finished one, leaving the generator open (not exhausted)."""
    while True:
        out = await anext(outputs)
        yield out
        if out.finished:
            return


async def test_a_pool_whose_engine_died_fails_its_health_check(engine: AsyncEngine) -> None:
    """A step that raises (an engine bug) ends the engine thread; Ray Serve's probe must
    then replace the replica instead of routing requests to it."""
    worker = DecodeServer(engine, None, "m")
    worker.check_health()

    def broken_step(self: LLMEngine) -> list[Any]:
        raise RuntimeError("a bug in a step")

    engine.engine.step = broken_step.__get__(engine.engine)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug in a step"):
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2)):
            pass
    with pytest.raises(EngineDeadError, match="engine thread failed"):
        worker.check_health()


async def test_a_refused_duplicate_leaves_the_prefill_it_collided_with_alone(
    engine: AsyncEngine,
) -> None:
    """A prefill refused for an id in use used to release the held prompt blocks of the
    request that owned the id, whose handoff then failed (KeyError in `port.held`)."""
    server = PrefillServer(engine, None, "m")
    prompt = [100 + i % 5000 for i in range(900)]  # long enough to still run below
    owner = asyncio.ensure_future(server.prefill(PrefillRequest("p", prompt, SamplingParams())))
    while engine.num_unfinished == 0:
        await asyncio.sleep(0.001)
    with pytest.raises(RequestRefused, match="already in use"):
        await server.prefill(PrefillRequest("p", [1, 2, 3], SamplingParams()))
    assert not owner.done()
    handoff = await owner
    assert handoff.request_id == "p" and handoff.prompt_token_ids == prompt


async def test_a_waiting_request_hears_of_progress_not_of_time(
    make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keepalive_s`: a request queued behind `max_num_seqs` gets empty outputs while the
    engine steps, and none while a step hangs (the caller's silence check must fire)."""
    engine = AsyncEngine(make_engine(max_num_seqs=1))
    hang, stuck = threading.Event(), threading.Event()
    try:
        running = engine.generate([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
        assert (await anext(running)).num_output_tokens == 1
        waiting = engine.generate([4, 5], SamplingParams(max_tokens=2), keepalive_s=0.01)
        first = await asyncio.wait_for(anext(waiting), timeout=30)
        assert (first.new_token_ids, first.finished, first.num_output_tokens) == ([], False, 0)

        step = engine.engine.step

        def hung_step() -> Any:
            stuck.set()
            while not hang.is_set():  # the engine thread waits here, holding no output
                time.sleep(0.01)
            return step()

        monkeypatch.setattr(engine.engine, "step", hung_step)
        await asyncio.to_thread(stuck.wait, 30)
        heard: list[Any] = []  # read on, without cancelling `waiting` (that would abort it)
        reader = asyncio.create_task(_collect_into(waiting, heard))
        await asyncio.sleep(0.1)
        before = len(heard)  # keepalives queued before the hang began
        await asyncio.sleep(0.5)  # fifty keepalive periods without a step
        assert len(heard) == before, "keepalives kept coming while no step completed"
        hang.set()
        rest = [out async for out in running]
        assert rest[-1].finished
        await asyncio.wait_for(reader, timeout=30)
        assert heard[-1].finished and heard[-1].num_output_tokens == 2
    finally:
        hang.set()  # a failed check must not leave the engine thread waiting
        engine.shutdown()


async def _collect_into(outputs: Any, into: list[Any]) -> None:
    async for out in outputs:
        into.append(out)
