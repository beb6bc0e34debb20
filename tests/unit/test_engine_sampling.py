"""Sampling controls through the real engine: seeds, top-k/top-p, stops, logprobs, streaming."""

from __future__ import annotations

import math

import torch

from engine.sampler import Sampler, SamplerPlan, SamplingTensors
from engine.sampling_params import SAMPLING_EPS, SamplingParams
from tests.unit.conftest import MakeEngine

PROMPT = "Once upon a time, in a small village,"


def test_same_seed_same_text_whatever_the_batch(make_engine: MakeEngine) -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = engine.generate([PROMPT], params)[0]
    again = engine.generate([PROMPT], params)[0]
    other = SamplingParams(max_tokens=24, temperature=1.0, seed=99)
    batched = engine.generate(["Hello there", PROMPT, "2 + 2 ="], [other, params, other])[1]
    assert alone.token_ids == again.token_ids == batched.token_ids
    different = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=1.0, seed=5))
    assert different[0].token_ids != alone.token_ids


def test_top_k_one_is_greedy(make_engine: MakeEngine) -> None:
    engine = make_engine()
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0))[0]
    top1 = engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.5, top_k=1))[0]
    tiny_p = engine.generate([PROMPT], SamplingParams(max_tokens=16, top_p=1e-6, seed=3))[0]
    assert greedy.token_ids == top1.token_ids == tiny_p.token_ids


def test_a_temperature_below_sampling_eps_is_greedy(make_engine: MakeEngine) -> None:
    engine = make_engine()
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0]
    # logits / 1e-40 overflow float32: sampled, the row would be NaN and pick token 0.
    tiny = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=1e-40, seed=0))
    assert tiny[0].token_ids == greedy.token_ids
    assert SamplingParams(temperature=SAMPLING_EPS / 2).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    # A CUDA graph's sampler takes each row's temperature from SamplingTensors, where 0
    # marks a greedy row.
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=0.5, seed=1)]
    tensors = SamplingTensors.empty(2, 8)
    plan = SamplerPlan.of(params, 8, torch.device("cpu"))
    tensors.fill(params, [None, torch.Generator().manual_seed(1)], plan)
    assert tensors.temperature.tolist() == [0.0, 0.5]


def test_stop_string_cuts_text_and_names_itself(make_engine: MakeEngine) -> None:
    engine = make_engine()
    base = engine.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0))[0]
    words = base.text.split()
    stop = " ".join(words[3:5])
    cut = engine.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0, stop=(stop,)))[0]
    assert cut.text == base.text[: base.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.token_ids == base.token_ids[: len(cut.token_ids)]


def test_stop_token_and_length(make_engine: MakeEngine) -> None:
    engine = make_engine()
    base = engine.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    token = base.token_ids[6]
    first = base.token_ids.index(token)
    out = engine.generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(token,))
    )[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == token


def test_logprobs(make_engine: MakeEngine) -> None:
    engine = make_engine()
    out = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 6
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert len(lp.top) == 3 and lp.top[0][0] == token
        assert lp.token_logprob == lp.top[0][1] <= 0
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(math.exp(v) for _, v in lp.top) <= 1 + 1e-5


def test_streamed_increments_add_up(make_engine: MakeEngine) -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=24, temperature=0)
    whole = engine.generate([PROMPT], params)[0]
    pieces = list(engine.stream(PROMPT, params))
    assert "".join(p.new_text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.new_token_ids] == whole.token_ids
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])


def test_abort_mid_generation_frees_blocks(make_engine: MakeEngine) -> None:
    engine = make_engine()
    rid = engine.add_request(PROMPT * 4, SamplingParams(max_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free_blocks < engine.pool.num_blocks
    assert engine.abort(rid)
    assert not engine.abort(rid)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_logprobs_are_the_models_own_while_eos_is_blocked() -> None:
    """Before `min_tokens` EOS cannot be sampled, but the logprobs reported are the
    model's, as vLLM's raw logprobs: EOS keeps its place in the top list and the sampled
    token's logprob is not renormalized over the other tokens."""
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0], [4.0, 2.0, 1.0, 0.0]])
    model = torch.log_softmax(logits[0], dim=-1)
    params = [SamplingParams(max_tokens=4, temperature=0, logprobs=2)] * 2
    result = Sampler()(logits.clone(), params, [None, None], suppressed=[(0,), ()])
    assert result.token_ids == [1, 0]  # row 0 may not end: its best other token
    blocked = result.logprobs[0]
    assert blocked is not None
    assert math.isclose(blocked.token_logprob, float(model[1]), rel_tol=1e-6)
    assert [t for t, _ in blocked.top] == [0, 1]  # EOS still the model's first choice
    assert math.isclose(blocked.top[0][1], float(model[0]), rel_tol=1e-6)
