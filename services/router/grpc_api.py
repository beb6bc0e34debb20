"""The gRPC front end: `baton.v1.Inference` (proto/baton/v1/inference.proto) over a
`Pipeline`, with grpc.health.v1 and server reflection.

A GenerateRequest is mapped onto the OpenAI request models and planned by the same code as
HTTP, so both protocols accept, reject and sample alike; only the framing differs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc.aio import ServicerContext as Context
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.choice_stream import ChoiceOutput, ChoiceStream, Usage
from services.router.errors import ApiError, InvalidRequestError, NotReadyError, OverloadedError
from services.router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
)
from services.router.pipeline import Pipeline
from services.router.request_plan import plan_chat, plan_completion, serving_pipeline

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.v1.Inference"
DEFAULT_PORT = 50051
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "min_tokens")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, get_pipeline: Callable[[], Pipeline]) -> None:
        self._get_pipeline = get_pipeline

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            openai_request = _openai_request(request)
            pipeline = serving_pipeline(self._get_pipeline)
            request_id = request.request_id or None
            if isinstance(openai_request, ChatCompletionRequest):
                plan = plan_chat(openai_request, pipeline, request_id)
            else:
                plan = plan_completion(openai_request, pipeline, request_id)
            stream = ChoiceStream(pipeline, plan)
            await stream.start()
            async for out in stream:
                yield _response(plan.request_id, out, stream.usage if stream.done else None)
        except ApiError as e:
            if isinstance(e, OverloadedError):
                retry_after = str(max(1, math.ceil(e.retry_after_s)))
                context.set_trailing_metadata((("retry-after", retry_after),))
            await context.abort(e.grpc_code, e.message)
        except Exception as e:  # a pipeline failure, not the request's fault
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {e!r}")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        try:
            pipeline = self._get_pipeline()
        except ApiError as e:
            await context.abort(e.grpc_code, e.message)
        model = pb.Model(id=pipeline.model_id, max_model_len=pipeline.max_model_len)
        return pb.ListModelsResponse(models=[model])


class PipelineHealth(health.aio.HealthServicer):
    """grpc.health.v1 for "" and baton.v1.Inference: SERVING exactly while the pipeline is
    ready. Each Check reads `ready()` afresh, and Watch streams see the changes it finds."""

    def __init__(self, get_pipeline: Callable[[], Pipeline]) -> None:
        super().__init__()
        self._get_pipeline = get_pipeline

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        try:
            ready = self._get_pipeline().ready()
        except NotReadyError:
            ready = False
        status = health_pb2.HealthCheckResponse
        for service in ("", SERVICE_NAME):
            await self.set(service, status.SERVING if ready else status.NOT_SERVING)
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response


def build_grpc_server(
    get_pipeline: Callable[[], Pipeline], port: int = DEFAULT_PORT, host: str = "0.0.0.0"
) -> grpc.aio.Server:
    """An unstarted server on host:port with Inference, health and reflection; `await
    server.start()` in the event loop that will serve it."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(get_pipeline), server)
    health_pb2_grpc.add_HealthServicer_to_server(PipelineHealth(get_pipeline), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    assert pb.DESCRIPTOR.services_by_name["Inference"].full_name == SERVICE_NAME
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return server


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
