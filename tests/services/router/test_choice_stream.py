"""How the front ends drive a request: planning off the loop, and ChoiceStream's merge
over a pipeline that fails in ways the front ends cannot see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import grpc
import httpx2
import pytest

from engine.outputs import RequestOutput
from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline, GenerationRequest

from .conftest import MODEL_ID, SwitchedPipeline, serve_grpc, serve_http


class CancelledUnderneath(SwitchedPipeline):
    """A pipeline whose call is cancelled from below after one output, as a Ray call whose
    remote task was cancelled raises CancelledError in the caller without its task
    being cancelled."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        outputs = cast(AsyncGenerator[RequestOutput, None], self.inner.generate(request))
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                yield out
                raise asyncio.CancelledError


@pytest.mark.parametrize("stream", [False, True])
def test_a_pipeline_cancelled_from_below_fails_the_request_instead_of_hanging(
    pipeline: ColocatedPipeline, stream: bool
) -> None:
    body = {"prompt": "One, two,", "max_tokens": 6, "temperature": 0, "stream": stream}
    with serve_http(build_http_app(lambda: CancelledUnderneath(pipeline))) as url:
        response = httpx2.post(f"{url}/v1/completions", json=body, timeout=30)
    message = "choice 0's pipeline call was cancelled"
    if stream:
        assert response.status_code == 200
        assert message in response.text and response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.status_code == 500 and message in response.json()["error"]["message"]


class _LoopWatchingTokenizer:
    """The real tokenizer, noting whether each encode ran on an event loop's thread."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.on_loop: list[bool] = []

    def encode(self, text: str) -> list[int]:
        self._note()
        ids: list[int] = self.inner.encode(text)
        return ids

    def encode_chat(self, *args: Any) -> list[int]:
        self._note()
        ids: list[int] = self.inner.encode_chat(*args)
        return ids

    def _note(self) -> None:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_prompts_are_tokenized_off_the_event_loop(pipeline: ColocatedPipeline) -> None:
    """A prompt of megabytes takes seconds to tokenize: on the loop, it would stop every
    other stream that loop serves, over HTTP and gRPC alike."""
    switched = SwitchedPipeline(pipeline)
    tokenizer = _LoopWatchingTokenizer(pipeline.tokenizer)
    switched.tokenizer = tokenizer
    body = {"model": MODEL_ID, "max_tokens": 2}
    with serve_http(build_http_app(lambda: switched)) as url:
        completion = httpx2.post(f"{url}/v1/completions", json=body | {"prompt": "Hi"})
        chat = httpx2.post(
            f"{url}/v1/chat/completions",
            json=body | {"messages": [{"role": "user", "content": "Hi"}]},
        )
    assert completion.status_code == chat.status_code == 200
    with serve_grpc(lambda: switched) as address, grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(model=MODEL_ID, prompt="Hi", max_tokens=2)
        assert list(pb_grpc.InferenceStub(channel).Generate(request, timeout=60))
    assert len(tokenizer.on_loop) >= 3 and not any(tokenizer.on_loop)
