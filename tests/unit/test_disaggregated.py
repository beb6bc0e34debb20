"""Prefill and decode as two engines handing KV over in memory give the colocated output."""

from __future__ import annotations

from engine.disaggregated import InProcessDisaggregation
from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine
from tests.unit.test_engine_parity import prompts


def test_split_prefill_decode_matches_one_engine(make_engine: MakeEngine) -> None:
    colocated = make_engine(batch_invariant=True)
    split = InProcessDisaggregation(
        make_engine(batch_invariant=True), make_engine(batch_invariant=True)
    )
    batch = prompts(colocated)
    greedy = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11)
    plist = [greedy] * 3 + [seeded] * 3
    want = colocated.generate(batch, plist)
    got = split.generate(batch, plist)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    # Decode computed only each prompt's partial tail block plus the first token (whose
    # logits give the second), then one token per further step.
    decode_stats = split.decode_engine.stats
    assert decode_stats.cached_prompt_tokens == sum(16 * (len(p) // 16) for p in batch)
    assert decode_stats.computed_tokens == sum(
        (len(p) % 16 + 1) + (len(c.token_ids) - 2) for p, c in zip(batch, got, strict=True)
    )
    assert split.prefill_engine.port.num_held == 0


def test_first_token_can_finish_the_request(make_engine: MakeEngine) -> None:
    split = InProcessDisaggregation(make_engine(), make_engine())
    prompt = prompts(split.prefill_engine)[0]
    out = split.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert split.decode_engine.stats.computed_tokens == 0


def test_decode_copies_only_blocks_it_lacks(make_engine: MakeEngine) -> None:
    split = InProcessDisaggregation(make_engine(), make_engine())
    prompt = prompts(split.prefill_engine)[0] * 4  # several full blocks
    params = SamplingParams(max_tokens=2, temperature=0)
    first = split.prefill([prompt], [params])[0]
    assert len(split.transfer(first)) == len(prompt) // 16
    split.prefill_engine.port.release_held(first.request_id)
    split.decode_engine.port.release(
        [split.decode_engine.pool.lookup(h).block_id for h in first.block_hashes]  # type: ignore[union-attr]
    )
    again = split.prefill([prompt], [params])[0]
    assert again.num_cached_tokens == 16 * ((len(prompt) - 1) // 16)
    assert split.transfer(again) == []  # decode still caches every block
    split.prefill_engine.port.release_held(again.request_id)


def test_pins_of_queued_handoffs_never_stall_decode(make_engine: MakeEngine) -> None:
    colocated = make_engine(max_model_len=128, batch_invariant=True)
    smallest = 8 * colocated.block_format.data_nbytes  # one 128-token sequence, no more
    split = InProcessDisaggregation(
        make_engine(max_model_len=128, batch_invariant=True),
        make_engine(max_model_len=128, kv_cache_bytes=smallest, batch_invariant=True),
    )
    decode = split.decode_engine
    batch = [list(range(1000 + 100 * i, 1033 + 100 * i)) for i in range(4)]  # 2 blocks + 1
    plist = [SamplingParams(max_tokens=4, temperature=0)] * 4
    ids = split.hand_over(split.prefill(batch, plist), plist)
    # Every block is pinned by a queued request, and the head needs one more for its tail.
    assert decode.pool.num_free_blocks == 0
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(50):  # each step must make progress; 50 is far more than the work takes
        if not decode.has_unfinished:
            break
        for out in decode.step():
            got[out.request_id] += out.new_token_ids
    assert not decode.has_unfinished
    # The requests whose pins were released recomputed their prompts to the same tokens.
    assert list(got.values()) == [c.token_ids for c in colocated.generate(batch, plist)]
