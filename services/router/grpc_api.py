"""The gRPC front end: `baton.v1.Inference` (proto/baton/v1/inference.proto) over a
`Pipeline`, with grpc.health.v1 and server reflection.

A GenerateRequest is mapped onto the OpenAI request models and planned by the same code as
HTTP, so both protocols accept, reject and sample alike; only the framing differs. API
keys are the same too (api_keys.py): metadata `authorization: Bearer <key>` on Inference
calls; health and reflection stay open for probes. Messages over the size limit are
refused by gRPC itself with RESOURCE_EXHAUSTED; a message that does not parse is the
client's INVALID_ARGUMENT, never an internal error.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc.aio import ServicerContext as Context
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from proto.baton.v1 import inference_pb2 as pb
from services.router.api_keys import ApiKeys
from services.router.choice_stream import ChoiceOutput, ChoiceStream, Usage
from services.router.errors import (
    ApiError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    as_api_error,
)
from services.router.openai_protocol import (
    MAX_REQUEST_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    checked_request_id,
    invalid_request,
)
from services.router.pipeline import Pipeline
from services.router.request_plan import plan_chat, plan_completion, serving_pipeline

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.v1.Inference"
DEFAULT_PORT = 50051
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "min_tokens")
M = TypeVar("M", bound=Message)


class InferenceServicer:
    """baton.v1.Inference. The methods take the serialized request and parse it
    themselves: gRPC's own deserializer would answer a malformed message with an internal
    error instead of the client's INVALID_ARGUMENT."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], api_keys: ApiKeys) -> None:
        self._get_pipeline = get_pipeline
        self._api_keys = api_keys

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, response_serializer=pb.GenerateResponse.SerializeToString
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
            ),
        }

    async def Generate(self, raw: bytes, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            tenant = self._api_keys.tenant(_authorization(context))
            request = _parse(pb.GenerateRequest, raw)
            openai_request = _openai_request(request)
            pipeline = serving_pipeline(self._get_pipeline)
            request_id = request.request_id or None
            if request_id is not None:
                try:
                    checked_request_id(request_id)
                except ValueError as e:
                    raise InvalidRequestError(f"request_id: {e}", param="request_id") from e
            if isinstance(openai_request, ChatCompletionRequest):
                plan = await asyncio.to_thread(
                    plan_chat, openai_request, pipeline, request_id, tenant
                )
            else:
                plan = await asyncio.to_thread(
                    plan_completion, openai_request, pipeline, request_id, tenant
                )
            stream = ChoiceStream(pipeline, plan)
            await stream.start()
            async for out in stream:
                yield _response(plan.request_id, out, stream.usage if stream.done else None)
        except ApiError as e:
            if isinstance(e, OverloadedError):
                # HTTP's header, and gRPC's server pushback, which a channel with a retry
                # policy waits out before its next attempt
                retry_after = str(max(1, math.ceil(e.retry_after_s)))
                pushback = str(max(1, math.ceil(e.retry_after_s * 1000)))
                context.set_trailing_metadata(
                    (("retry-after", retry_after), ("grpc-retry-pushback-ms", pushback))
                )
            await context.abort(e.grpc_code, e.message)
        except Exception as e:  # a pipeline failure, not the request's fault
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, as_api_error(e).message)

    async def ListModels(self, raw: bytes, context: Context) -> pb.ListModelsResponse:
        try:
            self._api_keys.tenant(_authorization(context))
            _parse(pb.ListModelsRequest, raw)
            pipeline = self._get_pipeline()
        except ApiError as e:
            await context.abort(e.grpc_code, e.message)
        model = pb.Model(id=pipeline.model_id, max_model_len=pipeline.max_model_len)
        return pb.ListModelsResponse(models=[model])


class PipelineHealth(health.aio.HealthServicer):
    """grpc.health.v1 for "" and baton.v1.Inference: SERVING exactly while the pipeline is
    ready. Each Check reads `ready()` afresh; while any Watch stream is open, `ready()` is
    read every `poll_s`, so a watcher (gRPC client-side health checking) hears a router
    start serving or begin to drain without anyone calling Check."""

    def __init__(self, get_pipeline: Callable[[], Pipeline], poll_s: float = 0.5) -> None:
        super().__init__()
        self._get_pipeline = get_pipeline
        self._poll_s = poll_s
        self._watchers = 0
        self._poller: asyncio.Task[None] | None = None

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        await self._refresh()
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await self._refresh()  # the first message is the status now, not the initial one
        self._watchers += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            await super().Watch(request, context)
        finally:
            self._watchers -= 1

    async def _poll(self) -> None:
        while self._watchers:
            await asyncio.sleep(self._poll_s)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            ready = self._get_pipeline().ready()
        except NotReadyError:
            ready = False
        status = health_pb2.HealthCheckResponse
        for service in ("", SERVICE_NAME):
            await self.set(service, status.SERVING if ready else status.NOT_SERVING)


def build_grpc_server(
    get_pipeline: Callable[[], Pipeline],
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    api_keys: ApiKeys | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """An unstarted server on host:port with Inference, health and reflection, and the
    port it listens on (port 0 picks a free one); `await server.start()` in the event loop
    that will serve it. With `api_keys`, Inference calls need one; messages over
    `max_request_bytes` are RESOURCE_EXHAUSTED."""
    # so_reuseport 0: a second router on this port fails instead of splitting its clients
    options = [("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    handlers = InferenceServicer(get_pipeline, api_keys or ApiKeys()).handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(PipelineHealth(get_pipeline), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == SERVICE_NAME
    assert set(handlers) == {method.name for method in service.methods}
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return server, bound


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _parse(message_type: type[M], raw: bytes) -> M:
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        name = message_type.DESCRIPTOR.full_name
        raise InvalidRequestError(f"malformed {name} message: {e}") from e


def _openai_request(request: pb.GenerateRequest) -> CompletionRequest | ChatCompletionRequest:
    """The same request as OpenAI JSON would state it, validated by the same models."""
    fields: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_FIELDS}
    fields = {name: value for name, value in fields.items() if request.HasField(name)}
    fields.update(
        model=request.model or None,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
    )
    logprobs = request.logprobs if request.HasField("logprobs") else None
    source = request.WhichOneof("input")
    try:
        if source == "messages":
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            chat_logprobs = {"logprobs": logprobs is not None, "top_logprobs": logprobs}
            return ChatCompletionRequest.model_validate(
                fields | chat_logprobs | {"messages": messages}
            )
        if source == "prompt":
            fields["prompt"] = request.prompt
        elif source == "prompt_token_ids":
            fields["prompt"] = list(request.prompt_token_ids.ids)
        else:
            raise InvalidRequestError(
                "one of prompt, prompt_token_ids or messages is required", param="input"
            )
        return CompletionRequest.model_validate(fields | {"logprobs": logprobs})
    except ValidationError as e:
        error = invalid_request(e.errors())
        if error.param == "top_logprobs":  # chat's name for this protocol's `logprobs`
            error = InvalidRequestError(
                error.message.replace("top_logprobs", "logprobs"), "logprobs"
            )
        raise error from e


def _response(request_id: str, out: ChoiceOutput, usage: Usage | None) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        request_id=request_id,
        index=out.index,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=out.finish_reason or "",
        logprobs=[
            pb.TokenLogprob(
                token_id=lp.token_id,
                token=lp.token,
                logprob=lp.logprob,
                top=[
                    pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                    for t in lp.top
                ],
            )
            for lp in out.logprobs or ()
        ],
    )
    if isinstance(out.stop_reason, str):
        message.stop_string = out.stop_reason
    elif isinstance(out.stop_reason, int):
        message.stop_token_id = out.stop_reason
    if usage is not None:
        message.usage.prompt_tokens = usage.prompt_tokens
        message.usage.completion_tokens = usage.completion_tokens
        message.usage.total_tokens = usage.total_tokens
        message.usage.cached_tokens = usage.cached_tokens
    return message
