"""The RayService's serveConfigV2 is a Serve config Ray accepts, its application's args are a
valid ServingConfig, and each Serve deployment can only be placed on its own worker group."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from services.serving_config import ServingConfig
from tests.chart.chart import VALUE_SETS, Release, render, render_values

value_sets = pytest.mark.parametrize("value_set", list(VALUE_SETS))


def offered_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources a worker group's `ray start` advertises."""
    (word,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    resources: dict[str, float] = json.loads(word.removeprefix("--resources="))
    return resources


def deployments(release: Release) -> dict[str, dict[str, Any]]:
    (app,) = release.serve_config["applications"]
    return {d["name"]: d for d in app["deployments"]}


@value_sets
def test_ray_accepts_the_serve_config(value_set: str) -> None:
    config = ServeDeploySchema.model_validate(render(value_set).serve_config)
    (app,) = config.applications
    assert app.import_path == "services.app:app_builder"
    assert app.route_prefix == "/"
    assert config.http_options.host == "0.0.0.0"
    assert config.http_options.port == 8000


@value_sets
def test_args_are_a_serving_config(value_set: str) -> None:
    release = render(value_set)
    config = ServingConfig.model_validate(release.serving_config)
    values = VALUE_SETS[value_set].values
    assert config.mode == values.get("mode", "disaggregated")
    assert config.model.served_name == values.get("model", {}).get(
        "servedName", "smollm2-135m-instruct"
    )
    assert config.router.host == "0.0.0.0"
    for name, deployment in deployments(release).items():
        if name != "router":
            pool = getattr(config, name)
            assert deployment["num_replicas"] == pool.replicas
            actor = deployment["ray_actor_options"]
            assert (actor["num_cpus"], actor["num_gpus"]) == (pool.num_cpus, pool.num_gpus)


def fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of a pydantic model's leaf fields."""
    found = set()
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            found |= fields(sub, f"{prefix}{name}.")
        else:
            found.add(prefix + name)
    return found


def test_chart_writes_every_serving_config_field() -> None:
    """A field the chart leaves out would silently take its code default in the cluster;
    a new ServingConfig field fails here until values.yaml exposes it. kvstore.capacity
    sizes the shard `baton serve` starts; the chart sizes its shards by memory limit."""
    args = render("default").serving_config
    written = {
        f"{section}.{key}"
        for section, value in args.items()
        if isinstance(value, dict)
        for key in value
    } | {key for key, value in args.items() if not isinstance(value, dict)}
    assert written == fields(ServingConfig) - {"kvstore.capacity"}


def test_args_follow_the_values() -> None:
    config = ServingConfig.model_validate(render("gpu-pools").serving_config)
    assert config.model.path == "/models/Llama-3.1-8B-Instruct"
    assert (config.model.kernel_backend, config.model.device) == ("triton", "cuda")
    assert config.model.max_model_len == 8192
    assert (config.prefill.linear, config.decode.linear) == ("fp8", "int4")
    assert config.engine_args(config.decode).lm_head_linear == "dense"  # on GPUs
    assert (config.prefill.replicas, config.decode.replicas) == (2, 4)
    assert config.decode.kv_cache_bytes == 512 * 2**20
    default = ServingConfig.model_validate(render("default").serving_config)
    assert default.model.path is None  # the embedded SmolLM2-135M-Instruct
    assert default.kvstore.redis_url == "redis://llm-baton-redis.serving.svc.cluster.local:6379/0"
    assert (default.kvstore.lease_ttl_s, default.kvstore.timeout_s) == (30, 10)


def test_thread_and_remote_prefill_bounds_follow_the_values() -> None:
    """Null (unbounded, torch_threads) by default; set, they reach the pools and router."""
    default = ServingConfig.model_validate(render("default").serving_config)
    assert default.router.max_remote_prefills is None and default.decode.prefill_threads is None
    release = render_values(
        {"router": {"maxRemotePrefills": 3}, "pools": {"decode": {"prefillThreads": 2}}}
    )
    config = ServingConfig.model_validate(release.serving_config)
    assert config.router.max_remote_prefills == 3
    assert (config.decode.prefill_threads, config.prefill.prefill_threads) == (2, None)


def test_both_spellings_of_the_fp8_kv_cache_pair_up() -> None:
    """vLLM's "fp8" and the wire name "fp8_e4m3" are one cache; the chart's check of the
    pools' pairing (tests/chart/test_values_schema.py) takes them as one, as Baton does."""
    pools = {"prefill": {"kvCacheDtype": "fp8"}, "decode": {"kvCacheDtype": "fp8_e4m3"}}
    config = ServingConfig.model_validate(render_values({"pools": pools}).serving_config)
    assert (config.prefill.kv_cache_dtype, config.decode.kv_cache_dtype) == ("fp8", "fp8_e4m3")


@value_sets
def test_each_deployment_is_pinned_to_its_worker_group(value_set: str) -> None:
    """A replica needs one unit of `baton_<group>`, which only its group's pods offer, one
    unit each: so replicas land on their own group's pods, one per pod, and Ray's autoscaler
    knows which group to grow for a pending replica."""
    release = render(value_set)
    groups = release.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offers = {g["groupName"]: offered_resources(g) for g in groups}
    assert offers == {name: {f"baton_{name}": 1} for name in offers}
    placed = deployments(release)
    assert placed.keys() == offers.keys()
    for name, deployment in placed.items():
        actor = deployment["ray_actor_options"]
        assert actor["resources"] == {f"baton_{name}": 1}
        group = release.worker_group(name)
        assert int(group["rayStartParams"]["num-cpus"]) >= actor["num_cpus"]
        assert int(group["rayStartParams"]["num-gpus"]) == actor["num_gpus"]
        assert group["minReplicas"] <= deployment["num_replicas"] <= group["maxReplicas"]
        assert group["replicas"] == deployment["num_replicas"]


def test_head_runs_no_replica() -> None:
    head = render("default").rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}


@pytest.mark.parametrize("keys_enabled", [True, False])
def test_a_router_without_api_keys_is_exposed_only_on_purpose(keys_enabled: bool) -> None:
    """The router listens on 0.0.0.0; it refuses to start there without keys unless the
    config says so, which the chart does exactly when it installs no keys."""
    release = render_values({"apiKeys": {"enabled": keys_enabled}})
    config = ServingConfig.model_validate(release.serving_config)
    assert config.router.allow_unauthenticated is not keys_enabled
    assert config.router.max_request_bytes == 4 * 2**20
