"""Output text through the real engine with a sentencepiece-style (Metaspace) tokenizer,
whose decoder drops the leading space of the first token it sees."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from tests.unit.conftest import assert_idle
from tests.unit.tiny_model import tiny_model

VOCAB = 64
PROMPT = "w1 w2 w3"


@pytest.fixture
def engine() -> LLMEngine:
    backend = tokenizers.Tokenizer(
        models.WordLevel({f"▁w{i}": i for i in range(VOCAB)}, unk_token="▁w0")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    checkpoint = tiny_model(Tokenizer(backend, bos_token_id=None, eos_token_ids=()), VOCAB)
    return EngineArgs(dtype="float32", max_model_len=64).create_engine(checkpoint)


def continuation(engine: LLMEngine, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The output's text as vLLM gives it: the whole sequence's text past the prompt's."""
    prompt = engine.tokenizer.decode(prompt_ids)
    return engine.tokenizer.decode(prompt_ids + output_ids)[len(prompt) :]


def test_first_token_keeps_its_leading_space(engine: LLMEngine) -> None:
    prompt_ids = engine.tokenizer.encode(PROMPT)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.text == continuation(engine, prompt_ids, out.token_ids)
    assert out.text.startswith(" w")
    # A stop string spelled with the space matches the first token.
    first = continuation(engine, prompt_ids, out.token_ids[:1])
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, stop=(first,)))
    assert (stopped[0].text, stopped[0].stop_reason) == ("", first)
    assert_idle(engine)


def test_resumed_output_reads_as_one_stream(engine: LLMEngine) -> None:
    """A migrated or handed-over request replays its output prefix after the prompt."""
    prompt_ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=4, temperature=0)
    whole = engine.generate([PROMPT], params)[0]
    for cut in (1, 3):
        rid = engine.add_request(PROMPT, params, output_prefix=whole.token_ids[:cut])
        resumed = engine.collect([rid])[0]
        assert resumed.token_ids == whole.token_ids
        assert resumed.text == whole.text == continuation(engine, prompt_ids, whole.token_ids)
    assert_idle(engine)
