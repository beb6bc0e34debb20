"""ServingConfig's derived engine settings."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from operators.policy_spec import describe
from services.serving_config import ServingConfig


def test_the_decode_lm_head_is_int8_on_cpus_unless_chosen() -> None:
    cpu = ServingConfig()
    assert cpu.engine_args(cpu.decode).lm_head_linear == "int8"
    assert cpu.engine_args(cpu.prefill).lm_head_linear == "dense"  # one token a prompt
    gpu = ServingConfig.model_validate({"model": {"device": "cuda:0"}})
    assert gpu.engine_args(gpu.decode).lm_head_linear == "dense"
    chosen = ServingConfig.model_validate({"decode": {"linear": "int4", "lm_head_linear": "dense"}})
    assert chosen.engine_args(chosen.decode).lm_head_linear == "dense"
    colocated = ServingConfig.model_validate({"mode": "colocated"})
    assert colocated.engine_args(colocated.decode).lm_head_linear == "int8"


def test_a_pool_section_that_leaves_linear_out_keeps_its_pools_format(tmp_path: Path) -> None:
    path = tmp_path / "serving.yaml"
    path.write_text("prefill:\n  torch_threads: 1\ndecode:\n  torch_threads: 2\n")
    config = ServingConfig.from_yaml(path)
    assert (config.prefill.linear, config.prefill.torch_threads) == ("fp8", 1)
    assert (config.decode.linear, config.decode.torch_threads) == ("int4", 2)
    chosen = ServingConfig.model_validate({"prefill": {"linear": "dense"}})
    assert (chosen.prefill.linear, chosen.decode.linear) == ("dense", "int4")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"kvstore": {"capacity": "10XB"}},
            "kvstore.capacity: invalid size '10XB'; use a number with an optional unit "
            "(KiB, MiB, GiB, TiB, KB, MB, GB)",
        ),
        ({"kvstore": {"capacity": "0GiB"}}, "kvstore.capacity: must be > 0 bytes, got '0GiB'"),
        (
            {"decode": {"linear": "int3"}},
            "decode.linear: unknown linear format 'int3'; choose one of dense, fp8, int4, int8",
        ),
        (
            {"prefill": {"lm_head_linear": "fp4"}},
            "prefill.lm_head_linear: unknown linear format 'fp4'; choose one of dense, fp8, "
            "int4, int8",
        ),
        (
            {"kvstore": {"targets": ["kv-0.kv:50052", "kv-1.kv:70000"]}},
            "kvstore.targets: 'kv-1.kv:70000' is not host:port with a port in [1, 65535]",
        ),
        (
            {"kvstore": {"targets": ["kv-0.kv"]}},
            "kvstore.targets: 'kv-0.kv' is not host:port with a port in [1, 65535]",
        ),
        (
            {"kvstore": {"targets": []}},
            "kvstore.targets must name at least one KV store shard (host:port) in "
            "disaggregated mode; colocated mode needs none",
        ),
        (
            {"kvstore": {"redis_url": "http://user:secret@redis:6379"}},
            "kvstore.redis_url: 'http://user:***@redis:6379' is not a Redis URL; use one with "
            "one of the schemes redis://, rediss://, unix://",
        ),
    ],
)
def test_settings_a_replica_would_refuse_are_refused_by_the_config(
    data: dict[str, Any], problem: str
) -> None:
    """Caught where the YAML is read, not in a Ray replica after `baton serve` started Ray."""
    with pytest.raises(ValidationError) as e:
        ServingConfig.model_validate(data)
    assert describe(e.value, root="") == problem


def test_valid_kvstore_settings_are_kept() -> None:
    kv = {
        "capacity": "512MiB",
        "targets": ["[::1]:50052", "kv-0.kv.baton.svc:50052"],
        "redis_url": "rediss://redis:6380/0",
    }
    assert ServingConfig.model_validate({"kvstore": kv}).kvstore.targets == kv["targets"]
    unix = {"redis_url": "unix:///run/redis.sock"}
    assert ServingConfig.model_validate({"kvstore": unix}).kvstore.redis_url == unix["redis_url"]
    colocated = {"mode": "colocated", "kvstore": {"targets": []}}  # no KV store to reach
    assert ServingConfig.model_validate(colocated).kvstore.targets == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"router": {"http_port": 9000, "grpc_port": 9000}},
            "router.http_port and router.grpc_port are both 9000: each needs a port of its own",
        ),
        (
            {"kvstore": {"targets": ["127.0.0.1:8000"]}},
            "kvstore target 127.0.0.1:8000 is on router.http_port's port (8000) of this host: "
            "the shard and the router need ports of their own",
        ),
    ],
)
def test_ports_that_collide_on_this_host_are_refused(data: dict[str, Any], message: str) -> None:
    """They failed only once Ray and the replicas had started (minutes on 2 cores)."""
    with pytest.raises(ValidationError) as raised:
        ServingConfig.model_validate(data)
    assert message in str(raised.value)


def test_ports_on_other_hosts_or_unused_do_not_collide() -> None:
    ServingConfig.model_validate({"kvstore": {"targets": ["kvstore-0.kvstore:8000"]}})
    colocated = {"mode": "colocated", "kvstore": {"targets": ["127.0.0.1:8000"]}}
    ServingConfig.model_validate(colocated)  # colocated mode starts no shard
    ServingConfig.model_validate({"router": {"grpc_port": 0}})  # a free port per replica
