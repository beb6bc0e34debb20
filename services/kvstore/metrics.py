"""KVStoreMetrics: a shard's counters, under the metric names of DESIGN.md "Telemetry".

The Stats RPC returns `samples()`; the shard's /metrics page (services.kvstore.
metrics_endpoint) publishes the same samples through `readings`, and each transfer's
duration as a histogram. Every sample carries `pool="kvstore"`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from proto.baton.v1 import kvstore_pb2 as pb
from services.telemetry import (
    KV_TRANSFER_BYTES,
    KV_TRANSFER_SECONDS,
    KV_USAGE,
    Metric,
    Reading,
)

POOL = "kvstore"

SHARD_METRICS = (
    Metric("baton_kv_store_blocks", "gauge", "Blocks the shard holds."),
    Metric("baton_kv_store_bytes", "gauge", "Bytes of the blocks the shard holds.", "By"),
    Metric("baton_kv_store_capacity_bytes", "gauge", "Bytes the shard's arena holds.", "By"),
    Metric("baton_kv_store_leases", "gauge", "Live leases."),
    Metric("baton_kv_store_leased_blocks", "gauge", "Blocks pinned by a lease."),
    Metric("baton_kv_store_hits_total", "counter", "Blocks a Get asked for and found."),
    Metric("baton_kv_store_misses_total", "counter", "Blocks a Get asked for and missed."),
    Metric("baton_prefix_cache_queried_blocks_total", "counter", "Blocks looked up in the index."),
    Metric("baton_prefix_cache_hit_blocks_total", "counter", "Blocks the index lookups found."),
    Metric("baton_kv_store_evictions_total", "counter", "Blocks evicted for room."),
    Metric("baton_kv_store_lease_expiries_total", "counter", "Leases that ran out."),
    Metric("baton_kv_store_index_errors_total", "counter", "Failed prefix index updates."),
)
PUBLISHED = (KV_USAGE, KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS, *SHARD_METRICS)
"""A shard's /metrics: DESIGN.md's KV cache use and transfers, and the shard's own."""

_READ = {m.name: m for m in PUBLISHED if m.kind != "histogram"}


@dataclass
class KVStoreMetrics:
    hits: int = 0
    """Blocks a Get asked for and this shard had."""
    misses: int = 0
    lookup_queried_blocks: int = 0
    lookup_hit_blocks: int = 0
    evictions: int = 0
    lease_expiries: int = 0
    index_errors: int = 0
    """Prefix index updates that failed (the index heals at the next reconciliation)."""
    transfer_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    transfer_seconds: dict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float)
    )
    transfers: Counter[tuple[str, str]] = field(default_factory=Counter)
    transfer_observers: list[Callable[[str, str, float], None]] = field(default_factory=list)
    """Called with (direction, transport, seconds) after each transfer."""

    def record_transfer(self, direction: str, transport: str, nbytes: int, seconds: float) -> None:
        """One finished put (`direction="put"`) or get over `transport` ("grpc" | "shm")."""
        key = (direction, transport)
        self.transfer_bytes[key] += nbytes
        self.transfer_seconds[key] += seconds
        self.transfers[key] += 1
        for observe in self.transfer_observers:
            observe(direction, transport, seconds)

    def samples(
        self,
        *,
        blocks: int,
        stored_bytes: int,
        capacity: int,
        used_bytes: int,
        leases: int,
        leased_blocks: int,
    ) -> list[pb.MetricSample]:
        """Every counter plus the arena gauges passed in, as wire samples."""
        values: list[tuple[str, dict[str, str], float]] = [
            ("baton_kv_store_blocks", {}, blocks),
            ("baton_kv_store_bytes", {}, stored_bytes),
            ("baton_kv_store_capacity_bytes", {}, capacity),
            ("baton_kv_cache_usage_ratio", {}, used_bytes / capacity),
            ("baton_kv_store_leases", {}, leases),
            ("baton_kv_store_leased_blocks", {}, leased_blocks),
            ("baton_kv_store_hits_total", {}, self.hits),
            ("baton_kv_store_misses_total", {}, self.misses),
            ("baton_prefix_cache_queried_blocks_total", {}, self.lookup_queried_blocks),
            ("baton_prefix_cache_hit_blocks_total", {}, self.lookup_hit_blocks),
            ("baton_kv_store_evictions_total", {}, self.evictions),
            ("baton_kv_store_lease_expiries_total", {}, self.lease_expiries),
            ("baton_kv_store_index_errors_total", {}, self.index_errors),
        ]
        for (direction, transport), nbytes in sorted(self.transfer_bytes.items()):
            labels = {"direction": direction, "transport": transport}
            values += [
                ("baton_kv_transfer_bytes_total", labels, nbytes),
                (
                    "baton_kv_transfer_seconds_sum",
                    labels,
                    self.transfer_seconds[direction, transport],
                ),
                ("baton_kv_transfer_seconds_count", labels, self.transfers[direction, transport]),
            ]
        return [
            pb.MetricSample(name=name, labels={"pool": POOL, **labels}, value=float(value))
            for name, labels, value in values
        ]


def readings(samples: Iterable[pb.MetricSample]) -> list[Reading]:
    """`samples` as telemetry readings (the transfer seconds' sum and count are left out:
    the page has the histogram itself)."""
    return [
        Reading(_READ[s.name], s.value, {k: v for k, v in s.labels.items() if k != "pool"})
        for s in samples
        if s.name in _READ
    ]
