"""From OpenAI request to token ids and per-choice SamplingParams, without generating."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from engine.sampling_params import SamplingParams
from services.router.errors import InvalidRequestError, ModelNotFoundError
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
)
from services.router.pipeline import ColocatedPipeline
from services.router.request_plan import plan_chat, plan_completion

from .conftest import MODEL_ID


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Hi", ["Hi"]),
        (["Hi", "Yo"], ["Hi", "Yo"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_every_prompt_form_is_a_batch(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest(prompt=prompt).prompts == expected


def test_choices_are_prompt_major_with_seed_plus_index(pipeline: ColocatedPipeline) -> None:
    request = CompletionRequest(prompt=["Hi", "Yo"], n=3, seed=2**63 - 2, top_k=-1, stop="\n")
    plan = plan_completion(request, pipeline, "cmpl-x")
    assert plan.prompts == [pipeline.tokenizer.encode("Hi"), pipeline.tokenizer.encode("Yo")]
    assert [p.seed for p in plan.params] == [2**63 - 2, 2**63 - 1, 0] * 2
    assert plan.params[0] == SamplingParams(max_tokens=16, seed=2**63 - 2, stop=("\n",))
    requests = plan.generation_requests()
    assert plan.request_id == "cmpl-x" and plan.run_id.startswith("cmpl-x.")
    assert [r.request_id for r in requests] == [f"{plan.run_id}-{i}" for i in range(6)]
    again = plan_completion(request, pipeline, "cmpl-x")  # a client's id is not unique
    assert again.request_id == "cmpl-x" and again.run_id != plan.run_id
    own = plan_completion(request, pipeline)
    assert own.run_id == own.request_id and own.request_id.startswith("cmpl-")
    assert [r.prompt_token_ids for r in requests] == [plan.prompts[0]] * 3 + [plan.prompts[1]] * 3


def test_chat_defaults_to_the_rest_of_the_context_window(pipeline: ColocatedPipeline) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    plan = plan_chat(ChatCompletionRequest(messages=messages), pipeline)
    assert plan.request_id.startswith("chatcmpl-") and plan.model == MODEL_ID
    assert plan.prompts == [pipeline.tokenizer.encode_chat(messages)]
    assert plan.params[0].max_tokens == 1024 - len(plan.prompts[0])
    assert plan.params[0].logprobs is None


@pytest.mark.parametrize(
    ("fields", "max_tokens", "logprobs"),
    [
        ({"max_tokens": 9, "max_completion_tokens": 4}, 4, None),
        ({"max_tokens": 9, "logprobs": True}, 9, 0),
        ({"max_tokens": 9, "logprobs": True, "top_logprobs": 5}, 9, 5),
    ],
)
def test_chat_token_and_logprob_fields(
    pipeline: ColocatedPipeline, fields: dict[str, Any], max_tokens: int, logprobs: int | None
) -> None:
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], **fields)
    (params,) = plan_chat(request, pipeline).params
    assert (params.max_tokens, params.logprobs) == (max_tokens, logprobs)


def test_other_models_and_too_many_choices_are_refused(pipeline: ColocatedPipeline) -> None:
    with pytest.raises(ModelNotFoundError):
        plan_completion(CompletionRequest(prompt="Hi", model="other"), pipeline)
    with pytest.raises(InvalidRequestError, match=r"^n: 2 prompts x n=100 is 200 choices") as e:
        plan_completion(CompletionRequest(prompt=["a", "b"], n=100), pipeline)
    assert e.value.param == "n"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, "stop"),
    ],
)
def test_validation_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    error = invalid_request(raised.value.errors())
    assert error.param == param and error.message.startswith(f"{param}: ")


def test_unknown_fields_are_ignored() -> None:
    request = CompletionRequest.model_validate({"prompt": "Hi", "frobnicate": True})
    assert "frobnicate" not in request.model_dump()


def test_generated_inference_stubs_import_package_relative() -> None:
    from proto.baton.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == "baton.v1.Inference"
    assert inference_pb2_grpc.InferenceStub.__module__ == "proto.baton.v1.inference_pb2_grpc"
