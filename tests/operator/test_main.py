"""`baton operator` (operators.main) as a process: flags, kubeconfig login, a policy
scaled through the emulated API server, a clean exit on SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest
import yaml

from operators.main import main
from tests.operator.cluster import DEPLOYMENTS, Cluster
from tests.operator.conftest import eventually
from tests.operator.crd_schema import ROOT
from tests.operator.telemetry_page import TelemetryPage
from tests.operator.test_operator import DEPLOYMENT_REF, NS, create_deployment, create_policy


def test_a_scope_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "one of the arguments -n/--namespace -A/--all-namespaces is required" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["-A", "--interval", "0"])
    assert "--interval must be positive" in capsys.readouterr().err


def test_metrics_source_must_be_an_http_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["-A", "--metrics-source", "prometheus:9090"])
    assert e.value.code == 2
    assert (
        "--metrics-source must be an http(s) URL such as http://prometheus.monitoring:9090, "
        "got 'prometheus:9090'"
    ) in capsys.readouterr().err


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--all-namespaces", "--metrics-source", "--interval", "--standalone", "--peering"):
        assert flag in out


async def test_operator_process_logs_in_with_kubeconfig_and_scales(
    cluster: Cluster, telemetry: TelemetryPage, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.url)}}],
                "users": [{"name": "ops", "user": {"token": "s3cret"}}],
                "contexts": [{"name": "c", "context": {"cluster": "kmock", "user": "ops"}}],
                "current-context": "c",
            }
        )
    )
    telemetry.waiting.labels("decode", "smollm2").set(6)
    await create_deployment(cluster, "decode", 1)
    spec = {
        "scaleTargetRef": DEPLOYMENT_REF,
        "pool": "decode",
        "maxReplicas": 5,
        "objectives": {"queueDepthPerReplica": 2},
        "metrics": {"source": "scrape", "scrape": {"endpoints": [telemetry.url]}},
    }
    await create_policy(cluster, "dec", spec)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "operators.main", "--all-namespaces", "--standalone",
        "--interval", "0.2",
        cwd=ROOT,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await eventually(lambda: cluster.stored(DEPLOYMENTS, NS, "decode")["spec"]["replicas"] == 3)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    gets = list(cluster["get"])
    assert gets and all(r.headers.get("Authorization") == "Bearer s3cret" for r in gets)
