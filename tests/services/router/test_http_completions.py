"""POST /v1/completions through the official openai client, against real uvicorn."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from services.router.pipeline import ColocatedPipeline

from .conftest import MODEL_ID

PROMPT = "The capital of France is"


def greedy(client: openai.OpenAI, max_tokens: int = 6, **kwargs: Any) -> Any:
    return client.completions.create(
        model=MODEL_ID,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        **kwargs,
    )


def test_usage_counts_prompt_and_generated_tokens_exactly(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = greedy(client, logprobs=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.model == MODEL_ID
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(pipeline.tokenizer.encode(PROMPT))
    assert result.usage.completion_tokens == len(choice.logprobs.tokens) == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6


def test_token_id_prompt_is_the_same_request_as_its_text(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    ids = pipeline.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == greedy(client).choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


def test_a_batch_of_prompts_numbers_choices_prompt_major(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    prompts = [PROMPT, "One, two, three,"]
    result = client.completions.create(
        model=MODEL_ID, prompt=prompts, max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    texts = [c.text for c in result.choices]
    assert texts[0] == texts[1] == greedy(client, max_tokens=3).choices[0].text
    assert texts[2] == texts[3] != texts[0]
    assert result.usage is not None
    assert result.usage.prompt_tokens == sum(len(pipeline.tokenizer.encode(p)) for p in prompts)
    assert result.usage.completion_tokens == 4 * 3


def test_stream_reassembles_the_non_streamed_text_and_ends_with_usage(
    client: openai.OpenAI,
) -> None:
    expected = greedy(client)
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage_chunk = chunks
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in content) == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert all(c.usage is None for c in content)
    assert usage_chunk.choices == [] and usage_chunk.usage == expected.usage


def test_stream_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(greedy(client, max_tokens=3, stream=True))
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=8).choices[0].text
    stop = full.split()[2]  # a word the greedy text reaches after a few tokens
    cut = full[: full.index(stop)]
    stopped = greedy(client, max_tokens=8, stop=["@@never@@", stop])
    choice = stopped.choices[0]
    assert (choice.text, choice.finish_reason) == (cut, "stop")
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == stop
    streamed = greedy(client, max_tokens=8, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_same_seed_same_texts_and_n_choices_differ(client: openai.OpenAI) -> None:
    def sample(**kwargs: Any) -> list[str]:
        result = client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=5,
            temperature=1.0,
            **kwargs,
        )
        assert [c.index for c in result.choices] == list(range(len(result.choices)))
        assert result.usage is not None and result.usage.completion_tokens == 5 * len(
            result.choices
        )
        return [c.text for c in result.choices]

    first = sample(n=3, seed=1234)
    assert sample(n=3, seed=1234) == first
    assert len(set(first)) > 1  # choice i samples with seed + i
    assert sample(n=3, seed=99) != first


def test_logprobs_list_the_sampled_token_among_the_top(client: openai.OpenAI) -> None:
    choice = greedy(client, logprobs=3).choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == choice.text
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3  # greedy: the sampled token is the most likely one
        assert top[token] == logprob == max(top.values())
        assert logprob <= 0


def test_model_may_be_omitted(base_url: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "unknown_field": {"x": 1}}
    response = httpx2.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL_ID


def test_include_stop_str_in_output_ends_the_text_with_what_stopped_it(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    full = greedy(client, max_tokens=8).choices[0].text
    stop = full.split()[2]  # a word the greedy text reaches after a few tokens
    kept = full[: full.index(stop) + len(stop)]
    include = {"extra_body": {"include_stop_str_in_output": True}}
    choice = greedy(client, max_tokens=8, stop=["@@never@@", stop], **include).choices[0]
    assert (choice.text, choice.finish_reason) == (kept, "stop")
    streamed = greedy(client, max_tokens=8, stop=stop, stream=True, **include)
    assert "".join(c.choices[0].text for c in streamed) == kept
    # A stop token's text is kept too, as vLLM keeps it.
    (stop_id,) = pipeline.tokenizer.encode(f" {stop}")
    by_token = {"extra_body": {"include_stop_str_in_output": True, "stop_token_ids": [stop_id]}}
    choice = greedy(client, max_tokens=8, **by_token).choices[0]
    assert (choice.text, choice.finish_reason) == (kept, "stop")


def _token_bytes(token: str) -> bytes:
    """A legacy logprobs token's bytes: `bytes:` tokens spell theirs as escapes."""
    if token.startswith("bytes:"):
        return (
            token.removeprefix("bytes:")
            .encode("latin-1")
            .decode("unicode_escape")
            .encode("latin-1")
        )
    return token.encode()


def test_logprobs_of_tokens_splitting_a_character_name_its_bytes(client: openai.OpenAI) -> None:
    """Each emoji here spans three byte-level tokens, none of them text on its own."""
    emoji = "Emoji list: 😀 😃 😄 😁 😆 😅 🤣 😂 🙂 🙃"
    result = client.completions.create(
        model=MODEL_ID, prompt=emoji, max_tokens=15, temperature=0, logprobs=2
    )
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.text_offset and lp.top_logprobs
    assert any(t.startswith("bytes:") for t in lp.tokens)
    assert not any("\ufffd" in t for t in lp.tokens)
    raw = [_token_bytes(t) for t in lp.tokens]
    assert b"".join(raw).decode() == choice.text
    # A token's text starts after the whole characters the tokens before it complete.
    assert lp.text_offset == [
        len(b"".join(raw[:i]).decode(errors="ignore")) for i in range(len(raw))
    ]
    assert lp.text_offset[-1] < len(choice.text)
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert token in top and len(top) == 2  # greedy: the sampled token is the best one
    streamed = list(
        client.completions.create(
            model=MODEL_ID, prompt=emoji, max_tokens=15, temperature=0, logprobs=2, stream=True
        )
    )
    offsets = [
        o
        for c in streamed
        if c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset or []
    ]
    assert offsets == lp.text_offset


def test_text_offsets_stay_within_the_text_a_stop_string_cuts(client: openai.OpenAI) -> None:
    """The stop string spans several tokens: the ones after its start, generated before
    it completes, sit at the end of the cut text, streamed or not."""
    full = greedy(client, max_tokens=8).choices[0].text
    stop = full[full.index(".") : full.index(full.split()[2])]  # from "." to the 3rd word
    assert len(stop) > 2
    whole = greedy(client, max_tokens=8, stop=stop, logprobs=0).choices[0]
    lp = whole.logprobs
    assert lp is not None and lp.tokens and lp.text_offset is not None
    assert whole.text == full[: full.index(stop)]
    assert len(lp.tokens) > 2 and lp.text_offset[-2:] == [len(whole.text)] * 2
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(greedy(client, max_tokens=8, stop=stop, logprobs=0, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens or []] == lp.tokens
    assert [o for s in streamed for o in s.text_offset or []] == lp.text_offset
    kept = greedy(
        client, max_tokens=8, stop=stop, logprobs=0, extra_body={"include_stop_str_in_output": True}
    ).choices[0]
    assert kept.text == whole.text + stop
    assert kept.logprobs is not None and kept.logprobs.tokens == lp.tokens
    assert kept.logprobs.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
