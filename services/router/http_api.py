"""The OpenAI-compatible HTTP API over a `Pipeline`, as a FastAPI app for any ASGI server
(uvicorn for one process, Ray Serve's ingress in the application).

Streams are server-sent events, `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` at
the end. Every error, whichever layer finds it, leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}` with the status of its `ApiError` class.
A client that hangs up cancels its generation, streaming or not. A body over the size
limit is refused (413) as it arrives, before anything parses it. An `X-Request-Id` header
names the request over the body's `request_id`, as in vLLM: the answer's id is
`cmpl-`/`chatcmpl-` and it.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run
# time, and string annotations naming the app's local `authorize` would not resolve (the
# parameter would turn into a query parameter).

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.router.api_keys import ApiKeys
from services.router.choice_stream import ChoiceStream
from services.router.errors import (
    ApiError,
    InvalidRequestError,
    OverloadedError,
    RequestTooLargeError,
    as_api_error,
    remote_cause,
)
from services.router.openai_chat import chat_chunks, chat_response
from services.router.openai_completions import completion_chunks, completion_response
from services.router.openai_protocol import (
    MAX_REQUEST_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    checked_request_id,
    invalid_request,
)
from services.router.openai_responses import ErrorInfo, ErrorResponse, ModelCard, ModelList
from services.router.pipeline import Pipeline
from services.router.request_plan import (
    plan_chat,
    plan_completion,
    served_model,
    serving_pipeline,
)
from services.router.responses_answer import response_events, response_object
from services.router.responses_request import ResponsesRequest, plan_response

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=SamplingRequest)

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class _ClientGone(Exception):
    """The client hung up before its answer was ready."""


def build_http_app(
    get_pipeline: Callable[[], Pipeline],
    api_keys: ApiKeys | None = None,
    metrics: Callable[[], Awaitable[str]] | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> FastAPI:
    """The app. `get_pipeline` is called per request and may raise NotReadyError (503);
    with `api_keys`, /v1 routes need `Authorization: Bearer <key>` and each key is its own
    prefix-cache tenant; `metrics` renders the Prometheus text for GET /metrics (absent
    without it); bodies over `max_request_bytes` are 413."""
    app = FastAPI(title="Baton", summary="OpenAI-compatible LLM serving")
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)
    started = int(time.time())
    keys = api_keys or ApiKeys()

    def authorize(authorization: str | None = Header(None)) -> str:
        return keys.tenant(authorization)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/completions", response_model=None)
    async def create_completion(
        body: CompletionRequest,
        request: Request,
        tenant: Annotated[str, Depends(authorize)],
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        body = _named_by_header(body, x_request_id)
        pipeline = serving_pipeline(get_pipeline)
        plan = await asyncio.to_thread(plan_completion, body, pipeline, tenant=tenant)
        stream = ChoiceStream(pipeline, plan)
        if body.stream:
            return await _event_stream(
                request, stream, completion_chunks(stream, body.include_usage)
            )
        return _json(await _unless_client_gone(request, completion_response(stream)))

    @v1.post("/chat/completions", response_model=None)
    async def create_chat_completion(
        body: ChatCompletionRequest,
        request: Request,
        tenant: Annotated[str, Depends(authorize)],
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        body = _named_by_header(body, x_request_id)
        pipeline = serving_pipeline(get_pipeline)
        plan = await asyncio.to_thread(plan_chat, body, pipeline, tenant=tenant)
        stream = ChoiceStream(pipeline, plan)
        if body.stream:
            return await _event_stream(request, stream, chat_chunks(stream, body.include_usage))
        return _json(await _unless_client_gone(request, chat_response(stream)))

    @v1.post("/responses", response_model=None)
    async def create_response(
        body: ResponsesRequest, request: Request, tenant: Annotated[str, Depends(authorize)]
    ) -> Response:
        pipeline = serving_pipeline(get_pipeline)
        plan = await asyncio.to_thread(plan_response, body, pipeline, tenant=tenant)
        stream = ChoiceStream(pipeline, plan)
        if body.stream:  # named events and no [DONE]: see responses_answer
            await _unless_client_gone(request, stream.start())
            events = response_events(stream, body)
            return StreamingResponse(events, media_type="text/event-stream")
        return _json(await _unless_client_gone(request, response_object(stream, body)))

    def model_card(pipeline: Pipeline) -> ModelCard:
        return ModelCard(
            id=pipeline.model_id, created=started, max_model_len=pipeline.max_model_len
        )

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> Response:
        return _json(ModelList(data=[model_card(get_pipeline())]))

    # OpenAI's retrieve; a model id may hold slashes ("HuggingFaceTB/SmolLM2-135M").
    @v1.get("/models/{model:path}", response_model=ModelCard)
    async def retrieve_model(model: str) -> Response:
        pipeline = get_pipeline()
        served_model(model, pipeline)
        return _json(model_card(pipeline))

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


def _named_by_header(body: R, x_request_id: str | None) -> R:
    if x_request_id is None:
        return body
    try:
        checked_request_id(x_request_id)
    except ValueError as e:
        raise InvalidRequestError(f"X-Request-Id header: {e}") from e
    return body.model_copy(update={"request_id": x_request_id})


class _BodyLimit:
    """Reads a request's body before the app does and answers 413 once it passes
    `max_bytes`: at once when Content-Length says so, else as soon as the bytes received
    do (a chunked body). Nothing parses a body over the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        messages: list[Message] = []
        size = 0
        while not too_large:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            too_large = size > self.max_bytes
            if message["type"] != "http.request" or not message.get("more_body"):
                break  # the whole body, or the client left
        if too_large:
            error = RequestTooLargeError(
                f"the request body is larger than this server's limit of {self.max_bytes} "
                "bytes (router.max_request_bytes)"
            )
            await _error_response(error)(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


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
        if not isinstance(e, ApiError):
            log.exception("stream failed")
        yield f"data: {_error_body(as_api_error(e)).model_dump_json()}\n\n"
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

    async def validation_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            # FastAPI parses no other type as JSON: the body reads as not an object.
            return _error_response(
                InvalidRequestError(
                    f"the body must be JSON sent with Content-Type: application/json, not "
                    f"{media_type} (curl -d sends a form: add -H 'Content-Type: "
                    "application/json')"
                )
            )
        return _error_response(invalid_request(e.errors()))

    async def http_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        info = ErrorInfo(message=str(e.detail), type="invalid_request_error")
        response = _json(ErrorResponse(error=info), e.status_code)
        response.headers.update(e.headers or {})  # a 405's Allow (RFC 9110 15.5.6)
        return response

    async def client_gone(_: Request, e: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def internal_error(_: Request, e: Exception) -> Response:
        log.error("request failed", exc_info=e)
        return _error_response(ApiError(f"internal error: {remote_cause(e)!r}"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(_ClientGone, client_gone)
    app.add_exception_handler(Exception, internal_error)
