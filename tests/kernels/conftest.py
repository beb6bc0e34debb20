"""Kernel tests: every Triton kernel against a float64 reference on fresh random inputs.

Each test runs twice: `interp` (CPU tensors through Triton's interpreter, small shapes; what
CI runs) and `cuda` (compiled for the GPU, larger shapes; marked `gpu`, run with
`pytest -m gpu tests/kernels` on a GPU machine).

`triton.jit` chooses between compiling and interpreting when a kernel is *defined*; on a
machine without CUDA the root conftest sets TRITON_INTERPRET=1 before any test module can
import a kernel module.
"""

from __future__ import annotations

import os
import platform
import sys
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    _runtime = sys.modules.get("kernels.triton_runtime")
    if os.environ.get("TRITON_INTERPRET") != "1" or (
        _runtime is not None and not _runtime.INTERPRET
    ):
        raise pytest.UsageError(
            "without CUDA, Triton kernels need TRITON_INTERPRET=1 before they are imported "
            "(tests/conftest.py sets it)"
        )


DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
"""Where this machine runs the kernels: compiled on its GPU, else through the interpreter."""

NATIVE_CPU = platform.machine() in ("x86_64", "AMD64")
collect_ignore = [] if NATIVE_CPU else ["test_native_cpu.py", "test_native_cpu_fp8_kv.py"]
"""The native CPU kernels exist for x86-64 only (elsewhere the torch paths are the CPU
path, which test_torch_paths covers); on x86-64 they must build, so g++ is required."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`device` is this machine's one device, chosen at collection, so no test is ever
    skipped for running on the other kind: `cuda` cases are marked `gpu` (CI never sees
    them; the device tool runs them with -m gpu), `interp` cases run in CI."""
    if "device" in metafunc.fixturenames:
        param = (
            pytest.param(DEVICE, id="cuda", marks=pytest.mark.gpu)
            if HAS_CUDA
            else pytest.param(DEVICE, id="interp")
        )
        metafunc.parametrize("device", [param])


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs per test, reproducible per test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
