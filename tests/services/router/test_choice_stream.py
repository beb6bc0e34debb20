"""ChoiceStream's merge over a pipeline that fails in ways the front ends cannot see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import httpx2
import pytest

from engine.outputs import RequestOutput
from services.router.http_api import build_http_app
from services.router.pipeline import ColocatedPipeline, GenerationRequest

from .conftest import SwitchedPipeline, serve_http


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
