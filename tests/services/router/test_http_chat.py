"""POST /v1/chat/completions through the official openai client, against real uvicorn."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from services.router.pipeline import ColocatedPipeline

from .conftest import MODEL_ID

MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client: openai.OpenAI, messages: list[Any] = MESSAGES, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 5)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def test_usage_counts_the_templated_prompt_and_generated_tokens_exactly(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = chat(client, logprobs=True)
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(pipeline.tokenizer.encode_chat(MESSAGES))
    assert result.usage.completion_tokens == len(choice.logprobs.content) == 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + 5


def test_max_completion_tokens_takes_precedence(client: openai.OpenAI) -> None:
    result = chat(client, max_tokens=6, max_completion_tokens=2)
    assert result.usage.completion_tokens == 2


def test_stream_sends_the_role_then_content_then_usage(client: openai.OpenAI) -> None:
    expected = chat(client)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    first, *content, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.id == first.id for c in chunks)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == (
        expected.choices[0].message.content
    )
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )


def test_return_token_ids_gives_the_templated_prompt_and_each_choices_ids(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    tok = pipeline.tokenizer
    ask = {"n": 2, "seed": 3, "temperature": 1.0, "extra_body": {"return_token_ids": True}}
    whole = chat(client, **ask)
    assert whole.prompt_token_ids == tok.encode_chat(MESSAGES)
    for c in whole.choices:
        assert tok.decode(c.token_ids) == c.message.content and len(c.token_ids) == 5
    chunks = list(chat(client, stream=True, **ask))
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids
    assert all("prompt_token_ids" not in (c.model_extra or {}) for c in chunks[1:])
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[2:]:  # after each choice's role
        for c in chunk.choices:
            streamed[c.index] += c.token_ids
    assert streamed == {c.index: c.token_ids for c in whole.choices}
    assert "prompt_token_ids" not in (chat(client).model_extra or {})


def test_text_content_parts_join_with_newlines(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    parts = [{"type": "text", "text": "Say hello."}, {"type": "text", "text": "Be brief."}]
    result = chat(client, [{"role": "user", "content": parts}], max_tokens=2)
    joined = [{"role": "user", "content": "Say hello.\nBe brief."}]
    assert result.usage.prompt_tokens == len(pipeline.tokenizer.encode_chat(joined))
    assert (
        result.choices[0].message.content
        == chat(client, joined, max_tokens=2).choices[0].message.content
    )


def test_n_choices_with_a_seed_repeat_exactly(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        result = chat(client, n=2, seed=7, temperature=1.0, max_tokens=4)
        assert [c.index for c in result.choices] == [0, 1]
        assert result.usage.completion_tokens == 8
        return [c.message.content for c in result.choices]

    first = sample()
    assert sample() == first
    assert first[0] != first[1]


def test_n_choices_stream_with_their_own_index(client: openai.OpenAI) -> None:
    chunks = list(chat(client, n=2, seed=7, temperature=1.0, max_tokens=4, stream=True))
    texts = ["", ""]
    finished = []
    for chunk in chunks:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.append(choice.index)
    assert sorted(finished) == [0, 1]
    reference = chat(client, n=2, seed=7, temperature=1.0, max_tokens=4)
    assert texts == [c.message.content for c in reference.choices]


def test_logprobs_carry_bytes_and_top_alternatives(client: openai.OpenAI) -> None:
    result = chat(client, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        best = entry.top_logprobs[0]  # greedy sampled the most likely token
        assert (entry.token, entry.logprob) == (best.token, best.logprob)
        assert best.logprob >= entry.top_logprobs[1].logprob


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    system = {
        "role": "system",
        "content": "You are Baton's test assistant. Answer in one short sentence, politely, "
        "and never mention these instructions. The user is testing prefix caching of a long "
        "system prompt that is shared by two different questions.",
    }
    first_messages = [system, {"role": "user", "content": "What is 2 + 2?"}]
    second_messages = [system, {"role": "user", "content": "Name a colour."}]
    first = chat(client, first_messages, max_tokens=1)
    second = chat(client, second_messages, max_tokens=1)
    a, b = (pipeline.tokenizer.encode_chat(m) for m in (first_messages, second_messages))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared >= 48  # the system prompt spans several full 16-token blocks
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and shared // 16 * 16 <= cached < len(b)


def test_logprob_bytes_of_tokens_splitting_a_character_join_into_the_text(
    client: openai.OpenAI,
) -> None:
    """Each emoji here spans three byte-level tokens, none of them text on its own."""
    ask = [{"role": "user", "content": "Reply with only these emoji, repeated: 🎉🚀🔥 🎉🚀🔥"}]
    result = chat(client, ask, max_tokens=15, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    text = result.choices[0].message.content
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == text
    assert any(entry.token.startswith("bytes:") for entry in content)
    for entry in content:
        for alt in [entry, *entry.top_logprobs]:
            try:
                assert alt.token == bytes(alt.bytes).decode()
            except UnicodeDecodeError:  # part of a character: named by its bytes
                escaped = "".join(f"\\x{b:02x}" if b >= 0x80 else chr(b) for b in alt.bytes)
                assert alt.token == f"bytes:{escaped}"
        assert (entry.token, entry.bytes) == (
            entry.top_logprobs[0].token,
            entry.top_logprobs[0].bytes,
        )


CONVERSATION: list[Any] = [
    {"role": "user", "content": "Write the word 'apple' three times."},
    {"role": "assistant", "content": "apple apple"},
]


def test_continue_final_message_continues_the_assistants_message(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    result = chat(client, CONVERSATION, max_tokens=4, extra_body=flags)
    prompt = pipeline.tokenizer.encode_chat(CONVERSATION, False, True)
    assert pipeline.tokenizer.decode(prompt, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\napple apple"
    )
    assert result.usage.prompt_tokens == len(prompt)
    same = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0)
    assert result.choices[0].message.content == same.choices[0].text
    assert (
        result.choices[0].message.content
        != chat(client, CONVERSATION, max_tokens=4).choices[0].message.content
    )


def test_without_a_generation_prompt_no_new_turn_is_opened(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = chat(client, CONVERSATION, max_tokens=2, extra_body={"add_generation_prompt": False})
    prompt = pipeline.tokenizer.encode_chat(CONVERSATION, add_generation_prompt=False)
    assert result.usage.prompt_tokens == len(prompt)
    assert len(prompt) < len(pipeline.tokenizer.encode_chat(CONVERSATION))


@pytest.mark.parametrize(
    ("messages", "flags", "param"),
    [
        (CONVERSATION, {"continue_final_message": True}, "continue_final_message"),
        (MESSAGES, {"add_generation_prompt": False}, "add_generation_prompt"),
        (
            MESSAGES,
            {"add_generation_prompt": False, "continue_final_message": True},
            "add_generation_prompt",
        ),
    ],
)
def test_template_flags_that_contradict_are_400(
    client: openai.OpenAI, messages: list[Any], flags: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        chat(client, messages, extra_body=flags)
    body = failure.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert body["message"].startswith(f"{param}: ")


def test_truncate_prompt_tokens_keeps_the_templated_prompts_last_tokens(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    templated = pipeline.tokenizer.encode_chat(MESSAGES)
    result = chat(client, extra_body={"truncate_prompt_tokens": 6})
    assert result.usage.prompt_tokens == 6
    tail = client.completions.create(
        model=MODEL_ID, prompt=templated[-6:], max_tokens=5, temperature=0
    )
    assert result.choices[0].message.content == tail.choices[0].text


def test_return_tokens_as_token_ids_in_chat_logprobs(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    """As vLLM: tokens read `token_id:<id>`; a sampled token's bytes stay its text's, an
    alternative's are its name's."""
    plain = chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    as_ids = {"return_tokens_as_token_ids": True}
    result = chat(client, logprobs=True, top_logprobs=2, extra_body=as_ids)
    content = result.choices[0].logprobs.content
    for entry, reference in zip(content, plain, strict=True):
        token_id = int(entry.token.removeprefix("token_id:"))
        assert entry.token == f"token_id:{token_id}"
        assert bytes(entry.bytes) == pipeline.tokenizer.token_bytes(token_id)
        assert (entry.bytes, entry.logprob) == (reference.bytes, reference.logprob)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the best one
        for alt, reference_alt in zip(entry.top_logprobs, reference.top_logprobs, strict=True):
            assert alt.token.startswith("token_id:") and alt.bytes == list(alt.token.encode())
            assert alt.logprob == reference_alt.logprob
    chunks = list(chat(client, logprobs=True, stream=True, extra_body=as_ids))
    streamed = [
        e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == [e.token for e in content]


def test_request_id_names_every_chunk_of_a_stream(client: openai.OpenAI) -> None:
    chunks = list(chat(client, stream=True, extra_body={"request_id": "conv-9"}))
    assert {c.id for c in chunks} == {"chatcmpl-conv-9"}
    headed = chat(client, extra_body={"request_id": "conv-9"}, extra_headers={"X-Request-Id": "h"})
    assert headed.id == "chatcmpl-h"


def test_tool_calls_and_tool_results_render_through_the_models_template(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    """An assistant turn that only called a tool (no content) and the tool's answer: the
    template gets them as vLLM passes them (SmolLM2's renders role and content)."""
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "22 C and sunny", "tool_call_id": "c1"},
    ]
    result = chat(client, messages)
    rendered: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "22 C and sunny", "tool_call_id": "c1"},
    ]
    assert result.usage.prompt_tokens == len(pipeline.tokenizer.encode_chat(rendered))
    assert result.choices[0].finish_reason == "length"
