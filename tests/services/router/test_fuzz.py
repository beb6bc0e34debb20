"""Property-based fuzzing of the front door: whatever a client sends, the router answers
with a client error or a result, never a server error, and keeps serving.

HTTP bodies are drawn from the served OpenAPI document's own request schemas, then
mutated (a field replaced by any JSON, a field dropped, a field added, the JSON cut or its
bytes flipped), besides raw bytes under assorted content types. gRPC requests are random
bytes and valid GenerateRequests whose fields take any value their proto type allows,
serialized and then possibly damaged, sent through a generic channel so nothing checks
them on the way. A tiny random model (hidden size 64, 64-token window) keeps each
example cheap; examples are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from proto.baton.v1 import inference_pb2 as pb
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline
from tests.unit.tiny_model import tiny_checkpoint

from .conftest import serve_grpc, serve_http, wait_until_idle

TINY = "tiny-random-llama"
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-16",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
]
GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@dataclass
class Front:
    url: str
    channel: grpc.Channel
    engine: AsyncEngine


@pytest.fixture(scope="module")
def front(default_checkpoint: LoadedCheckpoint) -> Iterator[Front]:
    args = EngineArgs(dtype="float32", max_model_len=64, kv_cache_bytes=8 * 2**20)
    engine = AsyncEngine(args.create_engine(tiny_checkpoint(default_checkpoint)))
    pipeline = ColocatedPipeline(engine, TINY)
    try:
        with (
            serve_http(build_http_app(lambda: pipeline)) as url,
            serve_grpc(lambda: pipeline) as address,
            grpc.insecure_channel(address) as channel,
        ):
            yield Front(url, channel, engine)
    finally:
        engine.shutdown()


@pytest.fixture
def http(front: Front) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=front.url, timeout=120) as client:
        yield client


def still_serving(front: Front, http: httpx2.Client) -> None:
    """After the fuzzing: nothing left running, and a valid request on each protocol."""
    wait_until_idle(front.engine)
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    request = pb.GenerateRequest(prompt="Hello", max_tokens=2)
    generate = front.channel.unary_stream(
        "/baton.v1.Inference/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    assert list(generate(request, timeout=60))[-1].usage.completion_tokens == 2
    wait_until_idle(front.engine)


def check_http_answer(r: httpx2.Response) -> None:
    """A result, or a client error in OpenAI's shape; never a server error, not even as
    the last event of a stream that had started."""
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"
    assert "internal_error" not in r.text


# ---- strategies from the OpenAPI document ------------------------------------------


def from_schema(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for one JSON schema of FastAPI's document (the subset it uses)."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, components) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties")
        if not properties:
            return st.dictionaries(st.text(max_size=8), JSON, max_size=3)
        required = set(schema.get("required", ()))
        fields = {k: from_schema(v, components) for k, v in properties.items()}
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    if kind == "array":
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", low + 3), low + 3)
        return st.lists(
            from_schema(schema.get("items", {}), components), min_size=low, max_size=high
        )
    if kind == "string":
        low = schema.get("minLength", 0)
        return st.text(min_size=low, max_size=max(low, min(schema.get("maxLength", 24), 24)))
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**64)) + 1)
        return st.integers(low, schema.get("maximum", schema.get("exclusiveMaximum", 2**64) - 1))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
            max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON  # no constraint: any JSON


def request_schemas(http: httpx2.Client) -> dict[str, st.SearchStrategy[Any]]:
    document = http.get("/openapi.json").json()
    components = document["components"]["schemas"]
    return {
        path: from_schema(
            document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"],
            components,
        )
        for path in ("/v1/completions", "/v1/chat/completions")
    }


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> bytes:
    body = draw(valid)
    body.setdefault("max_tokens", draw(st.integers(1, 4)))  # chat's default fills the window
    how = draw(st.sampled_from(["as is", "replace", "drop", "add", "whole", "bytes"]))
    if how == "replace" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(JSON)
    elif how == "drop" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif how == "add":
        body[draw(st.text(max_size=12))] = draw(JSON)
    elif how == "whole":
        return json.dumps(draw(JSON)).encode()
    raw = json.dumps(body).encode()
    if how == "bytes":
        return damaged(draw, raw)
    return raw


def damaged(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` cut short, or with bytes overwritten or inserted."""
    at = draw(st.integers(0, len(raw)))
    what = draw(st.sampled_from(["cut", "overwrite", "insert"]))
    junk = draw(st.binary(min_size=1, max_size=8))
    if what == "cut":
        return raw[:at]
    if what == "overwrite":
        return raw[:at] + junk + raw[at + len(junk) :]
    return raw[:at] + junk + raw[at:]


# ---- HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schema_derived_then_mutated_bodies_never_fail_the_server(
    front: Front, http: httpx2.Client, path: str
) -> None:
    valid = request_schemas(http)[path]

    @FUZZ
    @given(body=mutated(valid))
    def post(body: bytes) -> None:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        check_http_answer(r)

    post()
    still_serving(front, http)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_random_bytes_under_any_content_type_are_client_errors(
    front: Front, http: httpx2.Client, path: str
) -> None:
    @FUZZ
    @given(body=st.binary(max_size=256), content_type=st.sampled_from(CONTENT_TYPES))
    def post(body: bytes, content_type: str) -> None:
        r = http.post(path, content=body, headers={"content-type": content_type})
        check_http_answer(r)
        assert r.status_code >= 400 or body.strip().startswith(b"{")

    post()
    still_serving(front, http)


# ---- gRPC ----------------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
SMALL = st.integers(0, 4)


def optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Any GenerateRequest the proto allows; counts lean small so examples stay cheap."""
    fields: dict[str, Any] = {
        "model": draw(st.sampled_from(["", TINY]) | st.text(max_size=12)),
        "request_id": draw(st.text(max_size=12)),
        "max_tokens": draw(optional(SMALL | UINT32)),
        "temperature": draw(optional(st.floats())),
        "top_p": draw(optional(st.floats())),
        "top_k": draw(optional(st.integers(-(2**31), 2**31 - 1))),
        "seed": draw(optional(st.integers(0, 2**64 - 1))),
        "stop": draw(st.lists(st.text(max_size=6), max_size=3)),
        "n": draw(optional(SMALL | UINT32)),
        "logprobs": draw(optional(SMALL | UINT32)),
        "min_tokens": draw(optional(SMALL | UINT32)),
        "ignore_eos": draw(st.booleans()),
        "stop_token_ids": draw(st.lists(UINT32, max_size=3)),
    }
    source = draw(st.sampled_from(["prompt", "prompt_token_ids", "messages", None]))
    if source == "prompt":
        fields["prompt"] = draw(st.text(max_size=40))
    elif source == "prompt_token_ids":
        fields["prompt_token_ids"] = pb.TokenIds(ids=draw(st.lists(UINT32, max_size=6)))
    elif source == "messages":
        role = st.sampled_from(["system", "user", "assistant", "tool"]) | st.text(max_size=6)
        messages = draw(
            st.lists(st.builds(pb.ChatMessage, role=role, content=st.text(max_size=20)), max_size=3)
        )
        fields["messages"] = pb.Conversation(messages=messages)
    return pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


@st.composite
def raw_generate_requests(draw: st.DrawFn) -> bytes:
    raw = draw(generate_requests()).SerializeToString()
    return damaged(draw, raw) if draw(st.booleans()) else raw


def call_raw(front: Front, method: str, raw: bytes) -> grpc.RpcError | None:
    """Sends `raw` as the serialized request; the call's error, or None if it succeeded."""
    path = f"/baton.v1.Inference/{method}"
    try:
        if method == "Generate":
            list(front.channel.unary_stream(path)(raw, timeout=120))
        else:
            front.channel.unary_unary(path)(raw, timeout=30)
    except grpc.RpcError as e:
        return e
    return None


def check_grpc_answer(error: grpc.RpcError | None) -> None:
    if error is not None:
        assert error.code() in GRPC_CLIENT_ERRORS, (error.code(), error.details())
        assert error.details()


@pytest.mark.parametrize("method", ["Generate", "ListModels"])
def test_random_bytes_are_invalid_argument_or_served(front: Front, method: str) -> None:
    @FUZZ
    @given(raw=st.binary(max_size=256))
    def call(raw: bytes) -> None:
        check_grpc_answer(call_raw(front, method, raw))

    call()
    with httpx2.Client(base_url=front.url, timeout=120) as http:
        still_serving(front, http)


def test_any_generate_request_is_invalid_argument_or_served(front: Front) -> None:
    @FUZZ
    @given(raw=raw_generate_requests())
    def call(raw: bytes) -> None:
        check_grpc_answer(call_raw(front, "Generate", raw))

    call()
    with httpx2.Client(base_url=front.url, timeout=120) as http:
        still_serving(front, http)


def test_a_message_that_does_not_parse_is_invalid_argument(front: Front) -> None:
    """Field 3 (prompt, a string) declared 100 bytes long with 1 byte behind it."""
    for method in ("Generate", "ListModels"):
        error = call_raw(front, method, b"\x1a\x64x")
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        name = "GenerateRequest" if method == "Generate" else "ListModelsRequest"
        assert error.details().startswith(f"malformed baton.v1.{name} message: ")
