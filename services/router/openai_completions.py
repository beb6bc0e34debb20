"""POST /v1/completions answers: a started `ChoiceStream` as one `text_completion` object,
or as the chunks of a stream (same object type, one choice increment each)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.router.choice_stream import ChoiceStream, SampledLogprob
from services.router.openai_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
)


async def completion_response(stream: ChoiceStream) -> CompletionResponse:
    results = await stream.collect()
    choices = []
    for r in results:
        logprobs = None if r.logprobs is None else _logprobs(r.logprobs, 0)[0]
        choices.append(
            CompletionChoice(
                index=r.index,
                text=r.text,
                logprobs=logprobs,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
            )
        )
    return CompletionResponse(
        id=stream.plan.request_id,
        created=int(time.time()),
        model=stream.plan.model,
        choices=choices,
        usage=UsageInfo.of(stream.usage),
    )


async def completion_chunks(
    stream: ChoiceStream, include_usage: bool
) -> AsyncIterator[CompletionResponse]:
    plan = stream.plan
    created = int(time.time())
    text_offsets = [0] * plan.num_choices
    async for out in stream:
        if not out.text and not out.logprobs and out.finish_reason is None:
            continue  # text held back (a stop string may be forming) and nothing else to say
        logprobs = None
        if out.logprobs is not None:
            logprobs, text_offsets[out.index] = _logprobs(out.logprobs, text_offsets[out.index])
        choice = CompletionChoice(
            index=out.index,
            text=out.text,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )
        yield CompletionResponse(
            id=plan.request_id, created=created, model=plan.model, choices=[choice]
        )
    if include_usage:
        yield CompletionResponse(
            id=plan.request_id,
            created=created,
            model=plan.model,
            choices=[],
            usage=UsageInfo.of(stream.usage),
        )


def _logprobs(logprobs: list[SampledLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
    """The legacy logprobs object, and the text offset after its last token.

    `top_logprobs` holds the sampled token besides the top alternatives, so up to
    `logprobs` + 1 entries, as the OpenAI API documents."""
    out = CompletionLogprobs()
    for lp in logprobs:
        top = {alt.token: alt.logprob for alt in lp.top}
        top.setdefault(lp.token, lp.logprob)
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out, offset
