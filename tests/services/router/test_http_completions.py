"""POST /v1/completions through the official openai client, against real uvicorn."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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


def test_return_token_ids_gives_each_choice_its_prompts_ids_and_its_own(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    """vLLM's `return_token_ids`, as RL trainers read it: a stop string cuts the text, not
    the ids (every generated token, as usage counts them); a stream carries the same ids,
    the prompt's once per choice."""
    tok = pipeline.tokenizer
    prompts = [PROMPT, "One, two, three,"]
    plain = greedy(client, max_tokens=8).choices[0]
    assert "token_ids" not in (plain.model_extra or {})  # only when asked for
    stop = plain.text.split()[2]
    ask = {
        "model": MODEL_ID, "prompt": prompts, "n": 2, "stop": stop, "max_tokens": 8,
        "temperature": 0, "extra_body": {"return_token_ids": True},
    }  # fmt: skip
    whole = client.completions.create(**ask)
    assert whole.usage is not None
    assert sum(len(c.token_ids) for c in whole.choices) == whole.usage.completion_tokens
    for c in whole.choices:
        assert c.prompt_token_ids == tok.encode(prompts[c.index // 2])
        assert tok.decode(c.token_ids).startswith(c.text) and c.token_ids
    first = whole.choices[0]
    assert first.finish_reason == "stop" and stop in tok.decode(first.token_ids)
    streamed: dict[int, list[int]] = {}
    prompt_ids: dict[int, list[Any]] = {}
    for chunk in client.completions.create(stream=True, **ask):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
            if c.model_extra.get("prompt_token_ids") is not None:
                prompt_ids.setdefault(c.index, []).append(c.prompt_token_ids)
    assert streamed == {c.index: c.token_ids for c in whole.choices}
    assert prompt_ids == {c.index: [c.prompt_token_ids] for c in whole.choices}


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


def test_truncate_prompt_tokens_answers_the_prompts_last_tokens(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    ids = pipeline.tokenizer.encode(PROMPT)
    assert len(ids) > 3
    truncated = greedy(client, extra_body={"truncate_prompt_tokens": 3})
    assert truncated.usage is not None and truncated.usage.prompt_tokens == 3
    tail = client.completions.create(model=MODEL_ID, prompt=ids[-3:], max_tokens=6, temperature=0)
    assert truncated.choices[0].text == tail.choices[0].text
    chunks = list(
        greedy(
            client,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"truncate_prompt_tokens": 3},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3


def test_return_tokens_as_token_ids_names_each_logprob_token_by_its_id(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    """vLLM's `token_id:<id>`, for the sampled tokens and the top alternatives' keys; the
    logprobs and the offsets (in the text) are those of the plain answer."""
    plain = greedy(client, logprobs=2).choices[0].logprobs
    as_ids = {"return_tokens_as_token_ids": True}
    choice = greedy(client, logprobs=2, extra_body=as_ids).choices[0]
    lp = choice.logprobs
    assert plain is not None and lp is not None and lp.tokens and lp.top_logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens)
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert pipeline.tokenizer.decode(ids) == choice.text
    assert (lp.token_logprobs, lp.text_offset) == (plain.token_logprobs, plain.text_offset)
    assert plain.top_logprobs is not None
    for token, top, plain_top in zip(lp.tokens, lp.top_logprobs, plain.top_logprobs, strict=True):
        assert token in top and all(key.startswith("token_id:") for key in top)
        assert sorted(top.values()) == sorted(plain_top.values())
    chunks = list(greedy(client, logprobs=2, stream=True, extra_body=as_ids))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens or []] == lp.tokens


def test_request_id_from_the_body_or_a_header_names_the_answer(base_url: str) -> None:
    """vLLM's: `cmpl-` and the X-Request-Id header, else the body's request_id."""
    url = f"{base_url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 2, "request_id": "job-1"}
    assert httpx2.post(url, json=body, timeout=60).json()["id"] == "cmpl-job-1"
    headers = {"X-Request-Id": "trace-2"}
    assert httpx2.post(url, json=body, headers=headers, timeout=60).json()["id"] == "cmpl-trace-2"
    del body["request_id"]
    assert httpx2.post(url, json=body, headers=headers, timeout=60).json()["id"] == "cmpl-trace-2"


def test_requests_sharing_a_request_id_run_apart(client: openai.OpenAI) -> None:
    """A client's id is its answer's, never the engine's: concurrent requests under one
    id each get their own whole answer (and the engine is left idle, as always)."""

    def run(_: int) -> Any:
        extra = {"request_id": "dup", "ignore_eos": True}
        return greedy(client, max_tokens=24, extra_body=extra)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    assert {r.id for r in results} == {"cmpl-dup"}
    assert [r.usage.completion_tokens for r in results] == [24] * 3
    assert len({r.choices[0].text for r in results}) == 1
