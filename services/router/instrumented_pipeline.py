"""InstrumentedPipeline: any pipeline, with each request measured and traced at the router.

Every request gets a "router" span: the child of the context in
`GenerationRequest.trace_context` if the front end put one there, else of the current span
(the HTTP server span FastAPI makes from the client's `traceparent`), else a new trace's
root. Pool requests made under it carry its context on (services.pool_requests).
Latencies are the client's, as the router sees its stream:

    TTFT  arrival -> first token      labelled with the pool that computed it, per request
                                      (RequestOutput.first_token_pool; "decode" when the
                                      inner pipeline is one engine)
    ITL   gap between later tokens    per token, pool="decode"
    e2e   arrival -> last token       pool="router"
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator

from opentelemetry import context, trace
from opentelemetry.util.types import AttributeValue

from engine.outputs import RequestOutput
from services.router.pipeline import GenerationRequest, Pipeline
from services.telemetry import E2E, ITL, TTFT, Telemetry
from services.tracing import extract, request_attributes, tracer


class InstrumentedPipeline(Pipeline):
    def __init__(self, inner: Pipeline, telemetry: Telemetry) -> None:
        self.inner = inner
        self.telemetry = telemetry
        self.model_id = inner.model_id
        self.tokenizer = inner.tokenizer
        self.max_model_len = inner.max_model_len
        self.vocab_size = inner.vocab_size

    def ready(self) -> bool:
        return self.inner.ready()

    @property
    def max_choices(self) -> int | None:
        return self.inner.max_choices

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        arrival = time.perf_counter()
        attributes = request_attributes(
            self.model_id,
            request.request_id,
            request.params,
            len(request.prompt_token_ids),
            request.operation,
        )
        span = tracer.start_span(
            "router",
            context=extract(request.trace_context) if request.trace_context else None,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )
        # Current only while the inner pipeline runs, never across this generator's
        # yields: the consumer may resume or close it from another context.
        current = trace.set_span_in_context(span)
        outputs = self.inner.generate(request)
        last_token_at: float | None = None
        try:
            while True:
                token = context.attach(current)
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    break
                finally:
                    context.detach(token)
                now = time.perf_counter()
                if out.new_token_ids:
                    self._record_tokens(arrival, last_token_at, now, out)
                    last_token_at = now
                if out.finished:
                    self.telemetry.record(E2E, now - arrival)
                    span.set_attributes(_usage(out))
                yield out
        except Exception as e:
            span.record_exception(e)
            span.set_status(trace.StatusCode.ERROR, repr(e))
            raise
        finally:
            if isinstance(outputs, AsyncGenerator):  # closed now, not when collected
                await outputs.aclose()
            span.end()

    def _record_tokens(
        self, arrival: float, last: float | None, now: float, out: RequestOutput
    ) -> None:
        """`out`'s tokens arrived at `now`; the last ones before at `last` (None: these are
        the first). Tokens arriving together share the gap, as vLLM counts them."""
        if last is None:
            pool = out.first_token_pool or "decode"  # untagged: one engine prefilled
            self.telemetry.record(TTFT, now - arrival, pool=pool)
            return
        n = len(out.new_token_ids)
        for _ in range(n):
            self.telemetry.record(ITL, (now - last) / n, pool="decode")


def _usage(out: RequestOutput) -> dict[str, AttributeValue]:
    return {
        "gen_ai.usage.output_tokens": out.num_output_tokens,
        "gen_ai.response.finish_reasons": [out.finish_reason or "unknown"],
        "baton.cached_tokens": out.num_cached_tokens,
    }
