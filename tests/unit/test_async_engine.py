"""AsyncEngine: a consumer that falls behind gets what queued up as one output."""

from __future__ import annotations

import asyncio

from engine.async_engine import AsyncEngine
from engine.loaders import LoadedCheckpoint
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine, assert_idle
from tests.unit.tiny_model import tiny_checkpoint

PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)


async def _collect(engine: AsyncEngine, lag_s: float) -> list[RequestOutput]:
    outputs = []
    async for out in engine.generate([5, 6, 7, 8, 9], PARAMS):
        outputs.append(out)
        await asyncio.sleep(lag_s)  # the engine thread steps on meanwhile
    return outputs


async def test_a_lagging_consumer_gets_the_same_tokens_in_fewer_outputs(
    make_engine: MakeEngine, default_checkpoint: LoadedCheckpoint
) -> None:
    engine = AsyncEngine(make_engine(tiny_checkpoint(default_checkpoint), max_model_len=256))
    try:
        prompt = await _collect(engine, 0.0)
        lagging = await _collect(engine, 0.05)
    finally:
        engine.shutdown()
    assert_idle(engine.engine)
    assert len(lagging) < len(prompt)  # merged while the consumer slept
    for outs in (prompt, lagging):
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == [t for o in prompt for t in o.new_token_ids] and len(tokens) == 24
        assert [len(o.new_token_ids) for o in outs] == [len(o.logprobs) for o in outs]
        assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in prompt)
        running = 0
        for o in outs:  # cumulative counters stay those of the last merged increment
            running += len(o.new_token_ids)
            assert o.num_output_tokens == running
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
