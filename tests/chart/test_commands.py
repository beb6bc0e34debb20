"""Every command the chart runs exists and takes the flags the chart passes.

Containers are gathered from every value set's rendered objects and sorted by image:
- the Baton image outside Ray: the Dockerfile's ENTRYPOINT (`baton`) plus the container's
  args: `baton <subcommand> --help` runs in this venv, every flag the chart passes is in its
  help, and the whole argument list parses through the real `baton` entry point;
- the Baton image in the RayService: KubeRay runs `ray start` with the group's
  rayStartParams as flags: `ray start --help` runs, and every flag is in its help;
- Redis: redis-server starts with the chart's arguments and reports them back;
- the `helm test` pods (curl): their shell scripts parse (`sh -n`).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import redis

import baton.cli
from tests.chart.chart import VALUE_SETS, Manifest, Release, ray_templates, render
from tests.chart.dockerfile import entrypoint

BIN = Path(sys.executable).parent
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class Container:
    where: str
    spec: dict[str, Any]
    in_ray: bool

    @property
    def image(self) -> str:
        return str(self.spec["image"])

    def argv(self) -> list[str]:
        """What the container runs, `$(VAR)` references resolved as the kubelet does (a
        value from the API, such as the pod name, becomes a placeholder)."""
        command = self.spec.get("command") or entrypoint()
        env = {e["name"]: e.get("value", f"<{e['name']}>") for e in self.spec.get("env", [])}
        return [
            ENV_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), arg)
            for arg in [*command, *self.spec.get("args", [])]
        ]


def _containers(release: Release) -> Iterator[Container]:
    for obj in release.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayService":
            for group, template in ray_templates(obj):
                for spec in template["spec"]["containers"]:
                    yield Container(f"{where}/{group}", spec, in_ray=True)
        else:
            pod = obj["spec"] if obj["kind"] == "Pod" else _template_spec(obj)
            for spec in pod.get("containers", []) if pod else []:
                yield Container(where, spec, in_ray=False)


def _template_spec(obj: Manifest) -> dict[str, Any] | None:
    template = obj.get("spec", {}).get("template")
    return template["spec"] if template else None


@cache
def containers() -> tuple[Container, ...]:
    return tuple(c for value_set in VALUE_SETS for c in _containers(render(value_set)))


def of_image(prefix: str) -> list[Container]:
    return [c for c in containers() if c.image.startswith(prefix)]


def flags(argv: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}


def test_every_container_is_accounted_for() -> None:
    images = {c.image.split(":")[0] for c in containers()}
    assert images == {"baton", "docker.io/library/redis", "docker.io/curlimages/curl"}


@cache
def help_text(*argv: str) -> str:
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def baton_commands() -> list[list[str]]:
    unique = {tuple(c.argv()) for c in of_image("baton:") if not c.in_ray}
    return [list(argv) for argv in sorted(unique)]


def test_baton_containers_run_the_image_entrypoint() -> None:
    assert entrypoint() == ["baton"]
    commands = baton_commands()
    assert {argv[1] for argv in commands} == {"kvstore", "operator"}
    assert all(argv[0] == "baton" for argv in commands)


@pytest.mark.parametrize("argv", baton_commands(), ids=" ".join)
def test_baton_subcommand_takes_the_chart_flags(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text("baton", argv[1])
    assert flags(argv[2:]) <= set(re.findall(r"--?[a-z][a-z-]*", text))
    # Every value parses (sizes, numbers, choices) through the real entry point; --help
    # then stops it before it would start serving.
    with pytest.raises(SystemExit) as stopped:
        baton.cli.main([*argv[1:], "--help"])
    assert stopped.value.code == 0, capsys.readouterr().err


def test_ray_containers_leave_the_command_to_kuberay() -> None:
    """KubeRay writes `ray start ...` as the Ray container's command; the image must not."""
    ray_containers = [c for c in containers() if c.in_ray]
    assert ray_containers
    for container in ray_containers:
        assert container.image.startswith("baton:"), container.where
        assert "command" not in container.spec and "args" not in container.spec


def ray_start_params() -> list[tuple[str, dict[str, str]]]:
    found = []
    for value_set in VALUE_SETS:
        cluster = render(value_set).rayservice["spec"]["rayClusterConfig"]
        found.append((f"{value_set}/head", cluster["headGroupSpec"]["rayStartParams"]))
        for group in cluster["workerGroupSpecs"]:
            found.append((f"{value_set}/{group['groupName']}", group["rayStartParams"]))
    return found


def test_ray_start_takes_the_chart_flags() -> None:
    text = help_text("ray", "start")
    options = set(re.findall(r"--[a-z][a-z-]*", text))
    for where, params in ray_start_params():
        assert {f"--{key}" for key in params} <= options, where


@pytest.mark.parametrize(("where", "params"), ray_start_params(), ids=lambda v: str(v))
def test_ray_start_resources_survive_kuberays_shell(where: str, params: dict[str, str]) -> None:
    """KubeRay writes `--<key>=<value>` into a bash command line: after the shell's quote
    removal, --resources must be a JSON object of the group's custom resource."""
    words = shlex.split(" ".join(f"--{key}={value}" for key, value in params.items()))
    parsed = dict(word[2:].split("=", 1) for word in words)
    assert parsed.keys() == params.keys()
    if "resources" in params:
        group = where.split("/")[1]
        assert json.loads(parsed["resources"]) == {f"baton_{group}": 1}
        assert int(parsed["num-cpus"]) >= 0 and int(parsed["num-gpus"]) >= 0


def test_redis_takes_the_chart_arguments(tmp_path: Path) -> None:
    (redis_container,) = {tuple(c.argv()): c for c in of_image("docker.io/library/redis")}.values()
    argv = redis_container.argv()
    assert argv[0] == "redis-server"
    # The same arguments, but listening on a socket in tmp_path instead of port 6379, and
    # a password where the kubelet puts the Secret's (argv() writes it <REDIS_PASSWORD>).
    socket = tmp_path / "redis.sock"
    args = [a.replace("<REDIS_PASSWORD>", "s3cret") for a in argv[1:]]
    args += ["--port", "0", "--unixsocket", str(socket), "--dir", str(tmp_path)]
    server = subprocess.Popen(["redis-server", *args], stdout=subprocess.PIPE, text=True)
    try:
        client = redis.Redis(unix_socket_path=str(socket), password="s3cret", decode_responses=True)
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "allkeys-lru"
        assert config["maxmemory"] == argv[argv.index("--maxmemory") + 1]
        assert config["save"] == ""
        assert config["appendonly"] == "no"
        assert config["protected-mode"] == "no"
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(socket)).get("any")
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_test_hook_scripts_parse() -> None:
    for container in of_image("docker.io/curlimages/curl"):
        argv = container.argv()
        assert argv[:2] == ["sh", "-c"], container.where
        done = subprocess.run(["sh", "-n", "-c", argv[2]], capture_output=True, text=True)
        assert done.returncode == 0, f"{container.where}: {done.stderr}"
