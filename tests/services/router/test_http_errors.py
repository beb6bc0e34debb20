"""Errors in OpenAI's shape with the right status, and the non-generating endpoints."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx2
import openai
import pytest

from engine.tokenizer import ChatTemplate
from services.router.api_keys import ApiKeys
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline

from .conftest import MODEL_ID, SwitchedPipeline, serve_http


def error_of(failure: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error response (the client unwraps it)."""
    body = failure.value.body
    assert isinstance(body, dict)
    return body


def bad_request(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    kwargs = {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as failure:
        client.completions.create(**kwargs)
    assert failure.value.status_code == 400
    body = error_of(failure)
    assert body["type"] == "invalid_request_error"
    return body


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"n": 129}, "n", "less than or equal to 128"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"stop": [""]}, "stop[0]", "at least 1 character"),
        ({"prompt": [5, -1]}, "prompt[1]", "greater than or equal to 0"),
        ({"extra_body": {"min_tokens": 3}}, "min_tokens", "exceeds max_tokens (2)"),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"echo": True}, "echo", "not supported"),
        ({"extra_body": {"truncate_prompt_tokens": 0}}, "truncate_prompt_tokens", "at least 1"),
        (
            {"extra_body": {"truncate_prompt_tokens": 1023}},
            "truncate_prompt_tokens",
            "than the context window leaves: max_model_len 1024 - max_tokens 2 = 1022",
        ),
        ({"extra_body": {"request_id": "r" * 257}}, "request_id", "257 characters; at most 256"),
        ({"extra_body": {"request_id": "a\nb"}}, "request_id", "without control characters"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str, says: str
) -> None:
    body = bad_request(client, **fields)
    assert body["param"] == param
    assert body["message"].startswith(f"{param}: ") and says in body["message"]


COMPLETION = {"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 4}
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# vLLM's and OpenAI's fields that change the output and that Baton does not implement
OUTPUT_CHANGING = [
    (COMPLETION, {"min_p": 0.5}, "min_p"),
    (COMPLETION, {"repetition_penalty": 1.3}, "repetition_penalty"),
    (COMPLETION, {"allowed_token_ids": [30]}, "allowed_token_ids"),
    (COMPLETION, {"bad_words": ["Paris"]}, "bad_words"),
    (COMPLETION, {"skip_special_tokens": False}, "skip_special_tokens"),
    (COMPLETION, {"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    (COMPLETION, {"truncate_prompt_tokens": 2, "truncation_side": "right"}, "truncation_side"),
    (COMPLETION, {"prompt_logprobs": 1}, "prompt_logprobs"),
    (COMPLETION, {"use_beam_search": True}, "use_beam_search"),
    (COMPLETION, {"length_penalty": 0.5}, "length_penalty"),
    (COMPLETION, {"guided_choice": ["yes", "no"]}, "guided_choice"),
    (COMPLETION, {"response_format": {"type": "json_object"}}, "response_format"),
    (COMPLETION, {"logits_processors": ["my.Processor"]}, "logits_processors"),
    (COMPLETION, {"add_special_tokens": False}, "add_special_tokens"),
    (COMPLETION, {"frequency_penalty": 0.5}, "frequency_penalty"),
    (COMPLETION, {"logit_bias": {"7042": -100}}, "logit_bias"),
    (COMPLETION, {"suffix": "."}, "suffix"),
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"min_p": 0.5}, "min_p"),
    (CHAT, {"guided_json": {"type": "object"}}, "guided_json"),
    (CHAT, {"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    (CHAT, {"chat_template": "{{ messages }}"}, "chat_template"),
    (CHAT, {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    (CHAT, {"add_special_tokens": True}, "add_special_tokens"),
    (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}}, None),
]


@pytest.mark.parametrize(("request_body", "field", "param"), OUTPUT_CHANGING)
def test_fields_that_would_change_the_output_are_refused_unless_neutral(
    base_url: str, request_body: dict[str, Any], field: dict[str, Any], param: str | None
) -> None:
    path = "/v1/completions" if "prompt" in request_body else "/v1/chat/completions"
    param = param or "stream_options.continuous_usage_stats"
    response = httpx2.post(f"{base_url}{path}", json=request_body | field, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["message"].startswith(f"{param}: not supported by Baton; leave it out or send ")


NEUTRAL: dict[str, Any] = {
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "use_beam_search": False,
    "allowed_token_ids": None,
    "bad_words": [],
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None,
    "truncation_side": "left",
    "return_tokens_as_token_ids": False,
    "prompt_logprobs": None,
    "logits_processors": None,
    "guided_json": None,
    "priority": 0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "echo": False,
    "response_format": {"type": "text"},
    # fields that change nothing in the answer
    "user": "u-1",
    "metadata": {"team": "a"},
    "store": False,
    "service_tier": "auto",
    "parallel_tool_calls": True,
}


def test_neutral_values_are_the_same_request_as_leaving_them_out(base_url: str) -> None:
    for request_body, neutral in [
        (COMPLETION, NEUTRAL | {"add_special_tokens": True}),
        (CHAT, NEUTRAL | {"add_special_tokens": False, "add_generation_prompt": True}),
    ]:
        path = "/v1/completions" if "prompt" in request_body else "/v1/chat/completions"
        plain = request_body | {"temperature": 0}
        answers = [
            httpx2.post(f"{base_url}{path}", json=body, timeout=60)
            for body in (plain, plain | neutral)
        ]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        first, second = (a.json()["choices"][0] for a in answers)
        assert first == second


def test_an_x_request_id_header_is_checked_as_the_body_field_is(base_url: str) -> None:
    response = httpx2.post(
        f"{base_url}/v1/completions", json=COMPLETION, headers={"X-Request-Id": "h" * 257}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "X-Request-Id header: 257 characters; at most 256"
    )


def test_a_template_failing_on_a_message_is_400_not_500(pipeline: ColocatedPipeline) -> None:
    """transformers passes whole messages to the template, which may not expect what one
    holds: here it adds tool_calls (a list) to text, a TypeError inside the template."""
    tokenizer = copy.copy(pipeline.tokenizer)
    tokenizer.chat_template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] + (m['tool_calls'] or '') }}{% endfor %}", None, None
    )
    picky = SwitchedPipeline(pipeline)
    picky.tokenizer = tokenizer
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    with serve_http(build_http_app(lambda: picky)) as url:
        body = {"messages": messages[:1], "max_tokens": 1}
        assert httpx2.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        body["messages"] = messages
        response = httpx2.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert error["message"].startswith(
        "chat template cannot render the conversation: TypeError: can only concatenate str"
    )


def test_chat_content_must_be_text(client: openai.OpenAI) -> None:
    image: Any = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(openai.BadRequestError) as failure:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": [image]}], max_tokens=2
        )
    assert error_of(failure) == {
        "message": "messages[0].content[0]: only text content parts are supported, not 'image_url'",
        "type": "invalid_request_error",
        "param": "messages[0].content[0]",
        "code": None,
    }


def test_a_prompt_over_the_context_window_is_400_with_the_engines_message(
    client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    prompt = "hello " * 1030
    body = bad_request(client, prompt=prompt, max_tokens=4)
    n = len(pipeline.tokenizer.encode(prompt))
    assert body["message"] == (
        f"this model's context window is 1024 tokens, but the request needs {n + 4} ({n} in "
        "the prompt, 4 for max_tokens); shorten the prompt or lower max_tokens"
    )
    with pytest.raises(openai.BadRequestError):  # streaming: still a status, not an event
        client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, stream=True)


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        client.completions.create(model="gpt-9", prompt="Hi", max_tokens=2)
    assert error_of(failure) == {
        "message": f"the model 'gpt-9' does not exist here; this server serves '{MODEL_ID}'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_malformed_json_is_400(base_url: str) -> None:
    response = httpx2.post(
        f"{base_url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("malformed JSON body")


def test_json_sent_as_a_form_is_400_naming_the_content_type(base_url: str) -> None:
    """What `curl -d '{...}'` sends without -H 'Content-Type: application/json'."""
    form = "application/x-www-form-urlencoded"
    response = httpx2.post(
        f"{base_url}/v1/completions",
        content=json.dumps({"prompt": "Hi", "max_tokens": 1}).encode(),
        headers={"content-type": form},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"the body must be JSON sent with Content-Type: application/json, not {form} (curl "
        "-d sends a form: add -H 'Content-Type: application/json')"
    )
    charset = httpx2.post(
        f"{base_url}/v1/completions",
        content=json.dumps({"prompt": "Hi", "max_tokens": 0}).encode(),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert charset.json()["error"]["param"] == "max_tokens"  # parsed as JSON


def test_unknown_routes_answer_in_the_openai_shape(base_url: str) -> None:
    response = httpx2.get(f"{base_url}/v1/embeddings")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("field", "value"), [("temperature", "NaN"), ("top_p", "Infinity")])
def test_a_non_finite_float_is_400_saying_so(base_url: str, field: str, value: str) -> None:
    """Python's JSON reads NaN and Infinity; no bound check would say what is wrong."""
    body = f'{{"model": "{MODEL_ID}", "prompt": "Hi", "max_tokens": 2, "{field}": {value}}}'
    response = httpx2.post(
        f"{base_url}/v1/completions",
        content=body.encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and "finite number" in error["message"]


def test_a_wrong_method_is_405_saying_which_are_allowed(base_url: str) -> None:
    response = httpx2.post(f"{base_url}/v1/models")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_empty_model_name_is_the_served_model(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="", prompt="Hi", max_tokens=2)
    assert completion.model == MODEL_ID


def test_models_lists_the_served_model(client: openai.OpenAI, base_url: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    (card,) = httpx2.get(f"{base_url}/v1/models").json()["data"]
    assert card["max_model_len"] == 1024 and card["owned_by"] == "baton"


def test_a_model_is_retrieved_by_its_id(client: openai.OpenAI, base_url: str) -> None:
    """OpenAI's GET /v1/models/{model}, which answered 404 for the served model too."""
    model = client.models.retrieve(MODEL_ID)
    assert (model.id, model.object, model.owned_by) == (MODEL_ID, "model", "baton")
    with pytest.raises(openai.NotFoundError) as failure:
        client.models.retrieve("org/other-model")
    assert error_of(failure) == {
        "message": f"the model 'org/other-model' does not exist here; this server serves "
        f"'{MODEL_ID}'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_health_and_requests_follow_readiness(pipeline: ColocatedPipeline) -> None:
    switched = SwitchedPipeline(pipeline)
    with serve_http(build_http_app(lambda: switched)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert httpx2.get(f"{url}/health").status_code == 200
        switched.is_ready = False
        health = httpx2.get(f"{url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["type"] == "service_unavailable_error"
        with pytest.raises(openai.InternalServerError) as failure:
            client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
        assert failure.value.status_code == 503


def test_full_queues_are_429_with_retry_after(pipeline: ColocatedPipeline) -> None:
    switched = SwitchedPipeline(pipeline)
    switched.full = True
    with serve_http(build_http_app(lambda: switched)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as failure:
                client.chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], stream=stream
                )
            assert failure.value.response.headers["retry-after"] == "3"
            assert error_of(failure)["code"] == "overloaded"


def test_api_keys_guard_the_v1_routes(pipeline: ColocatedPipeline) -> None:
    app = build_http_app(lambda: pipeline, api_keys=ApiKeys(["sk-right"]))
    with serve_http(app) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as failure:
            wrong.models.list()
        assert error_of(failure)["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-right", max_retries=0)
        assert [m.id for m in right.models.list()] == [MODEL_ID]
        assert httpx2.get(f"{url}/health").status_code == 200  # probes need no key


def test_metrics_serves_the_hooks_text(pipeline: ColocatedPipeline, base_url: str) -> None:
    text = "# TYPE baton_num_requests_running gauge\nbaton_num_requests_running 0\n"

    async def render() -> str:  # the router's page asks its replicas, so the hook awaits
        return text

    with serve_http(build_http_app(lambda: pipeline, metrics=render)) as url:
        response = httpx2.get(f"{url}/metrics")
    assert response.status_code == 200 and response.text == text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert httpx2.get(f"{base_url}/metrics").status_code == 404  # no hook, no route


def test_a_pipeline_failing_mid_stream_ends_the_stream_with_an_error_event(
    pipeline: ColocatedPipeline,
) -> None:
    switched = SwitchedPipeline(pipeline)
    switched.fail_after = 2
    body = {"prompt": "One, two,", "max_tokens": 6, "temperature": 0}
    with serve_http(build_http_app(lambda: switched)) as url:
        with httpx2.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        plain = httpx2.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and all(e.startswith("data: ") for e in events)
    *chunks, error, done = (e.removeprefix("data: ") for e in events)
    assert done == "[DONE]" and len(chunks) <= 2
    assert json.loads(error)["error"] == {
        "message": "generation failed: RuntimeError('decode replica lost')",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert plain.status_code == 500
    assert plain.json()["error"]["message"] == "internal error: RuntimeError('decode replica lost')"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"prompt": [5, 49152]}, "prompt", "prompt: token id 49152 is outside the vocabulary"),
        ({"prompt": [[5], [49153]]}, "prompt", "prompt 1: token id 49153 is outside"),
        ({"prompt": ["Hi", ""]}, "prompt", "prompt 1 is empty"),
        ({"extra_body": {"stop_token_ids": [2**40]}}, "stop_token_ids", "is outside the vocab"),
        ({"extra_body": {"top_k": 2**70}}, "top_k", "less than or equal to 2147483647"),
    ],
)
def test_token_ids_and_top_k_the_engine_cannot_take_are_400_at_the_router(
    client: openai.OpenAI, pipeline: ColocatedPipeline, fields: dict[str, Any], param: str,
    says: str,
) -> None:  # fmt: skip
    """Refused where the request enters, with the field named: behind a pool they came back
    as the remote call's traceback, and a top_k past int64 overflowed inside a step and took
    the whole engine down."""
    assert pipeline.vocab_size == 49152
    body = bad_request(client, **fields)
    assert body["param"] == param
    assert says in body["message"] and "Traceback" not in body["message"]
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=1).choices


def test_a_pools_refusal_reaches_the_client_as_its_own_message(
    pipeline: ColocatedPipeline,
) -> None:
    """Through Ray the pool's ValueError arrives as a RayTaskError, whose text is the whole
    remote traceback (paths, pids, ANSI colours): the client gets the pool's message."""
    switched = SwitchedPipeline(pipeline)
    switched.refusal = "prompt token id 7 is not allowed here"
    with serve_http(build_http_app(lambda: switched)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        body = bad_request(client)
    assert body["message"] == "prompt token id 7 is not allowed here"


def test_every_unsupported_field_is_declared_where_its_check_can_see_it() -> None:
    """The neutral-value check runs only on declared fields (`extra="ignore"` drops the
    rest unread): a name in the table but in no request model would be silently ignored."""
    from services.router.openai_protocol import (
        _NEUTRAL,
        ChatCompletionRequest,
        CompletionRequest,
        StreamOptions,
    )

    models = (CompletionRequest, ChatCompletionRequest, StreamOptions)
    undeclared = [n for n in _NEUTRAL if not any(n in m.model_fields for m in models)]
    assert undeclared == []
