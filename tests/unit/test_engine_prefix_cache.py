"""A request sharing a cached prefix computes only its uncached tokens, with equal output."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine

SYSTEM = (
    "You are a meticulous assistant for the public library of a small coastal town. You answer "
    "questions about opening hours, borrowing rules, reading rooms and weekend events, briefly "
    "and politely, and you never invent a rule the library does not have."
)


def test_shared_system_prompt_is_computed_once(make_engine: MakeEngine) -> None:
    engine = make_engine()
    tok = engine.tokenizer
    first = tok.encode_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When do you open?"}]
    )
    second = tok.encode_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Can I renew?"}]
    )
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    shared_blocks = shared // 16
    assert shared_blocks >= 3, "the test needs at least a 3-block common prefix"
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)

    engine.generate([first], params)
    before = engine.stats.computed_tokens
    hit = engine.generate([second], params)[0]
    computed = engine.stats.computed_tokens - before

    assert hit.num_cached_tokens == 16 * shared_blocks
    # Prefill covers only the uncached suffix; then one token per decode step.
    assert computed == (len(second) - 16 * shared_blocks) + (8 - 1)
    assert engine.stats.cached_prompt_tokens == 16 * shared_blocks

    engine.pool.reset_prefix_cache()
    before = engine.stats.computed_tokens
    cold = engine.generate([second], params)[0]
    assert cold.num_cached_tokens == 0
    assert engine.stats.computed_tokens - before == len(second) + 8 - 1
    assert cold.token_ids == hit.token_ids


def test_cache_salt_isolates_prefixes(make_engine: MakeEngine) -> None:
    engine = make_engine()
    prompt = engine.tokenizer.encode(SYSTEM * 2)
    params = SamplingParams(max_tokens=1, temperature=0)
    engine.add_request(prompt, params, cache_salt=b"tenant-a")
    while engine.has_unfinished:
        engine.step()
    engine.add_request(prompt, params, request_id="b", cache_salt=b"tenant-b")
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert outs[-1].num_cached_tokens == 0
    engine.add_request(prompt, params, request_id="a2", cache_salt=b"tenant-a")
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert outs[-1].num_cached_tokens == 16 * ((len(prompt) - 1) // 16)
