"""A client that hangs up stops its generation at once, streaming or not."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import openai

from engine.async_engine import AsyncEngine

from .conftest import MODEL_ID, wait_until_idle

LONG = 400  # tokens the request would generate if nobody stopped it


def generated_tokens(engine: AsyncEngine) -> int:
    return engine.call(lambda e: e.stats.generated_tokens)


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
    before = generated_tokens(engine)
    body = json.dumps(
        {"prompt": "Count to a thousand:", "max_tokens": LONG, "ignore_eos": True}
    ).encode()
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while generated_tokens(engine) == before:  # wait until it is really generating
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    wait_until_idle(engine)
    assert generated_tokens(engine) - before < LONG
