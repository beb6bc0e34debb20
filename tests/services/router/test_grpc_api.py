"""baton.v1.Inference over real gRPC on 127.0.0.1: streams, errors, health, reflection."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from engine.async_engine import AsyncEngine
from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.pipeline import ColocatedPipeline

from .conftest import MODEL_ID, SwitchedPipeline, serve_grpc, wait_until_idle

PROMPT = "The capital of France is"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def channel(grpc_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_address) as channel:
        yield channel


def generate(channel: grpc.Channel, **fields: Any) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(**{"model": MODEL_ID, "max_tokens": 5, **fields})
    return list(pb_grpc.InferenceStub(channel).Generate(request, timeout=60))


def failure(channel: grpc.Channel, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        generate(channel, **fields)
    return raised.value


def test_generate_streams_the_same_text_as_http_with_exact_usage(
    channel: grpc.Channel, client: openai.OpenAI, pipeline: ColocatedPipeline
) -> None:
    messages = generate(channel, prompt=PROMPT, temperature=0)
    http = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0)
    assert "".join(m.text for m in messages) == http.choices[0].text
    assert [len(m.token_ids) for m in messages] == [1] * 5
    assert {m.request_id for m in messages} == {messages[0].request_id}
    assert [m.finish_reason for m in messages] == [""] * 4 + ["length"]
    assert [m.HasField("usage") for m in messages] == [False] * 4 + [True]
    usage = messages[-1].usage
    assert usage.prompt_tokens == len(pipeline.tokenizer.encode(PROMPT))
    assert (usage.completion_tokens, usage.total_tokens) == (5, usage.prompt_tokens + 5)


def test_chat_choices_carry_their_index_logprobs_and_request_id(channel: grpc.Channel) -> None:
    conversation = pb.Conversation(messages=[pb.ChatMessage(role="user", content="Hello!")])
    messages = generate(
        channel,
        messages=conversation,
        request_id="req-42",
        n=2,
        seed=3,
        max_tokens=3,
        logprobs=2,
    )
    assert {m.request_id for m in messages} == {"req-42"}
    assert sorted(m.index for m in messages) == [0, 0, 0, 1, 1, 1]
    for m in messages:
        (lp,) = m.logprobs
        assert lp.token_id == m.token_ids[0] and len(lp.top) == 2
    assert messages[-1].usage.completion_tokens == 6
    again = generate(channel, messages=conversation, n=2, seed=3, max_tokens=3)
    assert sorted((m.index, m.text) for m in again) == sorted((m.index, m.text) for m in messages)


def test_token_ids_prompt_and_stop_string(
    channel: grpc.Channel, pipeline: ColocatedPipeline
) -> None:
    ids = pipeline.tokenizer.encode(PROMPT)
    full = "".join(
        m.text
        for m in generate(
            channel, prompt_token_ids=pb.TokenIds(ids=ids), temperature=0, max_tokens=8
        )
    )
    stop = full.split()[2]
    messages = generate(channel, prompt=PROMPT, temperature=0, max_tokens=8, stop=[stop])
    assert "".join(m.text for m in messages) == full[: full.index(stop)]
    assert (messages[-1].finish_reason, messages[-1].stop_string) == ("stop", stop)


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({"prompt": "Hi", "temperature": 2.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature: "),
        ({"prompt": "Hi", "logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT, "logprobs: "),
        (
            {"messages": pb.Conversation(messages=[pb.ChatMessage(role="user")]), "logprobs": 21},
            grpc.StatusCode.INVALID_ARGUMENT,
            "logprobs: ",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "one of prompt, prompt_token_ids or messages"),
        (
            {"prompt": "Hi", "model": "gpt-9"},
            grpc.StatusCode.NOT_FOUND,
            "the model 'gpt-9' does not exist",
        ),
        (
            {"prompt": "hello " * 1030},
            grpc.StatusCode.INVALID_ARGUMENT,
            "this model's context window is 1024 tokens",
        ),
        (
            {"prompt_token_ids": pb.TokenIds(ids=[5, 49152])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt: token id 49152 is outside the vocabulary [0, 49152)",
        ),
        ({"prompt": "Hi", "request_id": "x" * 257}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (
            {"prompt": "Hi", "request_id": "a\nINFO forged"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id: must be printable text",
        ),
        (  # echoed whole, the name would pass gRPC's metadata limit: RESOURCE_EXHAUSTED
            {"prompt": "Hi", "model": "m" * 20_000},
            grpc.StatusCode.NOT_FOUND,
            f"the model '{'m' * 80}...' does not exist",
        ),
    ],
)
def test_errors_end_the_call_with_their_status(
    channel: grpc.Channel, fields: dict[str, Any], code: grpc.StatusCode, says: str
) -> None:
    error = failure(channel, **fields)
    assert error.code() == code
    assert error.details().startswith(says)


def test_requests_sharing_a_client_id_run_apart(grpc_address: str, engine: AsyncEngine) -> None:
    """A client's request_id is echoed, not used as the engine's: concurrent calls under one
    id used to collide (one refused with a traceback, one's cleanup freeing the other's
    blocks, one left waiting for outputs that went to the other's stream)."""
    request = pb.GenerateRequest(
        model=MODEL_ID, prompt=PROMPT, max_tokens=24, ignore_eos=True, request_id="dup-a"
    )

    def run(_: int) -> list[pb.GenerateResponse]:
        with grpc.insecure_channel(grpc_address) as channel:
            return list(pb_grpc.InferenceStub(channel).Generate(request, timeout=60))

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    for responses in results:
        assert {r.request_id for r in responses} == {"dup-a"}
        assert responses[-1].finish_reason == "length"
        assert sum(len(r.token_ids) for r in responses) == 24
    wait_until_idle(engine)


def test_cancelling_the_call_aborts_the_request(channel: grpc.Channel, engine: AsyncEngine) -> None:
    before = engine.call(lambda e: e.stats.generated_tokens)
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=400, ignore_eos=True, temperature=0)
    call = pb_grpc.InferenceStub(channel).Generate(request, timeout=60)
    assert next(call).finish_reason == ""
    call.cancel()
    wait_until_idle(engine)
    assert engine.call(lambda e: e.stats.generated_tokens) - before < 400


def test_an_empty_model_name_is_the_served_model(channel: grpc.Channel) -> None:
    # ignore_eos: sampled at temperature 1, EOS may come within the 5 tokens
    final = generate(channel, prompt=PROMPT, model="", ignore_eos=True)[-1]
    assert final.finish_reason == "length"


def test_list_models(channel: grpc.Channel) -> None:
    response = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.id, m.max_model_len) for m in response.models] == [(MODEL_ID, 1024)]


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"baton.v1.Inference", "grpc.health.v1.Health"} <= set(services)


@pytest.mark.parametrize("service", ["", "baton.v1.Inference"])
def test_health_watchers_hear_readiness_change_without_a_check(
    pipeline: ColocatedPipeline, service: str
) -> None:
    """grpc.health.v1 Watch sends the status now, then every change: a client that
    health-checks by watching must see a router start serving and begin to drain."""
    switched = SwitchedPipeline(pipeline)
    switched.is_ready = False
    with serve_grpc(lambda: switched) as address, grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        stream = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=60)
        try:
            assert next(stream).status == NOT_SERVING
            switched.is_ready = True
            assert next(stream).status == SERVING
            switched.is_ready = False
            assert next(stream).status == NOT_SERVING
        finally:
            stream.cancel()


def test_health_and_errors_follow_the_pipeline(pipeline: ColocatedPipeline) -> None:
    switched = SwitchedPipeline(pipeline)
    with serve_grpc(lambda: switched) as address, grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return health.Check(request, timeout=10).status

        assert status("") == status("baton.v1.Inference") == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            status("no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        switched.full = True
        error = failure(channel, prompt="Hi")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(error.trailing_metadata())
        assert (trailers["retry-after"], trailers["grpc-retry-pushback-ms"]) == ("3", "2500")

        switched.full, switched.fail_after = False, 1
        error = failure(channel, prompt="Hi")
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "generation failed: RuntimeError('decode replica lost')"

        switched.is_ready = False
        assert status("") == status("baton.v1.Inference") == NOT_SERVING
        error = failure(channel, prompt="Hi")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
