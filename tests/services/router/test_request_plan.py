"""From OpenAI request to token ids and per-choice SamplingParams, without generating."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatTemplate, Tokenizer
from services.router.errors import InvalidRequestError, ModelNotFoundError
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
)
from services.router.pipeline import ColocatedPipeline
from services.router.request_plan import RequestPlan, plan_chat, plan_completion

from .conftest import MODEL_ID

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


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


def test_a_conversation_that_fills_the_context_window_is_refused_naming_it(
    pipeline: ColocatedPipeline,
) -> None:
    """With no max_tokens the reply gets the rest of the window; the message said "1 for
    max_tokens" and "lower max_tokens", which the client never sent."""
    messages = [{"role": "user", "content": "hello " * 1030}]
    n = len(pipeline.tokenizer.encode_chat(messages))
    with pytest.raises(InvalidRequestError) as failure:
        plan_chat(ChatCompletionRequest(messages=messages), pipeline)
    assert str(failure.value) == (
        f"the conversation is {n} tokens, which leaves no room for a reply in this model's "
        "context window of 1024 tokens; shorten the messages"
    )
    assert failure.value.param == "messages"
    fits = [{"role": "user", "content": "hello " * 40}]
    room = 1024 - len(pipeline.tokenizer.encode_chat(fits))
    assert plan_chat(ChatCompletionRequest(messages=fits), pipeline).params[0].max_tokens == room


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


@pytest.mark.parametrize(
    "field",
    ["n", "stream", "stream_options", "min_tokens", "ignore_eos", "include_stop_str_in_output"],
)
def test_null_means_the_default(field: str) -> None:
    """The openai package sends an explicit None as null (`n=kwargs.get("n")`)."""
    for shape, body in ((CompletionRequest, {"prompt": "Hi"}), (ChatCompletionRequest, CHAT)):
        request = shape.model_validate({**body, field: None})
        assert request == shape.model_validate(body)
    chat = ChatCompletionRequest.model_validate({**CHAT, "logprobs": None})
    assert chat.logprobs is False
    options = {"stream": True, "stream_options": {"include_usage": None}}
    assert not ChatCompletionRequest.model_validate({**CHAT, **options}).include_usage
    with pytest.raises(ValidationError):  # a required field is still required
        ChatCompletionRequest.model_validate({"messages": None})


def test_completions_take_max_completion_tokens_and_refuse_chats_top_logprobs(
    pipeline: ColocatedPipeline,
) -> None:
    both = CompletionRequest(prompt="Hi", max_tokens=9, max_completion_tokens=300)
    assert plan_completion(both, pipeline).params[0].max_tokens == 300
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate({"prompt": "Hi", "top_logprobs": 2})
    assert invalid_request(raised.value.errors()).param == "top_logprobs"


def test_a_prompt_that_does_not_fit_is_refused_naming_the_output_field(
    pipeline: ColocatedPipeline,
) -> None:
    prompt = list(range(1, 1001))
    for fields, param in (
        ({"max_tokens": 30}, "max_tokens"),
        ({"max_completion_tokens": 30}, "max_completion_tokens"),
    ):
        with pytest.raises(InvalidRequestError) as failure:
            plan_completion(CompletionRequest(prompt=prompt, **fields), pipeline)
        assert failure.value.param == param
        assert str(failure.value) == (
            "this model's context window is 1024 tokens, but the request needs 1030 (1000 "
            f"in the prompt, 30 for {param}); shorten the prompt or lower {param}"
        )


def test_more_choices_than_the_server_runs_at_once_are_refused(
    pipeline: ColocatedPipeline,
) -> None:
    """A pipeline that runs 4 choices at once would answer 429 to 3 prompts x n=2 for ever."""

    class Bounded(ColocatedPipeline):
        max_choices = 4

    bounded = Bounded(pipeline.engine, MODEL_ID)
    plan_completion(CompletionRequest(prompt=["a", "b"], n=2), bounded)
    with pytest.raises(InvalidRequestError) as failure:
        plan_completion(CompletionRequest(prompt=["a", "b", "c"], n=2), bounded)
    assert failure.value.param == "n"
    assert str(failure.value) == (
        "n: 3 prompts x n=2 is 6 choices; this server runs at most 4 at a time"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "Hi", "stop": 5}, "stop: Input should be a valid string or a valid list"),
        ({"prompt": 5}, "prompt: Input should be a valid string or a valid list"),
        ({"prompt": [1, "a"]}, "prompt[1]: Input should be a valid integer, unable to parse "
         "string as an integer"),
    ],
)  # fmt: skip
def test_a_value_of_no_members_type_names_every_member(body: dict[str, Any], message: str) -> None:
    """`"stop": 5` said only "a valid list", as if a string were not allowed."""
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate(body)
    assert invalid_request(raised.value.errors()).message == message


def test_unknown_fields_are_ignored() -> None:
    request = CompletionRequest.model_validate({"prompt": "Hi", "frobnicate": True})
    assert "frobnicate" not in request.model_dump()


def test_generated_inference_stubs_import_package_relative() -> None:
    from proto.baton.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == "baton.v1.Inference"
    assert inference_pb2_grpc.InferenceStub.__module__ == "proto.baton.v1.inference_pb2_grpc"


TEXT = "The capital of France is Paris, and of Spain Madrid"


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(
    pipeline: ColocatedPipeline,
) -> None:
    ids = pipeline.tokenizer.encode(TEXT)
    request = CompletionRequest(prompt=[TEXT, "Hi"], truncate_prompt_tokens=3)
    assert plan_completion(request, pipeline).prompts == [ids[-3:], pipeline.tokenizer.encode("Hi")]
    by_ids = plan_completion(CompletionRequest(prompt=ids, truncate_prompt_tokens=4), pipeline)
    assert by_ids.prompts == [ids[-4:]]
    # -1: what the context window (1024) leaves beside max_tokens
    long = list(range(100, 1130))
    fitted = plan_completion(
        CompletionRequest(prompt=long, truncate_prompt_tokens=-1, max_tokens=4), pipeline
    )
    assert fitted.prompts == [long[-1020:]]


def test_truncating_a_text_prompt_keeps_the_bos_as_transformers_does(
    pipeline: ColocatedPipeline,
) -> None:
    """vLLM tokenizes a text prompt with transformers' truncation (left side): the BOS the
    tokenizer adds survives and counts; a token-id prompt is cut as it is."""
    import transformers
    from tokenizers import processors

    backend = copy.deepcopy(pipeline.tokenizer.backend)
    with_bos = copy.copy(pipeline)
    with_bos.tokenizer = Tokenizer(backend, bos_token_id=1, eos_token_ids=(2,), add_bos_token=True)
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", truncation_side="left"
    )
    for keep in (1, 2, 5):
        request = CompletionRequest(prompt=TEXT, truncate_prompt_tokens=keep)
        expected = reference(TEXT, truncation=True, max_length=keep).input_ids
        assert plan_completion(request, with_bos).prompts == [expected]
        assert expected[0] == 1 and len(expected) == keep
    ids = with_bos.tokenizer.encode(TEXT)
    request = CompletionRequest(prompt=ids, truncate_prompt_tokens=2)
    assert plan_completion(request, with_bos).prompts == [ids[-2:]]


def test_chat_truncates_the_templated_prompt_before_its_default_max_tokens(
    pipeline: ColocatedPipeline,
) -> None:
    messages = [{"role": "user", "content": TEXT}]
    templated = pipeline.tokenizer.encode_chat(messages)
    plan = plan_chat(ChatCompletionRequest(messages=messages, truncate_prompt_tokens=5), pipeline)
    assert plan.prompts == [templated[-5:]]
    assert plan.params[0].max_tokens == 1024 - 5


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("request_body", "room"),
    [
        ({"prompt": "Hi", "truncate_prompt_tokens": 1009}, "max_tokens 16 = 1008"),
        ({"prompt": "Hi", "max_tokens": 1024, "truncate_prompt_tokens": -1}, "max_tokens 1024 = 0"),
        ({"messages": HI, "truncate_prompt_tokens": 1025}, "max_tokens 0 = 1024"),
        (
            {"messages": HI, "max_completion_tokens": 24, "truncate_prompt_tokens": 1001},
            "max_completion_tokens 24 = 1000",
        ),
    ],
)
def test_truncate_prompt_tokens_must_fit_beside_the_output(
    pipeline: ColocatedPipeline, request_body: dict[str, Any], room: str
) -> None:
    def plan(body: dict[str, Any]) -> RequestPlan:
        if "prompt" in body:
            return plan_completion(CompletionRequest.model_validate(body), pipeline)
        return plan_chat(ChatCompletionRequest.model_validate(body), pipeline)

    with pytest.raises(InvalidRequestError) as raised:
        plan(request_body)
    assert raised.value.param == "truncate_prompt_tokens"
    assert raised.value.message == (
        f"truncate_prompt_tokens: {request_body['truncate_prompt_tokens']} asks for more prompt "
        f"tokens than the context window leaves: max_model_len 1024 - {room}"
    )
    fits = int(room.rsplit(" ", 1)[1])
    if fits:
        assert plan(request_body | {"truncate_prompt_tokens": fits}).prompts


@pytest.mark.parametrize("keep", [0, -2])
def test_truncate_prompt_tokens_below_one_is_only_minus_one(keep: int) -> None:
    with pytest.raises(ValidationError) as raised:
        CompletionRequest(prompt="Hi", truncate_prompt_tokens=keep)
    assert invalid_request(raised.value.errors()).param == "truncate_prompt_tokens"


def test_a_clients_request_id_names_the_answer_and_never_the_run(
    pipeline: ColocatedPipeline,
) -> None:
    """vLLM's ids: `cmpl-`/`chatcmpl-` and the client's own; the engine's are unique."""
    request = CompletionRequest(prompt="Hi", request_id="job-7", n=2)
    first, second = plan_completion(request, pipeline), plan_completion(request, pipeline)
    assert first.request_id == second.request_id == "cmpl-job-7"
    assert first.run_id != second.run_id and first.run_id.startswith("cmpl-job-7.")
    assert [r.request_id for r in first.generation_requests()] == [
        f"{first.run_id}-{i}" for i in range(2)
    ]
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], request_id="")
    assert plan_chat(chat, pipeline).request_id == "chatcmpl-"  # vLLM's too
    # gRPC's own id is answered as it is, the body's aside
    assert plan_completion(request, pipeline, "grpc-1").request_id == "grpc-1"


def test_chat_messages_reach_the_template_as_vllm_passes_them(
    pipeline: ColocatedPipeline,
) -> None:
    """name, the assistant's tool_calls (arguments parsed into a mapping, as tool-use
    templates take them) and reasoning, a tool message's tool_call_id; other keys and
    fields of other roles are left out, as vLLM leaves them."""
    dumping = copy.copy(pipeline)
    dumping.tokenizer = copy.copy(pipeline.tokenizer)
    dumping.tokenizer.chat_template = ChatTemplate("{{ messages | tojson }}", None, None)
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    bad_json = {"id": "c2", "function": {"name": "nop", "arguments": "{oops"}}
    messages = [
        {"role": "system", "content": "Be brief.", "name": "policy", "color": "red"},
        {"role": "user", "content": "1 + 2?", "name": "ann", "tool_call_id": "x"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call, bad_json],
            "reasoning_content": "add them",
        },
        {"role": "tool", "content": [{"type": "text", "text": "3"}], "tool_call_id": "c1"},
        {"role": "assistant", "content": "3", "tool_calls": []},
    ]
    request = ChatCompletionRequest(messages=messages, add_generation_prompt=False)
    (prompt,) = plan_chat(request, dumping).prompts
    assert json.loads(pipeline.tokenizer.decode(prompt)) == [
        {"role": "system", "content": "Be brief.", "name": "policy"},
        {"role": "user", "content": "1 + 2?", "name": "ann"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "function": {"arguments": {"a": 1}, "name": "add"},
                    "type": "function",
                },
                {"id": "c2", "function": {"arguments": {}, "name": "nop"}, "type": "function"},
            ],
            "reasoning": "add them",
            "reasoning_content": "add them",
        },
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
        {"role": "assistant", "content": "3"},
    ]


@pytest.mark.parametrize(
    ("message", "param", "says"),
    [
        ({"role": "user", "content": None}, "messages[0].content", "required in a user message"),
        ({"role": "tool", "tool_call_id": "c1"}, "messages[0].content", "in a tool message"),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "type": "x", "function": {"name": "f"}}],
            },
            "messages[0].tool_calls[0].type",
            "'function'",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]},
            "messages[0].tool_calls[0].function.name",
            "Field required",
        ),
    ],
)
def test_malformed_messages_name_the_field(message: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate({"messages": [message]})
    error = invalid_request(raised.value.errors())
    assert error.param == param and error.message.startswith(f"{param}: ")
    assert says in error.message
