"""Greedy fp32 output equals Hugging Face transformers' on the same GGUF, token for token,
and a request's tokens do not depend on what it is batched with."""

from __future__ import annotations

from typing import Any

import torch

from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine

NEW_TOKENS = 32
STAGGERED_TOKENS = 24
"""Past the six steps that stagger the batch's arrivals, what is left is decoding."""
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 1, 2, 3, 5, 8,",
    "The meaning of life is",
    "Translate to French: Good morning, how are you?",
]


def prompts(engine: Any) -> list[list[int]]:
    # Half plain completions, half through the chat template.
    tok = engine.tokenizer
    plain = [tok.encode(t) for t in TEXTS[:3]]
    chat = [tok.encode_chat([{"role": "user", "content": t}]) for t in TEXTS[3:]]
    return plain + chat


def test_greedy_matches_transformers(make_engine: MakeEngine, hf_gguf_model: Any) -> None:
    engine = make_engine()
    batch = prompts(engine)
    # min_tokens mirrors transformers' min_new_tokens: EOS is masked so every token counts.
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)
    ours = engine.generate(batch, params)
    for prompt, out in zip(batch, ours, strict=True):
        with torch.inference_mode():
            ref = hf_gguf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=2,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref, engine.tokenizer.decode(prompt)
        assert len(out.token_ids) == NEW_TOKENS and out.finish_reason == "length"


def test_staggered_batch_equals_each_request_alone(make_engine: MakeEngine) -> None:
    engine = make_engine(batch_invariant=True)
    batch = prompts(engine)
    n = STAGGERED_TOKENS
    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0)
    alone = []
    for p in batch:
        engine.pool.reset_prefix_cache()
        alone.append(engine.generate([p], params)[0].token_ids)
    engine.pool.reset_prefix_cache()
    # One new arrival per step: every step mixes prefills with decodes at other positions.
    got: dict[str, list[int]] = {}
    ids: list[str] = []
    for p in batch:
        ids.append(engine.add_request(p, params))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    steps_with_company = engine.stats.steps
    while engine.has_unfinished:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert steps_with_company >= len(batch)
    assert [got[i] for i in ids] == alone
