"""Decode's release of a handoff's lease while the KV store shard does not answer: real FP8
prefill and INT4 decode servers and a real shard, frozen (SIGSTOP) from the moment decode
has pulled the handoff's blocks until a release has failed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence

import pytest

from engine.handoff import Handoff
from engine.hashing import block_hashes
from engine.sampling_params import SamplingParams
from services.kvstore.client import BlockBuffer, KVStoreClient
from services.pool_requests import DecodeRequest, PrefillRequest
from tests.services.stack import Stack

PROMPT = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: "
)
PARAMS = SamplingParams(max_tokens=4, temperature=0)


class WatchedClient:
    """Decode's store client, watched: the shard freezes once decode has pulled a handoff,
    each release's outcome (blocks released, or the error's name) is recorded, and
    `after_release` runs after each."""

    def __init__(self, client: KVStoreClient, shard_pid: int) -> None:
        self.releases: list[int | str] = []
        self.after_release: Callable[[], None] = lambda: None
        get_into, release = client.get_into, client.release

        async def then_freeze(
            hashes: Sequence[bytes], out: Sequence[BlockBuffer], timeout: float | None = None
        ) -> int:
            n = await get_into(hashes, out, timeout)
            os.kill(shard_pid, signal.SIGSTOP)
            return n

        async def recorded(lease_id: str, timeout: float | None = None) -> int:
            try:
                n = await release(lease_id, timeout)
                self.releases.append(n)
                return n
            except Exception as e:
                self.releases.append(type(e).__name__)
                raise
            finally:
                self.after_release()

        client.get_into = then_freeze  # type: ignore[method-assign]
        client.release = recorded  # type: ignore[method-assign]


async def prefill(stack: Stack, question: str) -> Handoff:
    """A handoff whose blocks decode has none of (the question salts them)."""
    card = stack.prefill.describe()
    prompt = card.tokenizer.encode(PROMPT + question)
    salt = question.encode()
    hashes = block_hashes(card.fingerprint, prompt, salt)
    handoff = await stack.prefill.prefill(PrefillRequest(question, prompt, PARAMS, salt, hashes))
    assert handoff.block_hashes and handoff.lease_id  # exported: the store pins its blocks
    return handoff


async def decode(stack: Stack, handoff: Handoff) -> None:
    salt = handoff.request_id.encode()  # prefill's: the request id is the question
    request = DecodeRequest(
        handoff.request_id, handoff.prompt_token_ids, PARAMS, salt, handoff=handoff
    )
    outputs = [out async for out in stack.decode.generate(request)]
    assert outputs[-1].finished and outputs[-1].num_output_tokens == PARAMS.max_tokens


async def until(done: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"{what} did not happen in {timeout_s:g} s")


def test_a_release_the_frozen_shard_missed_is_tried_again_until_shutdown(stack: Stack) -> None:
    """It used to be tried once: a shard that did not answer (which the client skips,
    reporting nothing released) kept the handoff's blocks pinned for the lease's TTL."""
    shard = stack.shard.proc.pid
    leases: list[float] = []

    async def scenario() -> None:
        first = await prefill(stack, "When do you open?")
        assert stack.decode.bridge is not None
        client = WatchedClient(stack.decode.bridge.client(first.fingerprint), shard)
        client.after_release = lambda: os.kill(shard, signal.SIGCONT)  # back after one miss
        await decode(stack, first)  # streams whole while its lease's release waits
        await until(lambda: len(client.releases) == 2, "a second release")
        # Missed: an error before the client knows the shards, 0 after (it skips a shard
        # that does not answer).
        assert client.releases[0] in (0, "KVStoreError")
        assert client.releases[1] == len(first.block_hashes)  # unpinned, not expired
        leases.append(await stack.read_store_leases())

        # A release waiting to try again when decode shuts down tries no more.
        second = await prefill(stack, "Can I renew a book by phone?")
        tried = asyncio.Event()
        client.after_release = tried.set  # the shard stays frozen
        await decode(stack, second)
        await tried.wait()
        waiting = set(stack.decode._background)
        assert waiting
        await stack.decode.shutdown()
        await asyncio.sleep(0)
        assert all(task.cancelled() for task in waiting)
        assert client.releases[2:] in ([0], ["KVStoreError"])
        os.kill(shard, signal.SIGCONT)
        leases.append(await stack.read_store_leases())

    try:
        asyncio.run(scenario())
    finally:
        os.kill(shard, signal.SIGCONT)
    assert leases == [0, 1]  # the second handoff's lease is left to its TTL
