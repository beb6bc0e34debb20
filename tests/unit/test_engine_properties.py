"""Random arrivals, steps, aborts and finishes through the real engine (tiny random model,
a pool small enough to force preemption); the pool's invariants hold after every action."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.sampling_params import SamplingParams
from engine.sequence import RequestStatus
from tests.unit.conftest import assert_idle
from tests.unit.tiny_model import tiny_checkpoint

MAX_LEN = 96
NUM_BLOCKS = 8  # 128 tokens: two long requests already overflow it
PREFIXES = [list(range(100 + 50 * i, 140 + 50 * i)) for i in range(3)]


@pytest.fixture(scope="module")
def tiny(default_checkpoint: LoadedCheckpoint) -> LoadedCheckpoint:
    return tiny_checkpoint(default_checkpoint)


def new_engine(checkpoint: LoadedCheckpoint, batch_invariant: bool = False) -> LLMEngine:
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, K|V, tokens, kv heads, head dim, fp32
    return EngineArgs(
        dtype="float32",
        max_model_len=MAX_LEN,
        kv_cache_bytes=NUM_BLOCKS * block_bytes,
        max_num_batched_tokens=48,
        max_num_seqs=6,
        batch_invariant=batch_invariant,
    ).create_engine(checkpoint)


prompts = st.builds(
    lambda prefix, suffix, cut: (PREFIXES[prefix] + suffix)[:cut] or [7],
    st.integers(0, len(PREFIXES) - 1),
    st.lists(st.integers(1000, 2000), max_size=30),
    st.integers(1, 70),
)


def test_engine_invariants_under_random_traffic(tiny: LoadedCheckpoint) -> None:
    class EngineMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.engine = new_engine(tiny)
            self.finished: set[str] = set()
            self.emitted: dict[str, int] = {}

        @rule(prompt=prompts, max_tokens=st.integers(1, 48), greedy=st.booleans())
        def arrive(self, prompt: list[int], max_tokens: int, greedy: bool) -> None:
            max_tokens = min(max_tokens, MAX_LEN - len(prompt))
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=len(prompt)
            )
            self.engine.add_request(prompt, params)

        @rule()
        def step(self) -> None:
            for out in self.engine.step():
                rid = out.request_id
                assert rid not in self.finished
                assert len(out.new_token_ids) == 1
                # Exactly one token per report, preemptions notwithstanding.
                assert out.num_output_tokens == self.emitted.get(rid, 0) + 1
                self.emitted[rid] = out.num_output_tokens
                if out.finished:
                    self.finished.add(rid)

        @precondition(lambda self: bool(self.engine._requests))
        @rule(data=st.data())
        def abort(self, data: st.DataObject) -> None:
            rid = data.draw(st.sampled_from(sorted(self.engine._requests)))
            request = self.engine._requests[rid]
            assert self.engine.abort(rid)
            assert request.status is RequestStatus.FINISHED_ABORTED
            assert not self.engine.abort(rid)

        @invariant()
        def pool_is_consistent(self) -> None:
            engine = self.engine
            engine.pool.check_invariants()
            held = engine.kv._blocks
            assert sum(b.ref_cnt for b in engine.pool.blocks) == sum(map(len, held.values()))
            running = engine.scheduler.running
            waiting = list(engine.scheduler.waiting)
            assert {r.request_id for r in running + waiting} == set(engine._requests)
            for r in running:
                assert r.status is RequestStatus.RUNNING
                assert engine.kv.num_held(r) * 16 >= r.num_computed_tokens
            for r in waiting:
                assert r.status is RequestStatus.WAITING and engine.kv.num_held(r) == 0
            assert len(running) <= engine.config.scheduler.max_num_seqs

        def teardown(self) -> None:
            while self.engine.has_unfinished:
                self.engine.step()
            assert_idle(self.engine)

    EngineMachine.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    EngineMachine.TestCase().runTest()


def test_preemption_happens_and_recomputes(tiny: LoadedCheckpoint) -> None:
    """Concurrent long requests overflow the pool: the newest is preempted, recomputed, and
    still gives the same greedy tokens as when it ran alone."""
    engine = new_engine(tiny, batch_invariant=True)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts_ = [PREFIXES[i] + [1500 + i] * 10 for i in range(3)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts_]
    engine.pool.reset_prefix_cache()
    together = engine.generate(prompts_, params)
    assert engine.stats.preemptions > 0
    assert [c.token_ids for c in together] == alone
    assert_idle(engine)
