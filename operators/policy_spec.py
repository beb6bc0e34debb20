"""The CapacityPolicy spec at the boundary: pydantic models of the CRD's `spec`.

The CRD (charts/baton/crds/capacitypolicy.yaml) validates on the API server; these
models validate the same rules again where no API server stands in between (a policy
file for `baton serve --policy`, an operator run against a cluster whose CRD is old),
then hand the engine its frozen dataclasses. Defaults match the CRD's; a test checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from operators.pool_policy import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    Behavior,
    Capacity,
    Objectives,
    PolicyType,
    Pool,
    PoolPolicy,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
)

GROUP, VERSION, PLURAL, KIND = "baton.dev", "v1alpha1", "capacitypolicies", "CapacityPolicy"


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class ScaleTargetRef(_Spec):
    api_version: str = Field(min_length=1, description="API version of the target")
    kind: str = Field(min_length=1, description="kind of the target")
    name: str = Field(min_length=1, description="name of the target, in the policy's namespace")
    deployment: str | None = Field(None, description="Serve deployment inside a RayService")

    @model_validator(mode="after")
    def _deployment_for_rayservice(self) -> ScaleTargetRef:
        if self.kind == "RayService" and not self.deployment:
            raise ValueError("scaleTargetRef.deployment is required when kind is RayService")
        if self.kind != "RayService" and self.deployment is not None:
            raise ValueError("scaleTargetRef.deployment applies only to a RayService target")
        return self


class ObjectivesSpec(_Spec):
    ttft_p90_ms: int | None = Field(None, ge=1, description="prefill: p90 TTFT incl. KV pull")
    itl_p90_ms: int | None = Field(None, ge=1, description="decode: p90 inter-token latency")
    kv_cache_utilization: float | None = Field(None, gt=0, le=1, description="decode: mean use")
    queue_depth_per_replica: float | None = Field(None, gt=0, description="waiting per replica")


class CapacitySpec(_Spec):
    tokens_per_second_per_replica: float | None = Field(None, gt=0)
    sequences_per_replica: int | None = Field(None, ge=1)
    target_utilization: float = Field(0.8, gt=0, le=1)


class PrometheusSpec(_Spec):
    url: str = Field(pattern=r"^https?://", description="Prometheus HTTP API base URL")
    metric_prefix: str = Field("baton_", pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    selector: str = Field("", max_length=1024, description='extra label matchers: ns="llm"')
    rate_window: str = Field("1m", pattern=r"^[0-9]+(ms|s|m|h)$")


class ScrapeSpec(_Spec):
    endpoints: list[str] = Field(min_length=1, max_length=64)
    timeout_seconds: float = Field(2.0, gt=0, le=60)

    @model_validator(mode="after")
    def _urls(self) -> ScrapeSpec:
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"metrics.scrape.endpoints: {url!r} is not an http(s) URL")
        return self


class MetricsSpec(_Spec):
    source: Literal["prometheus", "scrape"]
    prometheus: PrometheusSpec | None = None
    scrape: ScrapeSpec | None = None

    @model_validator(mode="after")
    def _source_configured(self) -> MetricsSpec:
        if getattr(self, self.source) is None:
            raise ValueError(
                f"metrics.{self.source} is required when metrics.source is {self.source}"
            )
        return self


class ScalingPolicySpec(_Spec):
    type: Literal["Pods", "Percent"]
    value: int = Field(ge=1)
    period_seconds: int = Field(ge=1, le=1800)


class ScalingRulesSpec(_Spec):
    stabilization_window_seconds: int | None = Field(None, ge=0, le=3600)
    select_policy: Literal["Max", "Min", "Disabled"] = "Max"
    policies: list[ScalingPolicySpec] | None = Field(None, max_length=10)

    def rules(self, default: ScalingRules) -> ScalingRules:
        window = self.stabilization_window_seconds
        policies = (
            default.policies
            if self.policies is None
            else tuple(
                ScalingPolicy(PolicyType(p.type), p.value, p.period_seconds) for p in self.policies
            )
        )
        if not policies and self.select_policy != "Disabled":
            raise ValueError("behavior policies must not be empty unless selectPolicy is Disabled")
        return ScalingRules(
            default.stabilization_window_seconds if window is None else window,
            policies,
            SelectPolicy(self.select_policy),
        )


class BehaviorSpec(_Spec):
    scale_up: ScalingRulesSpec = ScalingRulesSpec()
    scale_down: ScalingRulesSpec = ScalingRulesSpec()

    def behavior(self) -> Behavior:
        if any(p.type == "Percent" and p.value > 100 for p in self.scale_down.policies or ()):
            raise ValueError("behavior.scaleDown: a Percent policy cannot exceed 100")
        return Behavior(
            self.scale_up.rules(DEFAULT_SCALE_UP), self.scale_down.rules(DEFAULT_SCALE_DOWN)
        )


class CapacityPolicySpec(_Spec):
    scale_target_ref: ScaleTargetRef
    pool: Literal["prefill", "decode"]
    model: str | None = Field(None, description="the `model` label to read metrics for")
    min_replicas: int = Field(1, ge=1, le=10000)
    max_replicas: int = Field(ge=1, le=10000)
    objectives: ObjectivesSpec = ObjectivesSpec()
    capacity: CapacitySpec = CapacitySpec()
    metrics: MetricsSpec | None = None
    behavior: BehaviorSpec = BehaviorSpec()

    @model_validator(mode="after")
    def _consistent(self) -> CapacityPolicySpec:
        o, c = self.objectives, self.capacity
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be less than or equal to maxReplicas")
        if self.pool != "prefill" and o.ttft_p90_ms is not None:
            raise ValueError("objectives.ttftP90Ms applies to the prefill pool only")
        if self.pool != "decode" and (o.itl_p90_ms or o.kv_cache_utilization):
            raise ValueError(
                "objectives.itlP90Ms and objectives.kvCacheUtilization "
                "apply to the decode pool only"
            )
        if self.pool != "decode" and c.sequences_per_replica is not None:
            raise ValueError("capacity.sequencesPerReplica applies to the decode pool only")
        if not any(o.model_dump().values()) and not (
            c.tokens_per_second_per_replica or c.sequences_per_replica
        ):
            raise ValueError(
                "set at least one objective or capacity hint: nothing would drive scaling"
            )
        self.behavior.behavior()  # raises on inconsistent rules
        return self

    def pool_policy(self) -> PoolPolicy:
        o, c = self.objectives, self.capacity
        return PoolPolicy(
            pool=Pool(self.pool),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            objectives=Objectives(
                ttft_p90_s=o.ttft_p90_ms / 1e3 if o.ttft_p90_ms else None,
                itl_p90_s=o.itl_p90_ms / 1e3 if o.itl_p90_ms else None,
                kv_cache_utilization=o.kv_cache_utilization,
                queue_depth_per_replica=o.queue_depth_per_replica,
            ),
            capacity=Capacity(
                c.tokens_per_second_per_replica, c.sequences_per_replica, c.target_utilization
            ),
            behavior=self.behavior.behavior(),
        )


def describe(error: ValidationError, root: str = "spec") -> str:
    """`error` as `<field path>: <message>` per problem, `; `-separated, e.g.
    `spec.behavior.scaleUp.policies[0].value: Input should be greater than or equal to 1`
    (no input dumps or documentation links: it goes into conditions and Events). An empty
    `root` starts paths at the model's fields (`router.http_port: ...`)."""
    problems = []
    for e in error.errors(include_url=False):
        path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        cause = e.get("ctx", {}).get("error")
        message = str(cause) if e["type"] == "value_error" and cause is not None else e["msg"]
        problems.append(f"{path.removeprefix('.')}: {message}" if path else message)
    return "; ".join(problems)


def load_policy_file(path: Path) -> dict[Pool, PoolPolicy]:
    """The CapacityPolicy manifests of a YAML file, one per pool (`baton serve --policy`)."""
    policies: dict[Pool, PoolPolicy] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a {KIND} mapping, got a {type(doc).__name__}")
        if doc.get("kind") != KIND:
            raise ValueError(f"{path}: expected kind {KIND}, got {doc.get('kind')!r}")
        try:
            policy = CapacityPolicySpec.model_validate(doc.get("spec") or {}).pool_policy()
        except ValidationError as e:
            raise ValueError(f"{path}: {describe(e)}") from None
        if policy.pool in policies:
            raise ValueError(f"{path}: two policies for the {policy.pool} pool")
        policies[policy.pool] = policy
    if not policies:
        raise ValueError(f"{path}: no {KIND} in the file")
    return policies
