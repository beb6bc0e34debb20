"""POST /v1/chat/completions answers: a started `ChoiceStream` as one `chat.completion`, or
as `chat.completion.chunk`s: each choice's role first, then its content deltas, the last
one with its finish reason, then (if asked) one chunk with the usage and no choices.

With `return_token_ids` (vLLM's) the answer carries the prompt's token ids (a stream: in
its first chunk) and each choice its own (a stream: each chunk's new ones; a chunk whose
text is held back for a forming stop string still carries its ids)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.router.choice_stream import ChoiceStream, SampledLogprob, TopLogprob
from services.router.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    UsageInfo,
    token_name,
)


async def chat_response(stream: ChoiceStream) -> ChatCompletionResponse:
    results = await stream.collect()
    plan = stream.plan
    choices = []
    for r in results:
        assert r.finish_reason is not None, "collect() returns finished choices"
        choices.append(
            ChatChoice(
                index=r.index,
                message=ChatResponseMessage(content=r.text),
                logprobs=_logprobs(r.logprobs, plan.return_tokens_as_token_ids),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                token_ids=r.token_ids if plan.return_token_ids else None,
            )
        )
    return ChatCompletionResponse(
        id=plan.request_id,
        created=int(time.time()),
        model=plan.model,
        choices=choices,
        usage=UsageInfo.of(stream.usage),
        prompt_token_ids=plan.prompts[0] if plan.return_token_ids else None,
    )


async def chat_chunks(
    stream: ChoiceStream, include_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    plan = stream.plan
    created = int(time.time())

    def chunk(*choices: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=plan.request_id, created=created, model=plan.model, choices=list(choices)
        )

    for index in range(plan.num_choices):
        first = chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
        if index == 0 and plan.return_token_ids:
            first.prompt_token_ids = plan.prompts[0]
        yield first
    async for out in stream:
        token_ids = out.token_ids if plan.return_token_ids else []
        if not out.text and not out.logprobs and not token_ids and out.finish_reason is None:
            continue  # text held back (a stop string may be forming) and nothing else to say
        yield chunk(
            ChatChunkChoice(
                index=out.index,
                delta=ChatDelta(content=out.text or None),
                logprobs=_logprobs(out.logprobs, plan.return_tokens_as_token_ids),
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                token_ids=token_ids if plan.return_token_ids else None,
            )
        )
    if include_usage:
        usage_chunk = chunk()
        usage_chunk.usage = UsageInfo.of(stream.usage)
        yield usage_chunk


def _logprobs(logprobs: list[SampledLogprob] | None, as_token_ids: bool) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    content = [
        ChatTokenLogprob(
            token=token_name(lp, as_token_ids),
            logprob=lp.logprob,
            bytes=list(lp.token_bytes),  # the text's, whatever the name (vLLM's too)
            top_logprobs=[_top(alt, as_token_ids) for alt in lp.top],
        )
        for lp in logprobs
    ]
    return ChatLogprobs(content=content)


def _top(lp: TopLogprob, as_token_id: bool) -> ChatTopLogprob:
    token = token_name(lp, as_token_id)
    raw = token.encode() if as_token_id else lp.token_bytes
    return ChatTopLogprob(token=token, logprob=lp.logprob, bytes=list(raw))
