"""Releasing a handoff's lease while the KV store shard does not answer (frozen with
SIGSTOP): LeaseReleaser, the one implementation that decode, prefill and the router use,
on a real shard process; then decode's release through real FP8 prefill and INT4 decode
servers, the shard frozen from the moment decode has pulled the handoff's blocks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest

from engine.handoff import Handoff
from engine.hashing import block_hashes
from engine.sampling_params import SamplingParams
from services.kvstore.client import BlockBuffer, ClientConfig, KVStoreClient, Lease
from services.kvstore.lease_releaser import LeaseReleaser
from services.pool_requests import DecodeRequest, PrefillRequest
from services.router.pool_clients import StorePrefixIndex
from tests.ports import free_port
from tests.services.kvstore.conftest import FINGERPRINT, FORMAT, make_blocks, make_hashes
from tests.services.stack import Shard, Stack

PROMPT = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely. Question: "
)
PARAMS = SamplingParams(max_tokens=4, temperature=0)


TRY_S = 0.5  # each release try's timeout: a frozen shard misses it


class Backoffs:
    """A LeaseReleaser's sleep that waits for nothing: it records each backoff asked for,
    then runs `then`."""

    def __init__(self, then: Callable[[], None] = lambda: None) -> None:
        self.delays: list[float] = []
        self.then = then

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.then()


@contextmanager
def frozen(shard: Shard) -> Iterator[None]:
    os.kill(shard.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(shard.proc.pid, signal.SIGCONT)


async def pinned_lease(shard: Shard, lease_id: str, seed: int) -> KVStoreClient:
    """A client that has pinned two blocks of its own (`seed`) under `lease_id`; it knows
    the shards from then on."""
    client = KVStoreClient([shard.address], FINGERPRINT, FORMAT, ClientConfig(timeout_s=TRY_S))
    lease = Lease.new(ttl_s=60, lease_id=lease_id)
    await client.put(make_hashes(2, seed), list(make_blocks(2, seed)), lease=lease)
    return client


async def leases(client: KVStoreClient) -> float:
    return sum(s["baton_kv_store_leases"] for s in (await client.stats()).values())


def test_the_routers_release_is_tried_again_until_the_frozen_shard_answers(shard: Shard) -> None:
    """The router tried once: a shard that did not answer (which the client skipped,
    reporting nothing released) kept an abandoned handoff's blocks pinned for the TTL."""

    async def scenario() -> None:
        client = await pinned_lease(shard, "router-lease", seed=1)
        backoffs = Backoffs(then=lambda: os.kill(shard.proc.pid, signal.SIGCONT))
        index = StorePrefixIndex(client, LeaseReleaser(sleep=backoffs))
        before = await leases(client)
        with frozen(shard):
            index.release("router-lease")  # returns at once: the request never waits
            assert index.releaser.pending == 1
            await until(lambda: index.releaser.pending == 0, "the release")
        assert backoffs.delays == [1.0]  # missed once, then released
        assert await leases(client) == before - 1
        await index.close()

    asyncio.run(scenario())


def test_a_release_is_left_to_the_ttl_after_its_attempts(
    shard: Shard, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        client = await pinned_lease(shard, "expiring-lease", seed=2)
        backoffs = Backoffs()
        releaser = LeaseReleaser(attempts=3, backoff_s=1.0, sleep=backoffs)
        with frozen(shard), caplog.at_level(logging.WARNING):
            assert await releaser.release(client, "expiring-lease", timeout=TRY_S) is False
        assert backoffs.delays == [1.0, 2.0]  # three tries, and no fourth
        # What the lease holds now is not the releaser's to say: the thawed shard may
        # still act on the releases it received frozen (gRPC's deadline is a duration,
        # counted from when the shard reads the call), so it is not asserted here; the
        # shard is the module's, so the lease goes before the next test.
        await client.release("expiring-lease")
        await client.close()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("lease expiring-lease: not released in 3 tries (last: lease ")
    assert warnings[0].endswith("); it expires with its TTL")


def test_closing_cancels_the_releases_still_trying() -> None:
    """Shutdown does not wait out the backoffs: releases still trying are cancelled and
    awaited (none is left to the loop, or collected while it runs), later ones not begun."""
    waiting: list[str] = []

    async def scenario() -> None:
        never = asyncio.Event()

        async def backoff(delay: float) -> None:
            waiting.append("waiting")
            try:
                await never.wait()
            except asyncio.CancelledError:
                waiting.append("cancelled")
                raise

        nobody = f"127.0.0.1:{free_port()}"  # a shard that is down: each try fails at once
        client = KVStoreClient([nobody], FINGERPRINT, FORMAT, ClientConfig(timeout_s=TRY_S))
        releaser = LeaseReleaser(sleep=backoff)
        releaser.release_in_background(client, "L")
        await until(lambda: waiting == ["waiting"], "a failed try")
        assert releaser.pending == 1
        await releaser.close()
        assert waiting == ["waiting", "cancelled"] and releaser.pending == 0
        releaser.release_in_background(client, "M")
        await client.close()

    asyncio.run(scenario())


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


def test_decodes_release_the_frozen_shard_missed_is_tried_again_until_shutdown(
    stack: Stack,
) -> None:
    """Decode's release goes through LeaseReleaser too: tried again after a miss, and
    cancelled when decode shuts down."""
    shard = stack.shard.proc.pid
    leases: list[float] = []

    async def scenario() -> None:
        first = await prefill(stack, "When do you open?")
        assert stack.decode.bridge is not None
        client = WatchedClient(stack.decode.bridge.client(first.fingerprint), shard)
        client.after_release = lambda: os.kill(shard, signal.SIGCONT)  # back after one miss
        await decode(stack, first)  # streams whole while its lease's release waits
        await until(lambda: len(client.releases) == 2, "a second release")
        assert client.releases[0] == "KVStoreError"  # missed: the shard did not answer
        assert client.releases[1] == len(first.block_hashes)  # unpinned, not expired
        leases.append(await stack.read_store_leases())

        # A release waiting to try again when decode shuts down tries no more.
        second = await prefill(stack, "Can I renew a book by phone?")
        tried = asyncio.Event()
        client.after_release = tried.set  # the shard stays frozen
        await decode(stack, second)
        await tried.wait()
        releaser = stack.decode.bridge.releaser
        assert releaser.pending == 1  # waiting out its backoff
        await stack.decode.shutdown()
        assert client.releases[2:] == ["KVStoreError"]  # not tried again
        os.kill(shard, signal.SIGCONT)
        leases.append(await stack.read_store_leases())

    try:
        asyncio.run(scenario())
    finally:
        os.kill(shard, signal.SIGCONT)
    assert leases == [0, 1]  # the second handoff's lease is left to its TTL
