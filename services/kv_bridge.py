"""Moves KV blocks between one engine's paged cache and the KV store.

Prefill uses `fetch` to pull a cached prefix it lacks and `export` to publish the prompt's
blocks under a lease; decode uses `fetch` to pull a handoff. Blocks travel straight
between the store and their slots in the block-major cache: no staging copies.

Each transfer is a span ("kv get", "kv put") of the request's trace and an observation of
`baton_kv_transfer_seconds` on the owning worker's telemetry; `bytes` counts what moved.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from opentelemetry import trace

from engine.async_engine import AsyncEngine
from engine.hashing import KVFingerprint
from services.kvstore.client import ClientConfig, KVStoreClient, Lease
from services.kvstore.gather import gather_or_cancel
from services.kvstore.lease_releaser import LeaseReleaser
from services.kvstore.security import ClientSecurity
from services.telemetry import KV_TRANSFER_SECONDS, Telemetry
from services.tracing import tracer


class KVBridge:
    def __init__(
        self,
        engine: AsyncEngine,
        targets: Sequence[str],
        timeout_s: float,
        lease_ttl_s: float,
        security: ClientSecurity | None = None,
        releaser: LeaseReleaser | None = None,
    ) -> None:
        self.engine = engine
        self.targets = list(targets)
        self.security = security or ClientSecurity()  # the shards' token and TLS
        self.timeout_s = timeout_s
        self.lease_ttl_s = lease_ttl_s
        self.block_format = engine.engine.block_format
        self._clients: dict[bytes, KVStoreClient] = {}
        self.bytes: Counter[str] = Counter()  # by direction: "get" into the cache, "put" out
        self.telemetry: Telemetry | None = None  # the worker's: transfer durations go there
        self.releaser = releaser or LeaseReleaser()

    def client(self, fingerprint: KVFingerprint) -> KVStoreClient:
        """One client per fingerprint: it verifies every block it receives against it."""
        if fingerprint.digest not in self._clients:
            self._clients[fingerprint.digest] = KVStoreClient(
                self.targets,
                fingerprint,
                self.block_format,
                ClientConfig(timeout_s=self.timeout_s, security=self.security),
            )
        return self._clients[fingerprint.digest]

    async def close(self) -> None:
        await self.releaser.close()  # before the clients its releases use
        for c in self._clients.values():
            await c.close()

    async def cached_in_store(self, fingerprint: KVFingerprint, hashes: Sequence[bytes]) -> int:
        """Length of the longest prefix of `hashes` the store holds."""
        return len(await self.client(fingerprint).lookup(hashes))

    async def fetch(self, fingerprint: KVFingerprint, hashes: Sequence[bytes]) -> list[int]:
        """Pin the blocks of the longest prefix of `hashes` this engine can have: those it
        caches already, then those the store serves, pulled into reserved slots. Returns
        their slots, in order, pinned for `add_request(pinned_blocks=...)`.

        Raises on transport or integrity errors, having released everything it pinned; a
        cancelled fetch, too, ends holding nothing. The loop never waits for a step.
        """
        port = self.engine.engine.port
        wanted = list(hashes)
        pinned: list[int] = []  # what `begin` pinned; only the engine thread touches it

        def begin(_: object) -> tuple[list[int], list[int] | None]:
            have = port.pin_cached(wanted)
            pinned.extend(have)
            ids = port.reserve(len(wanted) - len(have))
            pinned.extend(ids or [])
            return have, ids

        try:
            have, ids = await self.engine.acall(begin)
        except BaseException:
            # Cancelled (or failed) before the answer came: `begin` runs all the same, and
            # its pins would be lost with its answer. This command, queued behind it, gives
            # back what it pinned; queued at once, so a second cancel cannot skip it, and
            # awaited, so a fetch that ends holds nothing.
            await self.engine.acall(lambda _: port.release(pinned))
            raise
        missing = wanted[len(have) :]
        if not missing or ids is None:  # nothing to pull, or no room to pull it into
            return have
        n, ok = 0, False
        t = time.perf_counter()
        with tracer.start_as_current_span("kv get", kind=trace.SpanKind.CLIENT) as span:
            span.set_attributes({"baton.kv.blocks": len(missing), "baton.kv.cached": len(have)})
            try:
                n = await self.client(fingerprint).get_into(
                    missing, [port.block(i) for i in ids], timeout=self.timeout_s
                )
                ok = True
            finally:

                def settle(_: object) -> None:
                    port.release(ids[n:])
                    try:
                        # ValueError: fp8 blocks quantized with other scales; none named
                        port.publish(ids[:n], missing[:n])
                    except ValueError:
                        port.release(have + ids[:n])
                        raise
                    if not ok:
                        port.release(have + ids[:n])

                await self.engine.acall(settle)
                self._moved("get", n, time.perf_counter() - t)
                span.set_attribute("baton.kv.received_blocks", n)
        return have + ids[:n]

    async def export(
        self, fingerprint: KVFingerprint, request_id: str, stored_prefix: int, lease_id: str
    ) -> Lease:
        """Put a finished prefill's held prompt blocks the store lacks (all after the first
        `stored_prefix`), pinning every block of the prompt under the lease `lease_id`."""
        port = self.engine.engine.port
        held = await self.engine.acall(lambda _: port.held(request_id))
        lease = Lease.new(self.lease_ttl_s, lease_id)
        with tracer.start_as_current_span("kv put", kind=trace.SpanKind.CLIENT) as span:
            span.set_attributes({"baton.kv.blocks": len(held), "baton.kv.leased": stored_prefix})
            try:
                await self._export(fingerprint, held, stored_prefix, lease)
            except BaseException:
                # Failed or cancelled part-way: what the store pinned so far must not stay
                # pinned for the lease's TTL. Released in the background: a cancelled task
                # cannot wait.
                self.release(fingerprint, lease.lease_id)
                raise
        return lease

    async def _export(
        self,
        fingerprint: KVFingerprint,
        held: list[tuple[bytes, int]],
        stored_prefix: int,
        lease: Lease,
    ) -> None:
        port = self.engine.engine.port
        hashes = [h for h, _ in held]
        client = self.client(fingerprint)
        t = time.perf_counter()
        leased, _ = await gather_or_cancel(
            client.lease(hashes[:stored_prefix], lease, timeout=self.timeout_s),
            client.put(
                hashes[stored_prefix:],
                [port.block(i) for _, i in held[stored_prefix:]],
                lease=lease,
                timeout=self.timeout_s,
            ),
        )
        put = len(hashes) - stored_prefix
        present = set(leased)
        gone = [(h, i) for h, i in held[:stored_prefix] if h not in present]
        if gone:
            # Evicted since the lookup: put them again rather than hand over a gap.
            await client.put(
                [h for h, _ in gone],
                [port.block(i) for _, i in gone],
                lease=lease,
                timeout=self.timeout_s,
            )
        self._moved("put", put + len(gone), time.perf_counter() - t)

    def _moved(self, direction: str, blocks: int, seconds: float) -> None:
        self.bytes[direction] += blocks * self.block_format.nbytes
        if self.telemetry is not None:
            self.telemetry.record(KV_TRANSFER_SECONDS, seconds, direction=direction)

    def release(self, fingerprint: KVFingerprint, lease_id: str) -> None:
        """Unpins a lease in the background, trying again while a shard does not answer
        (LeaseReleaser); no request waits for it or fails over it."""
        self.releaser.release_in_background(self.client(fingerprint), lease_id, self.timeout_s)
