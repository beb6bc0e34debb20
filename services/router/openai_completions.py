"""POST /v1/completions answers: a started `ChoiceStream` as one `text_completion` object,
or as the chunks of a stream (same object type, one choice increment each).

With `return_token_ids` (vLLM's) each choice carries its prompt's token ids and its own:
a stream sends the prompt's with the choice's first chunk, then each chunk's new ids (a
chunk whose text is held back for a forming stop string still carries its ids).

`text_offset` is where a token's text starts in the choice's text, counted in characters
of the text as sent (a token holding part of a character starts where that character
does); a token a stop string cut off sits at the text's end. A stream sends a token's
logprobs once the text before it is out, so its offset is the final one there too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.router.choice_stream import ChoiceStream, SampledLogprob
from services.router.openai_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
    token_name,
)


async def completion_response(stream: ChoiceStream) -> CompletionResponse:
    results = await stream.collect()
    plan = stream.plan
    as_token_ids = plan.return_tokens_as_token_ids
    choices = []
    for r in results:
        logprobs = None if r.logprobs is None else _logprobs(r.logprobs, len(r.text), as_token_ids)
        choices.append(
            CompletionChoice(
                index=r.index,
                text=r.text,
                logprobs=logprobs,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                prompt_token_ids=plan.prompts[plan.prompt_of(r.index)]
                if plan.return_token_ids
                else None,
                token_ids=r.token_ids if plan.return_token_ids else None,
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
    sent = [0] * plan.num_choices  # characters of each choice's text
    held: list[list[SampledLogprob]] = [[] for _ in range(plan.num_choices)]
    unsent_prompt = set(range(plan.num_choices)) if plan.return_token_ids else set()
    async for out in stream:
        sent[out.index] += len(out.text)
        logprobs = None
        if out.logprobs is not None:
            # Until the text before a token is out, a stop string may still cut it short.
            pending = held[out.index] + out.logprobs
            ready = len(pending)
            if out.finish_reason is None:
                ready = sum(1 for lp in pending if lp.text_offset <= sent[out.index])
            held[out.index] = pending[ready:]
            logprobs = _logprobs(pending[:ready], sent[out.index], plan.return_tokens_as_token_ids)
        token_ids = out.token_ids if plan.return_token_ids else []
        if (
            not out.text
            and not (logprobs and logprobs.tokens)
            and not token_ids
            and out.finish_reason is None
        ):
            continue  # text held back (a stop string may be forming) and nothing else to say
        choice = CompletionChoice(
            index=out.index,
            text=out.text,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
        )
        if plan.return_token_ids:
            choice.token_ids = token_ids
            if out.index in unsent_prompt:
                unsent_prompt.discard(out.index)
                choice.prompt_token_ids = plan.prompts[plan.prompt_of(out.index)]
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


def _logprobs(
    logprobs: list[SampledLogprob], text_end: int, as_token_ids: bool
) -> CompletionLogprobs:
    """The legacy logprobs object of a choice whose text has `text_end` characters (so far).

    `top_logprobs` holds the sampled token besides the top alternatives, so up to
    `logprobs` + 1 entries, as the OpenAI API documents. Offsets stay in the text when
    tokens are named `token_id:<id>` (vLLM adds up the names' lengths there instead)."""
    out = CompletionLogprobs()
    for lp in logprobs:
        token = token_name(lp, as_token_ids)
        top = {token_name(alt, as_token_ids): alt.logprob for alt in lp.top}
        top.setdefault(token, lp.logprob)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(min(lp.text_offset, text_end))
    return out
