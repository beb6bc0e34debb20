"""engine.cuda_graphs through the engine: decode steps replayed from CUDA graphs (forward,
LM head and sampler; each step's tokens read while the next one runs) give the eager
engine's tokens exactly (GPU only; CI deselects it).

Exactness needs both paths to launch the same kernels: contexts of 512-575 tokens
(prompts longer than 512, max_model_len 575) give the decode attention the same split
count either way (the graph plans for max_model_len, the eager step for the longest live
sequence: one split per 64-key tile, 8), and the INT4 GEMM picks the same tiles for a
batch of 3 and its padded 4.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bench.word_tokenizer import word_tokenizer
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from engine.sampler import GREEDY, SamplerPlan
from engine.sampling_params import SamplingParams
from tests.kernels.test_gpu_pipeline import _shapes, _weights

pytestmark = pytest.mark.gpu


def _checkpoint(device: torch.device) -> LoadedCheckpoint:
    cfg = dataclasses.replace(_shapes(device)[0], max_position_embeddings=1024)
    # the calibration prose's words as ids: the FP8 KV cache calibrates on distinct tokens
    tokenizer = word_tokenizer(cfg.vocab_size, cfg.eos_token_ids)
    return LoadedCheckpoint(
        config=cfg, tensors=_weights(cfg, device), tokenizer=tokenizer,
        model_id="tiny-random-llama", weights_digest="0" * 64, source=Path("<memory>"),
    )  # fmt: skip


def test_graph_replayed_decode_matches_eager_tokens():
    device = torch.device("cuda")
    checkpoint = _checkpoint(device)
    lengths, max_tokens = (530, 515, 540, 520), (12, 6, 9, 10)
    prompts = [torch.randint(2, checkpoint.config.vocab_size, (n,)).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    # One seeded sampled request: sampled inside the graph, the same draws either way.
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    params[3] = sampled
    # One request the graph's sampler does not serve (a suppressed stop token, logprobs):
    # while it runs, the graph's logits go to the eager sampler.
    params[1] = SamplingParams(
        max_tokens=6, min_tokens=3, stop_token_ids=(1,), temperature=0.0, ignore_eos=True,
        logprobs=2,
    )  # fmt: skip
    outputs, logprobs = {}, {}
    for graphs in (64, 0):
        args = EngineArgs(
            dtype="bfloat16", linear="int4", kernel_backend="triton", device="cuda",
            max_model_len=575, kv_cache_bytes=64 << 20, cuda_graph_max_batch=graphs,
        )  # fmt: skip
        engine = args.create_engine(checkpoint)
        completions = engine.generate(prompts, params)
        outputs[graphs] = [c.token_ids for c in completions]
        logprobs[graphs] = completions[1].logprobs
        runner = engine.runner
        if graphs:
            # 4 decoding (one wanting logprobs: the greedy graph, then the eager sampler),
            # then 3 (padded to 4) and 2 sampling in the graph (top-p), and others.
            assert runner.graphs is not None and runner.graphs.captured_sizes == [1, 2, 4]
            nucleus = SamplerPlan.of([sampled], checkpoint.config.vocab_size, device)
            plans = runner.graphs.captured_plans
            assert {(4, GREEDY), (4, nucleus), (2, nucleus)} <= set(plans), plans
            assert {plan for _, plan in plans} == {GREEDY, nucleus}, plans
            pad = engine.config.cache.num_blocks  # the padding rows' block, outside the pool
            assert runner.kv_cache.shape[0] == pad + 1
        else:
            assert runner.graphs is None
        # Rows of requests that stopped while their next step ran left no block behind.
        assert not engine.has_unfinished
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert [len(t) for t in outputs[64]] == list(max_tokens)
    assert outputs[64] == outputs[0]
    assert [lp.top for lp in logprobs[64]] == [lp.top for lp in logprobs[0]]
