"""Request size limits: an HTTP body over the limit is 413 before anything parses it, a
gRPC message over it RESOURCE_EXHAUSTED; requests just under it are served as usual."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx2
import pytest

from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline

from .conftest import serve_grpc, serve_http

LIMIT = 4096
TOO_LARGE = {
    "message": f"the request body is larger than this server's limit of {LIMIT} bytes "
    "(router.max_request_bytes)",
    "type": "invalid_request_error",
    "param": None,
    "code": "request_too_large",
}


@pytest.fixture(scope="module")
def limited_url(pipeline: ColocatedPipeline) -> Iterator[str]:
    with serve_http(build_http_app(lambda: pipeline, max_request_bytes=LIMIT)) as url:
        yield url


def body_of_size(size: int) -> bytes:
    """A completion request of exactly `size` bytes whose model does not exist (404), so
    a body that gets through is parsed and answered at once."""
    frame = json.dumps({"model": "", "prompt": "Hi"}).encode()
    model = "m" * (size - len(frame))
    body = json.dumps({"model": model, "prompt": "Hi"}).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_over_the_limit_is_413_in_the_openai_shape(limited_url: str, path: str) -> None:
    r = httpx2.post(
        f"{limited_url}{path}",
        content=body_of_size(LIMIT + 1),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json() == {"error": TOO_LARGE}


def test_the_limit_is_checked_before_parsing(limited_url: str) -> None:
    """Broken JSON over the limit is 413, not 400: the body was never parsed."""
    r = httpx2.post(
        f"{limited_url}/v1/completions",
        content=b"{" * (LIMIT + 1),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json() == {"error": TOO_LARGE}


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit(limited_url: str) -> None:
    body = body_of_size(4 * LIMIT)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    r = httpx2.post(
        f"{limited_url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json() == {"error": TOO_LARGE}


def test_a_body_at_the_limit_is_read(limited_url: str) -> None:
    r = httpx2.post(
        f"{limited_url}/v1/completions",
        content=body_of_size(LIMIT),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    ok = httpx2.post(f"{limited_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_a_grpc_message_over_the_limit_is_resource_exhausted(pipeline: ColocatedPipeline) -> None:
    with (
        serve_grpc(lambda: pipeline, max_request_bytes=LIMIT) as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.InferenceStub(channel)

        def status(model_bytes: int) -> grpc.StatusCode:
            request = pb.GenerateRequest(model="m" * model_bytes, prompt="Hi", max_tokens=1)
            with pytest.raises(grpc.RpcError) as failure:
                list(stub.Generate(request, timeout=30))
            return failure.value.code()

        assert status(LIMIT + 1) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status(LIMIT - 64) == grpc.StatusCode.NOT_FOUND  # read, then refused
        served = list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=1), timeout=30))
        assert served[-1].usage.completion_tokens == 1
