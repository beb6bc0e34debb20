"""The FP8 KV cache on the GPU engine (Triton backend): decode steps replayed from CUDA
graphs give the eager engine's tokens exactly, over scales that capture never moves (GPU
only; CI deselects it). Contexts and batch as in test_decode_graphs, so both paths launch
the same kernels."""

from __future__ import annotations

import pytest
import torch

from engine.engine_args import EngineArgs
from engine.sampling_params import SamplingParams
from tests.kernels.test_decode_graphs import _checkpoint

pytestmark = pytest.mark.gpu


def test_graph_replayed_fp8_decode_matches_eager_tokens() -> None:
    device = torch.device("cuda")
    checkpoint = _checkpoint(device)
    lengths = (530, 515, 540, 520)
    prompts = [torch.randint(2, checkpoint.config.vocab_size, (n,)).tolist() for n in lengths]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for graphs in (64, 0):
        args = EngineArgs(
            dtype="bfloat16", linear="int4", kernel_backend="triton", device="cuda",
            max_model_len=575, kv_cache_bytes=64 << 20, cuda_graph_max_batch=graphs,
            kv_cache_dtype="fp8",
        )  # fmt: skip
        engine = args.create_engine(checkpoint)
        scales = engine.model.kv_scales
        assert scales is not None and scales.is_cuda
        where = scales.data_ptr()
        outputs[graphs] = [c.token_ids for c in engine.generate(prompts, params)]
        assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn
        assert scales.data_ptr() == where  # the layers' views, captured, never reallocated
        for i, layer in enumerate(engine.model.layers):
            assert layer.kv_scales is not None
            assert layer.kv_scales.data_ptr() == where + i * scales[0].nbytes
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.captured_sizes
    assert outputs[64] == outputs[0]
