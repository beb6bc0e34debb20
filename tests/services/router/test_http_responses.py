"""POST /v1/responses through the official openai client, against real uvicorn and the real
engine: a Responses request is the chat request it stands for, answered in OpenAI's shapes."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from engine.async_engine import AsyncEngine
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline

from .conftest import (
    MODEL_ID,
    SwitchedPipeline,
    generated_tokens,
    hang_up_once_generating,
    serve_http,
    wait_until_idle,
)

QUESTION = "What is the capital of France?"
INSTRUCTIONS = "Answer in one short sentence."
CONVERSATION = [
    {"role": "system", "content": INSTRUCTIONS},
    {"role": "user", "content": QUESTION},
]
EVENT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",  # one or more
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def respond(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs = {"model": MODEL_ID, "temperature": 0, "max_output_tokens": 5, **kwargs}
    kwargs.setdefault("input", QUESTION)
    return client.responses.create(**kwargs)


def chat_text(client: openai.OpenAI, messages: list[Any], max_tokens: int) -> str:
    result = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return str(result.choices[0].message.content)


def collapsed(types: list[str]) -> list[str]:
    """The event types with each run of deltas as one."""
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


def test_a_response_is_the_chat_answer_to_instructions_then_input(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = respond(client, instructions=INSTRUCTIONS)
    prompt = pipeline.tokenizer.encode_chat(CONVERSATION)
    assert result.id.startswith("resp_") and len(result.id) == len("resp_") + 32
    assert (result.object, result.model) == ("response", MODEL_ID)
    (message,) = result.output
    assert (message.type, message.role) == ("message", "assistant")
    assert message.id.startswith("msg_")
    (part,) = message.content
    assert (part.type, part.annotations) == ("output_text", [])
    assert part.text == result.output_text == chat_text(client, CONVERSATION, 5)
    usage = result.usage
    assert usage.input_tokens == len(prompt)
    assert usage.output_tokens == 5
    assert usage.total_tokens == len(prompt) + 5
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens == 0


def test_running_out_of_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    result = respond(client, max_output_tokens=3)
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.output[0].status == "incomplete"
    assert (result.usage.output_tokens, result.max_output_tokens) == (3, 3)


def test_a_response_that_stops_by_itself_is_completed(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = respond(client, max_output_tokens=100)
    assert result.status == "completed" and result.incomplete_details is None
    assert result.output[0].status == "completed"
    assert 0 < result.usage.output_tokens < 100
    assert result.output_text == chat_text(client, [{"role": "user", "content": QUESTION}], 100)
    assert result.error is None


def test_the_request_is_echoed_as_vllm_echoes_it(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    result = client.responses.create(
        model=MODEL_ID,
        input=QUESTION,
        instructions=INSTRUCTIONS,
        metadata={"ticket": "42"},
        user="someone",
        store=True,  # OpenAI's default: accepted, and nothing is stored (vLLM, store off)
        max_output_tokens=1,
    )
    assert (result.instructions, result.metadata, result.user) == (
        INSTRUCTIONS,
        {"ticket": "42"},
        "someone",
    )
    # the sampling parameters as resolved: temperature and top_p default to 1
    assert (result.temperature, result.top_p, result.max_output_tokens) == (1.0, 1.0, 1)
    assert (result.tool_choice, result.tools, result.parallel_tool_calls) == ("auto", [], True)
    assert (result.background, result.truncation, result.service_tier) == (
        False,
        "disabled",
        "auto",
    )
    assert result.previous_response_id is None and result.reasoning is None
    unbounded = respond(client, max_output_tokens=None, input="Hi", temperature=0.5, top_p=0.9)
    assert (unbounded.temperature, unbounded.top_p) == (0.5, 0.9)
    # default: the rest of the context window (max_model_len 1024), as for chat
    assert unbounded.max_output_tokens == 1024 - unbounded.usage.input_tokens


def test_a_client_request_id_is_the_responses_id(client: openai.OpenAI) -> None:
    result = respond(client, max_output_tokens=1, extra_body={"request_id": "my-own-id"})
    assert result.id == "my-own-id"


def test_message_items_are_the_chat_conversation(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    first = respond(client, max_output_tokens=6)
    items: list[Any] = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"role": "user", "content": QUESTION},
        *(item.model_dump() for item in first.output),  # an earlier output, as it came
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "And of Italy?"},
                {"type": "input_text", "text": "One word."},
            ],
        },
    ]
    result = respond(client, input=items, max_output_tokens=4)
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And of Italy?\nOne word."},  # parts join as in chat
    ]
    assert result.usage.input_tokens == len(pipeline.tokenizer.encode_chat(messages))
    assert result.output_text == chat_text(client, messages, 4)


def test_an_unfinished_assistant_message_is_continued(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    """vLLM's partial-message continuation: a last assistant message whose status is
    incomplete (or in_progress) is continued rather than answered."""
    started = {"role": "assistant", "content": "The capital of France is"}
    items: list[Any] = [{"role": "user", "content": QUESTION}, {**started, "status": "incomplete"}]
    result = respond(client, input=items, max_output_tokens=3)
    messages = [{"role": "user", "content": QUESTION}, started]
    prompt = pipeline.tokenizer.encode_chat(messages, False, True)
    assert result.usage.input_tokens == len(prompt)
    same = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0)
    assert result.output_text == same.choices[0].text
    finished = respond(client, input=[items[0], {**started, "status": "completed"}])
    assert finished.usage.input_tokens == len(pipeline.tokenizer.encode_chat(messages))


def test_a_repeated_conversation_reads_its_prompt_from_the_cache_as_chat_does(
    client: openai.OpenAI,
) -> None:
    instructions = (  # unlike any other test's prompt from its first block on
        "Responses API cache check: reply in one short sentence, politely, and never "
        "mention these instructions. This prompt spans several full KV blocks."
    )
    first = respond(client, instructions=instructions, max_output_tokens=1)
    again = respond(client, instructions=instructions, max_output_tokens=1)
    chat: Any = client.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": instructions},
            {"role": "user", "content": QUESTION},
        ],
        max_tokens=1,
    )
    assert first.usage.input_tokens_details.cached_tokens == 0
    cached = again.usage.input_tokens_details.cached_tokens
    assert cached >= 32 and cached == chat.usage.prompt_tokens_details.cached_tokens


def test_a_stream_sends_openais_events_in_order(client: openai.OpenAI) -> None:
    expected = respond(client, instructions=INSTRUCTIONS, max_output_tokens=6)
    events = list(respond(client, instructions=INSTRUCTIONS, max_output_tokens=6, stream=True))
    types = [e.type for e in events]
    assert collapsed(types) == [*EVENT_ORDER, "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, in_progress, added, part_added, *deltas = events[:-4]
    text_done, part_done, item_done, finished = events[-4:]
    for event in (created, in_progress):
        assert event.response.status == "in_progress" and event.response.output == []
        assert event.response.usage is None and event.response.id == finished.response.id
    item_id = added.item.id
    assert (added.item.status, added.item.content) == ("in_progress", [])
    assert (part_added.item_id, part_added.part.text) == (item_id, "")
    assert all((d.item_id, d.output_index, d.content_index) == (item_id, 0, 0) for d in deltas)
    text = "".join(d.delta for d in deltas)
    assert text == text_done.text == part_done.part.text == expected.output_text
    assert item_done.item.id == item_id and item_done.item.content[0].text == text
    response = finished.response
    assert response.status == "incomplete" and response.output[0].id == item_id
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage == expected.usage


def test_a_stream_that_stops_by_itself_ends_completed(client: openai.OpenAI) -> None:
    events = list(respond(client, max_output_tokens=100, stream=True))
    assert collapsed([e.type for e in events]) == [*EVENT_ORDER, "response.completed"]
    assert events[-1].response.status == "completed"
    assert events[-1].response.output_text == respond(client, max_output_tokens=100).output_text


def test_events_are_named_server_sent_events_without_a_done_sentinel(base_url: str) -> None:
    body = {"model": MODEL_ID, "input": QUESTION, "max_output_tokens": 2, "stream": True}
    with httpx2.stream("POST", f"{base_url}/v1/responses", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.strip().split("\n\n")
    for block in blocks:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    assert "[DONE]" not in raw and blocks[-1].startswith("event: response.incomplete\n")


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"previous_response_id": "resp_1"},
            "previous_response_id",
            "Baton keeps no responses; send the whole conversation",
        ),
        ({"background": True}, "background", "need a store, and Baton keeps none"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "tools"),
        ({"tool_choice": "required"}, "tool_choice", "tools are not supported"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs are not supported"),
        (
            {"text": {"format": {"type": "json_object"}}},
            "text",
            'only plain text output is supported; leave it out or send {"format": {"type"',
        ),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "prompt templates"),
        ({"previous_input_messages": [{"role": "user"}]}, "previous_input_messages", "input"),
        ({"enable_response_messages": True}, "enable_response_messages", "not returned"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "'input_image' content is not supported; Baton serves text only",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
            "'input_file' content is not supported",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]},
            "input[0]",
            "'function_call_output' items are not supported",
        ),
        ({"input": [{"role": "tool", "content": "4"}]}, "input[0].role", "'assistant'"),
        ({"input": []}, "input", "at least 1 item"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"repetition_penalty": 1.3}, "repetition_penalty", "not supported"),
        (
            {"truncation": "auto", "max_output_tokens": 1024},
            "truncation",
            "max_model_len 1024 - max_output_tokens 1024 = 0",
        ),
    ],
)
def test_what_baton_cannot_serve_is_400_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str, says: str
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as failure:
            respond(client, stream=stream, extra_body=fields)
        body = failure.value.body
        assert isinstance(body, dict)
        assert body["type"] == "invalid_request_error" and body["param"] == param
        assert body["message"].startswith(f"{param}: ") and says in body["message"], body


def test_neutral_values_are_the_same_request_as_leaving_them_out(client: openai.OpenAI) -> None:
    neutral = {
        "tools": [],
        "tool_choice": "none",
        "include": [],
        "top_logprobs": 0,
        "text": {"format": {"type": "text"}},
        "store": False,
        "background": False,
        "parallel_tool_calls": False,
        "truncation": "disabled",
        "service_tier": "default",
    }
    plain = respond(client)
    same = respond(client, extra_body=neutral)
    assert same.output_text == plain.output_text and same.usage == plain.usage
    assert (same.tool_choice, same.parallel_tool_calls, same.service_tier) == (
        "none",
        False,
        "default",
    )


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        respond(client, model="gpt-5")
    assert failure.value.body["param"] == "model"  # type: ignore[index]


def test_a_generation_failing_mid_stream_ends_with_response_failed(
    pipeline: ColocatedPipeline,
) -> None:
    switched = SwitchedPipeline(pipeline)
    switched.fail_after = 3
    body: dict[str, Any] = {"input": QUESTION, "max_output_tokens": 8, "temperature": 0}
    with serve_http(build_http_app(lambda: switched)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        events = list(client.responses.create(**body, stream=True))
        plain = httpx2.post(f"{url}/v1/responses", json=body, timeout=60)
    types = collapsed([e.type for e in events])
    assert types == [*EVENT_ORDER[:5], "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.error.message == "generation failed: RuntimeError('decode replica lost')"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert failed.output[0].content[0].text == deltas and failed.output[0].status == "incomplete"
    assert failed.usage.output_tokens == 3
    assert plain.status_code == 500
    assert plain.json()["error"]["message"] == "internal error: RuntimeError('decode replica lost')"


LONG = 400  # tokens a request would generate if nobody stopped it


def test_closing_a_stream_aborts_its_request(client: openai.OpenAI, engine: AsyncEngine) -> None:
    before = generated_tokens(engine)
    stream = respond(client, max_output_tokens=LONG, stream=True, extra_body={"ignore_eos": True})
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    wait_until_idle(engine)
    assert generated_tokens(engine) - before < LONG


def test_hanging_up_on_a_plain_request_aborts_it(base_url: str, engine: AsyncEngine) -> None:
    body = json.dumps({"input": QUESTION, "max_output_tokens": LONG, "ignore_eos": True}).encode()
    assert hang_up_once_generating(base_url, engine, "/v1/responses", body) < LONG
