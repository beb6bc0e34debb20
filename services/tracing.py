"""Tracing: one trace per request, router -> prefill -> kv put -> kv get -> decode.

Spans use the OpenTelemetry API; a process exports them only once `configure_tracing`
installed an SDK provider, which it does when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: OTLP over gRPC, or over HTTP when
`OTEL_EXPORTER_OTLP_PROTOCOL` says `http/protobuf`. Otherwise every span is a no-op.

The context crosses processes as W3C `traceparent` text: in the `trace_context` field of
the requests the router sends its pools (`inject` fills it where a request is made), and
in gRPC metadata to the KV store (`services.grpc_tracing`).

Span attributes follow the OpenTelemetry GenAI conventions (`gen_ai.*`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.types import AttributeValue

from engine.sampling_params import SamplingParams

tracer = trace.get_tracer("baton")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configure_tracing(service: str) -> bool:
    """Export this process's spans over OTLP if an endpoint is configured; True if so.

    Idempotent: a process that already has an SDK provider keeps it. `OTEL_SERVICE_NAME`
    overrides `service`.
    """
    if tracing_enabled() or not any(os.environ.get(v) for v in ENDPOINT_VARIABLES):
        return tracing_enabled()
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    name = os.environ.get("OTEL_SERVICE_NAME", service)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def tracing_enabled() -> bool:
    """Whether spans of this process are recorded (an SDK provider is installed)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def inject() -> dict[str, str]:
    """The current span's context as W3C headers; empty when nothing is traced."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context:
    """The context `inject` wrote, to parent a span in another process."""
    return propagate.extract(carrier)


def request_attributes(
    model: str,
    request_id: str,
    params: SamplingParams,
    prompt_tokens: int,
    operation: str | None = None,
) -> dict[str, AttributeValue]:
    """`gen_ai.*` attributes of a generation request, as the router or a pool sees it.
    `operation` is the API's (`chat`, `text_completion`): the router's span names it; a
    pool's request does not carry it, so its spans leave it to their parent's."""
    attributes: dict[str, AttributeValue] = {
        "gen_ai.provider.name": "baton",
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.usage.input_tokens": prompt_tokens,
        "baton.request_id": request_id,
    }
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = list(params.stop)
    return attributes
