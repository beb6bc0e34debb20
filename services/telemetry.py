"""Telemetry: one process's metrics, kept by the OpenTelemetry SDK, as a Prometheus page.

Every Baton process (the router, each prefill and decode replica, each kvstore shard)
owns one `Telemetry`. Events are recorded on its histograms as they happen
(`record(TTFT, seconds)`); what a component counts anyway (engine token counts, queue
lengths, bytes moved, fallbacks) is read when the page is collected, through `observe`.
Series carry DESIGN.md "Telemetry"'s labels `pool` and `model`.

    replica:  collect() -> [Series]          (plain and picklable: it crosses Ray)
    router:   render(every router and pool replica's series)  -> its GET /metrics
    kvstore:  render(the shard's series)                      -> its GET /metrics

Series with the same name and labels (one pool's replicas) merge when rendered: counters
and histograms add, gauges add too (queue lengths) unless they are ratios, which average
(KV cache use). The Gateway API Inference Extension's endpoint picker reads two vLLM
names; they are rendered as aliases of ours for the worker pools.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from statistics import fmean
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]
WORKER_POOLS = ("prefill", "decode")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    *(0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0),
    *(60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)


@dataclass(frozen=True)
class Metric:
    """One metric name: its kind, help text and unit (`1` marks a ratio)."""

    name: str
    kind: Kind
    help: str
    unit: str = ""
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        assert (self.kind == "histogram") == bool(self.buckets), self


TTFT = Metric(
    "baton_time_to_first_token_seconds",
    "histogram",
    "Time from the router receiving a request to its first token, by the pool serving "
    "first tokens.",
    "s",
    TTFT_BUCKETS,
)
ITL = Metric(
    "baton_inter_token_latency_seconds",
    "histogram",
    "Time between two tokens of a request's stream, as the router receives them.",
    "s",
    ITL_BUCKETS,
)
E2E = Metric(
    "baton_e2e_request_latency_seconds",
    "histogram",
    "Time from the router receiving a request to its last token.",
    "s",
    REQUEST_BUCKETS,
)
QUEUE_TIME = Metric(
    "baton_request_queue_time_seconds",
    "histogram",
    "Time from the router sending a request to a pool until a replica took it up.",
    "s",
    REQUEST_BUCKETS,
)
KV_TRANSFER_SECONDS = Metric(
    "baton_kv_transfer_seconds",
    "histogram",
    "Duration of one KV block transfer to or from the store.",
    "s",
    TTFT_BUCKETS,
)
RUNNING = Metric("baton_num_requests_running", "gauge", "Requests in a running batch.")
WAITING = Metric("baton_num_requests_waiting", "gauge", "Requests queued for a batch.")
KV_USAGE = Metric(
    "baton_kv_cache_usage_ratio", "gauge", "Fraction of the KV cache's blocks in use.", "1"
)
PREFIX_QUERIED = Metric(
    "baton_prefix_cache_queried_tokens_total",
    "counter",
    "Prompt tokens looked up in the prefix cache.",
)
PREFIX_HIT = Metric(
    "baton_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache."
)
KV_TRANSFER_BYTES = Metric(
    "baton_kv_transfer_bytes_total", "counter", "KV bytes moved to or from the store.", "By"
)
PROMPT_TOKENS = Metric("baton_prompt_tokens_total", "counter", "Prompt tokens admitted.")
GENERATION_TOKENS = Metric("baton_generation_tokens_total", "counter", "Tokens generated.")
FALLBACKS = Metric(
    "baton_local_prefill_fallback_total",
    "counter",
    "Requests the decode pool prefilled itself, by reason.",
)
MIGRATIONS = Metric(
    "baton_request_migrations_total",
    "counter",
    "Requests moved to another decode replica after theirs failed.",
)
METRICS = (
    TTFT,
    ITL,
    E2E,
    QUEUE_TIME,
    KV_TRANSFER_SECONDS,
    RUNNING,
    WAITING,
    KV_USAGE,
    PREFIX_QUERIED,
    PREFIX_HIT,
    KV_TRANSFER_BYTES,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    FALLBACKS,
    MIGRATIONS,
)
"""DESIGN.md "Telemetry"'s metrics; every process can record or observe each of them."""

ALIASES = {
    WAITING.name: "vllm:num_requests_waiting",
    KV_USAGE.name: "vllm:kv_cache_usage_perc",
}


@dataclass(frozen=True)
class Series:
    """One collected time series. Histograms: `counts` per bucket of `bounds` (the last
    bucket is +Inf) and `value` their sum; counters and gauges: `value`."""

    metric: Metric
    labels: Labels
    value: float
    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """A process's series, named by `source` so the router can tell replicas apart."""

    source: str
    series: tuple[Series, ...]


@dataclass(frozen=True)
class Reading:
    """A value an `observe` callback read: a counter's running total or a gauge's level."""

    metric: Metric
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


class Telemetry:
    """The `metrics` of one process; `pool` and `model` label every series unless a record
    or reading overrides them (the router records TTFT under the pool serving it)."""

    def __init__(
        self, pool: str, model: str | None = None, metrics: Sequence[Metric] = METRICS
    ) -> None:
        self.pool = pool
        self.model = model
        self.source = uuid.uuid4().hex
        self._metrics = {m.name: m for m in metrics}
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": f"baton-{pool}"}),
        )
        meter = self._provider.get_meter("baton")
        self._histograms: dict[str, Histogram] = {}
        for m in self._metrics.values():
            callbacks = [partial(self._observations, m.name)]
            if m.kind == "histogram":
                self._histograms[m.name] = meter.create_histogram(
                    m.name, m.unit, m.help, explicit_bucket_boundaries_advisory=m.buckets
                )
            elif m.kind == "gauge":
                meter.create_observable_gauge(m.name, callbacks, m.unit, m.help)
            else:
                meter.create_observable_counter(m.name, callbacks, m.unit, m.help)
        self._observers: list[Callable[[], Iterable[Reading]]] = []
        self._lock = threading.Lock()  # collect() fills _observed for the SDK's callbacks
        self._observed: dict[str, list[Observation]] = {}

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics this process records or observes: its page declares each."""
        return tuple(self._metrics.values())

    def labels(self, **extra: str) -> dict[str, str]:
        base = {"pool": self.pool}
        if self.model is not None:
            base["model"] = self.model
        return {**base, **extra}

    def record(self, metric: Metric, value: float, **labels: str) -> None:
        """One observation of a histogram, e.g. `record(TTFT, 0.21, pool="prefill")`."""
        self._histograms[metric.name].record(value, self.labels(**labels))

    def observe(self, read: Callable[[], Iterable[Reading]]) -> None:
        """Call `read` at every collection for counter totals and gauge levels."""
        self._observers.append(read)

    def collect(self) -> list[Series]:
        with self._lock:
            observed: dict[str, list[Observation]] = {}
            for read in self._observers:
                for r in read():
                    assert r.metric.name in self._metrics, f"{r.metric.name} is not registered"
                    point = Observation(r.value, self.labels(**r.labels))
                    observed.setdefault(r.metric.name, []).append(point)
            self._observed = observed
            data = self._reader.get_metrics_data()
        if data is None:
            return []
        return [
            _series(self._metrics[metric.name], point)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        ]

    def snapshot(self) -> Snapshot:
        return Snapshot(self.source, tuple(self.collect()))

    def render(self, *more: Iterable[Series]) -> str:
        """The Prometheus text of this process's series and `more` (other processes')."""
        series = [*self.collect(), *(s for group in more for s in group)]
        return render(series, self.metrics)

    def _observations(self, name: str, _: CallbackOptions) -> list[Observation]:
        return self._observed.get(name, [])


def _series(metric: Metric, point: object) -> Series:
    attributes: Mapping[str, object] = getattr(point, "attributes", None) or {}
    labels = _ordered({k: str(v) for k, v in attributes.items()})
    if isinstance(point, HistogramDataPoint):
        return Series(
            metric, labels, point.sum, tuple(point.explicit_bounds), tuple(point.bucket_counts)
        )
    return Series(metric, labels, float(point.value))  # type: ignore[attr-defined]


def _ordered(labels: Mapping[str, str]) -> Labels:
    """pool, model, then the rest by name: one spelling per label set."""
    head = [k for k in ("pool", "model") if k in labels]
    return tuple((k, labels[k]) for k in head + sorted(set(labels) - set(head)))


def merge(series: Iterable[Series]) -> list[Series]:
    """One series per name and labels: several replicas' of one pool become the pool's."""
    groups: dict[tuple[str, Labels], list[Series]] = {}
    for s in series:
        groups.setdefault((s.metric.name, s.labels), []).append(s)
    return [_combine(group) for group in groups.values()]


def _combine(group: list[Series]) -> Series:
    first = group[0]
    if len(group) == 1:
        return first
    if first.metric.kind == "histogram":
        assert all(s.bounds == first.bounds for s in group), first.metric.name
        counts = tuple(sum(c) for c in zip(*(s.counts for s in group), strict=True))
        return Series(first.metric, first.labels, sum(s.value for s in group), first.bounds, counts)
    if first.metric.kind == "gauge" and first.metric.unit == "1":
        return Series(first.metric, first.labels, fmean(s.value for s in group))
    return Series(first.metric, first.labels, sum(s.value for s in group))


def render(series: Iterable[Series], declared: Iterable[Metric] = ()) -> str:
    """Prometheus text format (0.0.4) of `series`, merged, one family per metric; labels
    in the order pool, model, the rest (as DESIGN.md writes them). A `declared` metric
    without series yet (a fallback reason nobody hit) still gets its HELP and TYPE."""
    families: dict[str, list[str]] = {}

    def family(metric: Metric, name: str) -> list[str]:
        if name not in families:
            families[name] = [
                f"# HELP {name} {_escape(metric.help, help_text=True)}",
                f"# TYPE {name} {metric.kind}",
            ]
        return families[name]

    for metric in declared:
        family(metric, metric.name)
    for s in merge(series):
        names = [s.metric.name]
        if s.metric.name in ALIASES and dict(s.labels).get("pool") in WORKER_POOLS:
            names.append(ALIASES[s.metric.name])
        for name in names:
            family(s.metric, name).extend(_samples(name, s))
    return "".join(line + "\n" for lines in families.values() for line in lines)


def _samples(name: str, s: Series) -> list[str]:
    if s.metric.kind != "histogram":
        return [f"{name}{_labels(s.labels)} {floatToGoString(s.value)}"]
    lines, cumulative = [], 0
    for bound, count in zip((*s.bounds, float("inf")), s.counts, strict=True):
        cumulative += count
        le = (*s.labels, ("le", floatToGoString(bound)))
        lines.append(f"{name}_bucket{_labels(le)} {cumulative}")
    lines.append(f"{name}_count{_labels(s.labels)} {cumulative}")
    lines.append(f"{name}_sum{_labels(s.labels)} {floatToGoString(s.value)}")
    return lines


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _escape(text: str, help_text: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text if help_text else text.replace('"', '\\"')
