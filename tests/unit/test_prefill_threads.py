"""`prefill_threads`: steps in which nothing decodes run on that many CPU threads, every
other step on torch's count, and the tokens do not depend on it."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.unit.conftest import MakeEngine


def test_prefill_only_steps_take_prefill_threads(make_engine: MakeEngine) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = make_engine(linear="int4", dtype="bfloat16")  # the native CPU kernels
        engine = make_engine(linear="int4", dtype="bfloat16", prefill_threads=2)
        seen: list[tuple[int, int]] = []  # (decoding rows, threads) per forward
        forward = engine.runner.model.forward

        def observed(ids, positions, kv_cache, meta):  # type: ignore[no-untyped-def]
            seen.append((meta.num_decodes, torch.get_num_threads()))
            return forward(ids, positions, kv_cache, meta)

        engine.runner.model.forward = observed  # type: ignore[method-assign]
        prompt = engine.tokenizer.encode("The lighthouse keeper counted the ships " * 8)
        params = SamplingParams(max_tokens=6, temperature=0)
        ours = engine.generate([prompt], params)[0].token_ids
        assert ours == plain.generate([prompt], params)[0].token_ids
        assert seen[0] == (0, 2)  # the prefill
        assert {threads for decodes, threads in seen[1:]} == {1} and all(d for d, _ in seen[1:])
        assert torch.get_num_threads() == 1  # restored after the step
    finally:
        torch.set_num_threads(before)


def test_prefill_threads_must_be_positive(make_engine: MakeEngine) -> None:
    with pytest.raises(ValueError, match="prefill_threads must be >= 1"):
        make_engine(prefill_threads=0)
