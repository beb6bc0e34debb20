"""Trace context over gRPC metadata (W3C `traceparent`), for grpc.aio channels and servers.

    grpc.aio.insecure_channel(address, interceptors=client_interceptors())
    grpc.aio.server(interceptors=server_interceptors())

The client side copies the current span's context into each call's metadata; the server
side runs a call that brings one inside a SERVER span, the caller's child. Both are
installed only when this process records spans (`tracing_enabled()`): without tracing,
channels and servers carry no interceptor at all, so the KV transfer path pays nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from grpc.aio import ClientCallDetails
from opentelemetry import trace
from opentelemetry.context import Context

from services.tracing import extract, inject, tracer, tracing_enabled

_TRACE_HEADERS = ("traceparent", "tracestate")


# grpc.aio files each interceptor under the first call type it implements: one class each.
class _InjectUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _InjectUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


class _InjectStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_trace_context(details), requests)


class _InjectStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_trace_context(details), requests)


def _with_trace_context(details: ClientCallDetails) -> ClientCallDetails:
    headers = inject()
    if not headers:
        return details
    metadata = [*(details.metadata or ()), *headers.items()]
    return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _ServeInCallerSpan(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        metadata = details.invocation_metadata or ()
        carrier = {k: v for k, v in metadata if k in _TRACE_HEADERS and isinstance(v, str)}
        if handler is None or "traceparent" not in carrier:
            return handler
        return _traced(handler, details.method, extract(carrier))


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    if not tracing_enabled():
        return []
    return [_InjectUnaryUnary(), _InjectUnaryStream(), _InjectStreamUnary(), _InjectStreamStream()]


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [_ServeInCallerSpan()] if tracing_enabled() else []


def _traced(handler: grpc.RpcMethodHandler, method: str, parent: Context) -> grpc.RpcMethodHandler:
    service, _, name = method.lstrip("/").rpartition("/")

    @contextmanager
    def span() -> Iterator[None]:
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        with tracer.start_as_current_span(
            f"{service}/{name}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        ):
            yield

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Any) -> Any:
            with span():
                return await behavior(request, context)

        return call

    def streaming(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            with span():
                async for response in behavior(request, context):
                    yield response

        return call

    serialize = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serialize)
    assert handler.stream_stream, handler
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serialize)
