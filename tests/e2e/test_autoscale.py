"""`baton serve --policy`: under load from bench/serve.py the local autoscaler adds a decode
replica, and removes it once the load has stopped.

As light as the 2-core CI machine allows: colocated mode (no prefill pool, no KV store),
one decode replica of SmolLM2-135M to start with, at most two; short stabilization
windows and a 2 s decision interval. The policy sizes decode by concurrent sequences,
2 per replica: the load's 4 concurrent streams ask for 2 replicas, none for 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_serve import free_port

pytestmark = pytest.mark.slow

POLICY = {
    "apiVersion": "baton.dev/v1alpha1",
    "kind": "CapacityPolicy",
    "metadata": {"name": "decode"},
    "spec": {
        "scaleTargetRef": {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "name": "local",
            "deployment": "decode",
        },
        "pool": "decode",
        "minReplicas": 1,
        "maxReplicas": 2,
        "capacity": {"sequencesPerReplica": 2, "targetUtilization": 1.0},
        "behavior": {
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 5}],
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 10,
                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 5}],
            },
        },
    },
}


def wait_for(log: Path, line: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in log.read_text():
        assert proc.poll() is None, f"baton serve exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {line!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def load(url: str, tmp: Path) -> subprocess.Popen[bytes]:
    """bench/serve.py: 4 concurrent streams of 64 tokens."""
    cmd = [sys.executable, "bench/serve.py", "--url", url, "--label", "autoscale"]
    cmd += ["--workloads", "random", "--concurrency", "4", "--requests", "24"]
    cmd += ["--prompt-tokens", "32", "--output-tokens", "64", "--plot", str(tmp / "load.png")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def test_decode_scales_up_under_load_and_back_down(tmp_path: Path) -> None:
    http_port = free_port()
    config = {
        "mode": "colocated",
        "model": {"max_model_len": 512},
        "decode": {"replicas": 1, "linear": "int4", "kv_cache_bytes": 16 * 2**20},
        "router": {"http_port": http_port, "grpc_port": free_port()},
    }
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    log = tmp_path / "serve.log"
    baton = str(Path(sys.executable).parent / "baton")
    cmd = [baton, "serve", "--config", str(tmp_path / "serving.yaml")]
    cmd += ["--policy", str(tmp_path / "policy.yaml"), "--policy-interval", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
    bench: subprocess.Popen[bytes] | None = None
    try:
        wait_for(log, "autoscaling  decode every 2 s", proc, 300)
        # Load until the second replica serves: a run of the bench at a time.
        while "autoscaler: decode has 2 running replicas" not in log.read_text():
            if bench is None or bench.poll() is not None:
                assert bench is None or bench.returncode == 0, "bench/serve.py failed"
                bench = load(f"http://127.0.0.1:{http_port}", tmp_path)
            assert proc.poll() is None, f"baton serve exited:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert bench is not None
        assert bench.wait(timeout=300) == 0
        wait_for(log, "autoscaler: decode 2 -> 1 replicas", proc, 120)
        wait_for(log, "autoscaler: decode has 1 running replicas", proc, 120)
        text = log.read_text()
        up = text.index("autoscaler: decode 1 -> 2 replicas (sequencesPerReplica ")
        assert up < text.rindex("autoscaler: decode 2 -> 1 replicas (sequencesPerReplica 0/2)")
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
