"""Engine fixtures: engines built here are checked, after every test, to hold no blocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint

torch.set_num_threads(2)

MakeEngine = Callable[..., LLMEngine]


def assert_idle(engine: LLMEngine) -> None:
    """Every block back in the free queue, every ref count zero, no request left behind."""
    engine.pool.check_invariants()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in engine.pool.blocks)
    assert not engine.has_unfinished and not engine._requests and not engine._streams
    assert engine.port.num_held == 0


@pytest.fixture
def make_engine(default_checkpoint: LoadedCheckpoint) -> Iterator[MakeEngine]:
    """Build engines on the default model (fp32 unless told otherwise); checked at teardown."""
    built: list[LLMEngine] = []

    def make(checkpoint: LoadedCheckpoint | None = None, **kwargs: Any) -> LLMEngine:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("kv_cache_bytes", 64 * 2**20)
        engine = EngineArgs(**kwargs).create_engine(checkpoint or default_checkpoint)
        built.append(engine)
        return engine

    yield make
    for engine in built:
        assert_idle(engine)


async def tick_gaps(gaps: list[float], stop: asyncio.Event) -> None:
    """Every 5 ms on the running loop, appends the time since the last tick: a loop frozen
    by blocking work shows as one long gap."""
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
