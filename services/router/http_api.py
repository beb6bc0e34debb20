"""The OpenAI-compatible HTTP API over a `Pipeline`, as a FastAPI app for any ASGI server
(uvicorn for one process, Ray Serve's ingress in the application).

Streams are server-sent events, `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` at
the end. Every error, whichever layer finds it, leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}` with the status of its `ApiError` class.
A client that hangs up cancels its generation, streaming or not.
"""

# No `from __future__ import annotations` here: Ray Serve ships this app to the router
# replica by value, and FastAPI re-reads the route signatures there, where string
# annotations no longer resolve (every parameter would turn into a query parameter).

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from services.router.choice_stream import ChoiceStream
from services.router.errors import ApiError, AuthenticationError, OverloadedError
from services.router.openai_chat import chat_chunks, chat_response
from services.router.openai_completions import completion_chunks, completion_response
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
)
from services.router.openai_responses import ErrorInfo, ErrorResponse, ModelCard, ModelList
from services.router.pipeline import Pipeline
from services.router.request_plan import plan_chat, plan_completion, serving_pipeline

log = logging.getLogger(__name__)
T = TypeVar("T")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class _ClientGone(Exception):
    """The client hung up before its answer was ready."""


def build_http_app(
    get_pipeline: Callable[[], Pipeline],
    api_keys: Collection[str] | Callable[[], Collection[str]] = (),
    metrics: Callable[[], Awaitable[str]] | None = None,
) -> FastAPI:
    """The app. `get_pipeline` is called per request and may raise NotReadyError (503);
    with `api_keys`, /v1 routes need `Authorization: Bearer <key>`; `metrics` renders the
    Prometheus text for GET /metrics (absent without it)."""
    app = FastAPI(title="Baton", summary="OpenAI-compatible LLM serving")

    def current_keys() -> list[bytes]:
        # A callable is read per request: a replica takes its keys from its own environment.
        keys = api_keys() if callable(api_keys) else api_keys
        return [key.encode() for key in keys]

    started = int(time.time())

    def authorize(authorization: str | None = Header(None)) -> None:
        keys = current_keys()
        if not keys:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(key.strip().encode(), k) for k in keys
        ):
            raise AuthenticationError("a valid API key is required: Authorization: Bearer <key>")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        pipeline = serving_pipeline(get_pipeline)
        stream = ChoiceStream(pipeline, plan_completion(body, pipeline))
        if body.stream:
            return await _event_stream(
                request, stream, completion_chunks(stream, body.include_usage)
            )
        return _json(await _unless_client_gone(request, completion_response(stream)))

    @v1.post("/chat/completions", response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        pipeline = serving_pipeline(get_pipeline)
        stream = ChoiceStream(pipeline, plan_chat(body, pipeline))
        if body.stream:
            return await _event_stream(request, stream, chat_chunks(stream, body.include_usage))
        return _json(await _unless_client_gone(request, chat_response(stream)))

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> Response:
        pipeline = get_pipeline()
        card = ModelCard(
            id=pipeline.model_id, created=started, max_model_len=pipeline.max_model_len
        )
        return _json(ModelList(data=[card]))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        serving_pipeline(get_pipeline)
        return Response(status_code=200)

    if metrics is not None:
        render = metrics

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(await render(), media_type=PROMETHEUS_TEXT)

    _add_error_handlers(app)
    return app


async def _event_stream(
    request: Request, stream: ChoiceStream, chunks: AsyncIterator[BaseModel]
) -> Response:
    # Errors the input causes surface in start(), while a plain JSON error can still be sent.
    await _unless_client_gone(request, stream.start())
    return StreamingResponse(_server_sent_events(chunks), media_type="text/event-stream")


async def _server_sent_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as e:  # the status line is sent: the error becomes the last event
        error = e if isinstance(e, ApiError) else ApiError(f"generation failed: {e!r}")
        if not isinstance(e, ApiError):
            log.exception("stream failed")
        yield f"data: {_error_body(error).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_client_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; a client that hangs up meanwhile cancels it (ChoiceStream then
    aborts its engine requests) and gets no answer."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json(), status, media_type="application/json")


def _error_body(error: ApiError) -> ErrorResponse:
    info = ErrorInfo(
        message=error.message, type=error.error_type, param=error.param, code=error.code
    )
    return ErrorResponse(error=info)


def _error_response(error: ApiError) -> Response:
    response = _json(_error_body(error), error.http_status)
    if isinstance(error, OverloadedError):
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return response


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return _error_response(e)

    async def validation_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        return _error_response(invalid_request(e.errors()))

    async def http_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        info = ErrorInfo(message=str(e.detail), type="invalid_request_error")
        return _json(ErrorResponse(error=info), e.status_code)

    async def client_gone(_: Request, e: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def internal_error(_: Request, e: Exception) -> Response:
        log.error("request failed", exc_info=e)
        return _error_response(ApiError(f"internal error: {e!r}"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(_ClientGone, client_gone)
    app.add_exception_handler(Exception, internal_error)
