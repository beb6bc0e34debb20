"""AsyncEngine streams: a caller slower than the engine gets the steps it missed merged."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.unit.conftest import assert_idle
from tests.unit.tiny_model import tiny_checkpoint

PROMPT = list(range(200, 230))
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def tiny(default_checkpoint: LoadedCheckpoint) -> LoadedCheckpoint:
    return tiny_checkpoint(default_checkpoint)


async def _stream(engine: AsyncEngine, pause_s: float) -> list[RequestOutput]:
    outs = []
    async for out in engine.generate(PROMPT, PARAMS):
        outs.append(out)
        await asyncio.sleep(pause_s)  # a busy caller: the engine runs ahead
    return outs


async def test_a_slow_caller_gets_merged_outputs_with_every_token(
    tiny: LoadedCheckpoint,
) -> None:
    llm = EngineArgs(dtype="float32", max_model_len=128).create_engine(tiny)
    engine = AsyncEngine(llm)
    try:
        (expected,) = llm.generate([PROMPT], PARAMS)  # no caller to wait for
        fast = await _stream(engine, 0)
        slow = await _stream(engine, 0.05)
    finally:
        engine.shutdown()
    for outs in (fast, slow):
        assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
        assert "".join(o.new_text for o in outs) == expected.text
        assert len([lp for o in outs for lp in o.logprobs]) == len(expected.token_ids)
        assert [o.num_output_tokens for o in outs] == sorted({o.num_output_tokens for o in outs})
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
    assert len(slow) < len(expected.token_ids)  # steps were merged
    assert any(len(o.new_token_ids) > 1 for o in slow)
    assert_idle(llm)
