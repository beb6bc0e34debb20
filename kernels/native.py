"""The CPU kernels written in C++ (`kernels/cpu/*.cpp`): built on first use, then cached.

They are plain C functions called through ctypes, not a torch extension: building against
the torch headers takes a minute, these take two seconds with the system compiler, and a
ctypes call releases the GIL like any torch op. The library is compiled for AVX2 and FMA
(x86-64 from 2013 on) and used only where torch reports that the CPU has them; elsewhere
(say, an ARM laptop), or without a C++ compiler, `library()` is None and callers take their
torch paths.

The build lands in `$BATON_CACHE_DIR/native` (default `~/.cache/baton/native`) under a name
that hashes the sources and flags (images build it in advance and need no compiler). It is
written to a temporary file and renamed, so processes that build at the same time (Ray
replicas starting together) never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cache_dir() -> Path:
    root = os.environ.get("BATON_CACHE_DIR") or Path.home() / ".cache" / "baton"
    return Path(root) / "native"


def _target() -> Path:
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for source in sorted([*SOURCE_DIR.glob("*.cpp"), *SOURCE_DIR.glob("*.h")]):
        digest.update(source.name.encode() + source.read_bytes())
    return _cache_dir() / f"libbaton_cpu-{digest.hexdigest()[:16]}.so"


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    if os.environ.get("BATON_NATIVE_KERNELS", "1") == "0":
        return "BATON_NATIVE_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {capability})"
    if _compiler() is None and not _target().exists():
        return "no C++ compiler to build them (set CXX, or install g++)"
    return None


def _build() -> Path:
    target = _target()
    if target.exists():
        return target
    compiler = _compiler()
    assert compiler is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, *map(str, SOURCES)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed:\n{' '.join(cmd)}\n{done.stderr}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None where they cannot run (logged once)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("native CPU kernels off: %s; torch CPU paths instead", reason)
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernels off (torch CPU paths instead): %s", e)
        return None
    _declare(lib)
    return lib


def handles(*tensors: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the native kernels take these: CPU tensors of `dtype` (bf16 unless said, as
    for an fp8 KV cache) whose rows are whole AVX2 vectors (last dim a multiple of 8), with
    the library built."""
    return (
        all(t.dtype == dtype and t.device.type == "cpu" and t.shape[-1] % 8 == 0 for t in tensors)
        and library() is not None
    )


def activation_rows(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as the linear kernels read activations, contiguous: bf16 kept (True), anything
    else as fp32 (False). Their output takes the same dtype."""
    if x.dtype == torch.bfloat16:
        return x.contiguous(), True
    return x.to(torch.float32).contiguous(), False


def lib() -> ctypes.CDLL:
    """The library, for launchers whose callers checked `handles` (or `library()`)."""
    loaded = library()
    assert loaded is not None, "the native CPU kernels are not available here"
    return loaded


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "baton_int4_linear_avx2": [p, p, p, p, p, i32, i64, i64, i64, i64, i32],
        "baton_int8_linear_avx2": [p, p, p, p, i32, i64, i64, i64, i32],
        "baton_rms_norm_bf16": [p, p, p, p, p, i64, i64, f32, i32],
        "baton_rope_bf16": [p, i64, p, p, p, i64, i64, i64, i32],
        "baton_write_kv_bf16": [p, i64, p, i64, p, i64, i64, i64, p, i64, i64],
        "baton_write_kv_fp8": [p, i64, p, i64, p, i64, i64, i64, p, i64, i64, i64, p],
        "baton_silu_and_mul_bf16": [p, p, i64, i64, i32],
        "baton_paged_attention_bf16": [p, p, p, i64, i64, p, i64, p, p, *[i64] * 5, f32, i32],
        "baton_paged_attention_fp8": [p, p, p, i64, i64, p, i64, p, p, *[i64] * 5, f32, p, i32],
        # (LayerWeights*, LayerStep*): structures of kernels/layer_cpu.py
        "baton_layer_bf16": [p, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = argtypes
    lib.baton_copy_xxh3.restype = ctypes.c_uint64
    lib.baton_copy_xxh3.argtypes = [p, p, i64]
