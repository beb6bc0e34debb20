"""The Triton kernel path through the whole stack (HTTP front end, router, FP8 prefill,
KV store shard, INT4 decode) on a tiny random Llama. Without CUDA the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from engine.loaders import LoadedCheckpoint
from services.router.http_api import build_http_app
from tests.services.router.conftest import serve_http
from tests.services.stack import MODEL, Shard, Stack
from tests.unit.tiny_model import tiny_checkpoint


@pytest.fixture(scope="module")
def stack(default_checkpoint: LoadedCheckpoint) -> Iterator[Stack]:
    shard = Shard()
    try:
        stack = Stack(
            tiny_checkpoint(default_checkpoint),
            shard,
            kernel_backend="triton",
            dtype="bfloat16",  # the Triton FP8 and INT4 kernels take bf16 activations
            max_model_len=128,
            kv_cache_bytes=2**20,
            max_num_batched_tokens=64,
        )
        yield stack
        stack.shutdown()
    finally:
        shard.stop()


def test_triton_kernels_serve_a_disaggregated_request(stack: Stack) -> None:
    if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
        pytest.fail("no CUDA and no TRITON_INTERPRET: the kernels cannot run")
    assert stack.prefill_engine.engine.model.ops.name == "triton"
    assert stack.decode_engine.engine.model.ops.name == "triton"
    prompt = list(range(1000, 1040))  # 2 full blocks + a partial one, all new
    with (
        serve_http(build_http_app(lambda: stack.pipeline)) as url,
        httpx.Client(base_url=url, timeout=600) as http,
    ):
        r = http.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 6,
        "total_tokens": 46,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # The prompt's two full blocks went prefill -> store -> decode.
    block = stack.decode.bridge.block_format.nbytes  # type: ignore[union-attr]
    assert stack.prefill.bridge.bytes["put"] == 2 * block  # type: ignore[union-attr]
    assert stack.decode.bridge.bytes["get"] == 2 * block  # type: ignore[union-attr]
    assert not stack.decode.fallbacks and stack.pipeline.local_prefills.total() == 0
