"""A client that hangs up stops its generation at once, streaming or not."""

from __future__ import annotations

import json

import openai

from engine.async_engine import AsyncEngine

from .conftest import MODEL_ID, generated_tokens, hang_up_once_generating, wait_until_idle

LONG = 400  # tokens the request would generate if nobody stopped it


def test_closing_a_stream_aborts_its_request(client: openai.OpenAI, engine: AsyncEngine) -> None:
    before = generated_tokens(engine)
    stream = client.completions.create(
        model=MODEL_ID,
        prompt="Count to a thousand:",
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()
    wait_until_idle(engine)
    assert generated_tokens(engine) - before < LONG


def test_hanging_up_on_a_plain_request_aborts_it(base_url: str, engine: AsyncEngine) -> None:
    body = json.dumps(
        {"prompt": "Count to a thousand:", "max_tokens": LONG, "ignore_eos": True}
    ).encode()
    assert hang_up_once_generating(base_url, engine, "/v1/completions", body) < LONG
