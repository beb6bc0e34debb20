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
from tests.unit.conftest import MakeEngine, tick_gaps


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


async def test_a_prefill_aborted_before_its_first_token_fails_and_holds_nothing(
    engine: AsyncEngine,
) -> None:
    server = PrefillServer(engine, None, "m")
    prompt = [100 + i % 5000 for i in range(900)]  # long enough to still run below
    prefill = asyncio.ensure_future(server.prefill(PrefillRequest("p", prompt, SamplingParams())))
    while engine.num_unfinished == 0:
        await asyncio.sleep(0.001)
    assert await engine.abort("p")
    with pytest.raises(RuntimeError, match="prefill ended without a token \\(abort\\)"):
        await prefill
    assert engine.call(lambda e: e.pool.num_free_blocks == e.pool.num_blocks)


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


def _first_output_on_a_loop_of_its_own(engine: AsyncEngine) -> tuple[Any, Any]:
    """A caller on another thread's event loop (say, a worker's `asyncio.new_event_loop`)
    that takes one output of a long request and lets its loop go, the stream still open."""
    loop = asyncio.new_event_loop()
    outputs = engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))

    async def first() -> Any:
        return await anext(outputs)

    loop.run_until_complete(first())
    return loop, outputs


async def test_a_caller_whose_loop_closed_costs_only_its_own_request(engine: AsyncEngine) -> None:
    """Handing an output to a closed loop raised on the engine thread, which died silently:
    every other caller waited forever and the health check still passed."""
    loop, gone = await asyncio.to_thread(_first_output_on_a_loop_of_its_own, engine)
    loop.close()
    outputs = engine.generate([4, 5], SamplingParams(max_tokens=5, ignore_eos=True))
    rest = await asyncio.wait_for(_collect(outputs), timeout=30)
    assert rest[-1].finished and rest[-1].num_output_tokens == 5
    engine.check_alive()
    assert engine.num_unfinished == 0  # the closed loop's request was aborted, not finished
    assert not await engine.acall(lambda e: e.has_unfinished)
    del gone


async def test_an_engine_failure_reaches_every_caller_past_a_closed_loop(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing the callers of a dead engine stopped at the first whose loop had closed."""
    die, closed = threading.Event(), threading.Event()
    step = engine.engine.step

    def dying_step() -> Any:
        if die.is_set():
            closed.wait(30)  # fail with the first caller's loop closed, its stream registered
            raise RuntimeError("a bug in a step")
        return step()

    monkeypatch.setattr(engine.engine, "step", dying_step)
    loop, gone = await asyncio.to_thread(_first_output_on_a_loop_of_its_own, engine)
    waiting = engine.generate([4, 5], SamplingParams(max_tokens=200, ignore_eos=True))
    await anext(waiting)
    await engine.acall(lambda _: die.set())
    loop.close()
    closed.set()
    with pytest.raises(RuntimeError, match="a bug in a step"):
        await asyncio.wait_for(_collect(waiting), timeout=30)
    with pytest.raises(EngineDeadError, match="engine thread failed"):
        engine.check_alive()
    del gone


async def test_abort_ends_the_stream_of_the_request(engine: AsyncEngine) -> None:
    """`abort` stopped the request in the engine, but its caller waited forever for more.
    As vLLM's AsyncLLM does, the stream ends with an output finished for "abort"."""
    outputs = engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), "r")
    first = await anext(outputs)
    assert await engine.abort("r")
    rest = await asyncio.wait_for(_collect(outputs), timeout=30)
    heard = [first, *rest]
    end = heard[-1]
    assert (end.request_id, end.new_token_ids, end.finished, end.finish_reason) == (
        "r",
        [],
        True,
        "abort",
    )
    assert (end.num_prompt_tokens, end.num_output_tokens) == (3, heard[-2].num_output_tokens)
    assert end.num_output_tokens < 200
    assert not await engine.abort("r")
    assert engine.num_unfinished == 0


async def test_a_stream_closed_after_its_request_finished_spares_the_ids_next_owner(
    engine: AsyncEngine,
) -> None:
    """A stream closed with its final output unread aborted by id: by then the id could
    name a new request, which it killed (and whose caller then waited forever)."""
    first = engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "x")
    await anext(first)
    while await engine.acall(lambda e: e.has_unfinished):  # "x" finishes, unread
        await asyncio.sleep(0.01)
    second = engine.generate([4, 5], SamplingParams(max_tokens=8, ignore_eos=True), "x")
    await anext(second)
    await first.aclose()  # the first caller hangs up now
    rest = await asyncio.wait_for(_collect(second), timeout=30)
    assert (rest[-1].num_output_tokens, rest[-1].finish_reason) == (8, "length")


async def test_a_caller_arriving_as_the_engine_dies_hears_of_it(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine died between a caller's liveness check and the queueing of its request:
    the request was queued on the dead engine, and its caller waited forever."""
    import engine.async_engine as async_engine

    def broken_step(self: LLMEngine) -> list[Any]:
        raise RuntimeError("a bug in a step")

    stream = async_engine._Stream

    def dies_first(*args: Any) -> Any:  # right after generate's check_alive
        engine.engine.step = broken_step.__get__(engine.engine)  # type: ignore[method-assign]
        engine.call(lambda e: e.add_request([1, 2, 3], SamplingParams(), "busy"))
        engine._thread.join(30)  # the engine thread has failed every stream and ended
        return stream(*args)

    monkeypatch.setattr(async_engine, "_Stream", dies_first)
    with pytest.raises(EngineDeadError, match="engine thread failed"):
        await asyncio.wait_for(_collect(engine.generate([4, 5], SamplingParams())), timeout=30)
    assert engine.call(lambda e: e.abort("busy"))  # `call` still serves a dead engine


async def test_the_loop_keeps_serving_while_a_step_computes(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate, abort and call took the engine's lock on the event loop, which the engine
    thread held for a whole step: the loop froze (8.8 s behind a 1,500-token CPU prefill)."""
    stepping = threading.Event()
    took: list[float] = []
    step = engine.engine.step

    def long_step() -> Any:
        if stepping.is_set():
            return step()
        stepping.set()
        start = time.perf_counter()
        time.sleep(1.0)  # a long prefill: torch computes with the GIL released
        outputs = step()
        took.append(time.perf_counter() - start)
        return outputs

    monkeypatch.setattr(engine.engine, "step", long_step)
    gaps: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(tick_gaps(gaps, stop))
    first = asyncio.create_task(_collect(engine.generate([1, 2, 3], SamplingParams(max_tokens=2))))
    await asyncio.to_thread(stepping.wait, 30)
    # Each is answered after the step; the loop waits for none of them.
    second, aborted, steps = await asyncio.wait_for(
        asyncio.gather(
            _collect(engine.generate([4, 5], SamplingParams(max_tokens=2))),
            engine.abort("unknown"),
            engine.acall(lambda e: e.stats.steps),
        ),
        timeout=30,
    )
    await first
    stop.set()
    await ticker
    assert second[-1].finished and not aborted and steps >= 1
    assert len(took) == 1 and took[0] >= 1.0
    assert max(gaps) < took[0] / 4, (max(gaps), took[0])
