"""The engine on a GPU (issue 9): a random-weight model with Llama-3-8B's shapes.

    python bench/engine_gpu.py                   # on a CUDA GPU
    python bench/engine_gpu.py --layers 4        # a quicker, shallower model

Builds the model three times from the same random weights (bf16 dense, FP8, INT4; one at
a time, so at most one copy is on the card) with the Triton kernel backend and measures,
in one process:

- decode tokens/s at batch 1 and 32 over a 512-token context, eager (one Python call of
  `LlamaModel.forward` per step) and replayed from a CUDA graph of that same call;
- the same through the whole `LLMEngine` (scheduler, model runner, sampler) with its
  decode steps replayed from CUDA graphs (`engine.cuda_graphs`) and without;
- prefill tokens/s of one 2k and one 8k-token prompt (FP8 against bf16);
- the same-GPU KV handoff of a 2k-token prompt: its cache blocks copied into another
  engine's cache (device to device, block-major, so one gather-scatter) against the
  prompt's FP8 prefill time.

Weights are N(0, 1/fan-in) (no checkpoint can be downloaded); the numbers do not depend
on their values. Timing: CUDA events around many steps after warm-up, median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import tokenizers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paged_runner import BLOCK, Runner
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine_args import EngineArgs
from engine.kv_port import copy_blocks
from engine.loaders import LoadedCheckpoint
from engine.loaders.tensor_layout import expected_shapes
from engine.model import LlamaModel
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

CONTEXT = 512


def llama3_8b(layers: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=layers, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=8192 + 64, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, eos_token_ids=(128001,),
    )  # fmt: skip


class RandomWeights(Mapping[str, torch.Tensor]):
    """Checkpoint tensors made on the GPU when asked for, the same on every ask."""

    def __init__(self, cfg: ModelConfig, device: str) -> None:
        self.shapes = expected_shapes(cfg)
        self.device = device

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        gen = torch.Generator(device=self.device).manual_seed(hash(name) % 2**31)
        t = torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            return 1 + 0.1 * t
        return t * shape[-1] ** -0.5

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build(cfg: ModelConfig, linear: str, device: str) -> LlamaModel:
    config = EngineConfig(
        model=cfg, cache=CacheConfig(num_blocks=1),
        scheduler=SchedulerConfig(max_model_len=cfg.max_position_embeddings),
        dtype="bfloat16", linear=linear, kernel_backend="triton", device=device,
    )  # fmt: skip
    return LlamaModel(config, RandomWeights(cfg, device))


def median_ms(fn: Callable[[], object], iters: int) -> float:
    """Median over 5 runs of the mean time of `iters` calls, in ms."""
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def decode_rates(model: LlamaModel, cfg: ModelConfig, batch: int) -> tuple[float, float | str]:
    """Tokens/s of one decode step of `batch` sequences at CONTEXT: eager, CUDA graph."""
    runner = Runner(cfg, batch, CONTEXT + 1, "cuda")
    prompt = list(range(1, CONTEXT + 1))
    with torch.inference_mode():
        for b in range(batch):
            runner.step(model, [(b, prompt, 0)], 0)
    chunks = [(b, [7], CONTEXT) for b in range(batch)]
    eager = median_ms(lambda: runner.step(model, chunks, batch), 20)
    # The same step as a graph: metadata tensors are built once, outside the capture.
    meta_step = runner.prepare(chunks, batch)
    try:
        with torch.inference_mode():
            for _ in range(2):
                meta_step(model)  # warm-up compiles every kernel outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                meta_step(model)
        replay = median_ms(graph.replay, 50)
        graphed: float | str = batch / replay * 1e3
    except Exception as e:  # report why the step cannot be captured yet
        graphed = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return batch / eager * 1e3, graphed


def engine_decode_rate(cfg: ModelConfig, linear: str, graphs: int, batch: int) -> float:
    """Tokens/s of `LLMEngine.step` (scheduler, model, sampler) once `batch` requests with
    512-token prompts all decode; `graphs` is the engine's cuda_graph_max_batch."""
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    checkpoint = LoadedCheckpoint(
        config=cfg, tensors=RandomWeights(cfg, "cuda"),  # type: ignore[arg-type]
        tokenizer=Tokenizer(backend, bos_token_id=None, eos_token_ids=cfg.eos_token_ids),
        model_id="random-llama-3-8b-shapes", weights_digest="0" * 64, source=Path("<memory>"),
    )  # fmt: skip
    engine = EngineArgs(
        dtype="bfloat16", linear=linear, kernel_backend="triton", device="cuda",
        max_model_len=CONTEXT + 256, kv_cache_bytes=4 << 30, max_num_seqs=batch,
        max_num_batched_tokens=CONTEXT * batch, cuda_graph_max_batch=graphs,
    ).create_engine(checkpoint)  # fmt: skip
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(b * 31 + i) % cfg.vocab_size for i in range(CONTEXT)], params)
    started: set[str] = set()
    while len(started) < batch:  # prefill chunks until every request has its first token
        started.update(out.request_id for out in engine.step())
    for _ in range(3):
        engine.step()  # every request decodes now; captures the graph
    steps = 50
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(len(out.new_token_ids) for _ in range(steps) for out in engine.step())
    elapsed = time.perf_counter() - start
    assert tokens == steps * batch, tokens
    del engine
    torch.cuda.empty_cache()
    return tokens / elapsed


def prefill_ms(model: LlamaModel, cfg: ModelConfig, length: int) -> float:
    runner = Runner(cfg, 1, length, "cuda")
    prompt = [(0, [(i * 7919) % cfg.vocab_size for i in range(length)], 0)]

    def once() -> None:
        with torch.inference_mode():
            hidden = runner.step(model, prompt, 0)
            model.logits(hidden[-1:])

    return median_ms(once, 3)


def handoff_ms(cfg: ModelConfig, length: int) -> float:
    """The same-GPU handoff of one prompt: `engine.kv_port.copy_blocks` (what
    `InProcessDisaggregation.transfer` runs) from a prefill cache into free blocks of
    another cache."""
    blocks = -(-length // BLOCK)
    src = Runner(cfg, 1, length, "cuda").cache
    dst = Runner(cfg, 2, length, "cuda").cache
    src.normal_()
    src_ids = list(range(blocks))
    dst_ids = torch.randperm(2 * blocks)[:blocks].tolist()
    ms = median_ms(lambda: copy_blocks(src, src_ids, dst, dst_ids), 20)
    assert torch.equal(dst[dst_ids[3]], src[3])
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = llama3_8b(args.layers)
    card = torch.cuda.get_device_name()
    print(f"{card}; Llama-3-8B shapes, {args.layers} layers, random weights, Triton backend")
    rows: list[tuple[str, str]] = []
    results: dict[str, dict[str, float | str]] = {}
    for linear in ("dense", "int4", "fp8"):
        model = build(cfg, linear, "cuda")
        r: dict[str, float | str] = {}
        for batch in (1, 32):
            r[f"b{batch} eager"], r[f"b{batch} graph"] = decode_rates(model, cfg, batch)
        for length in (2048, 8192):
            r[f"prefill {length}"] = length / prefill_ms(model, cfg, length) * 1e3
        del model
        torch.cuda.empty_cache()
        if linear != "fp8":  # the decode pool's formats, through the whole engine
            for batch in (1, 32):
                for graphs in (64, 0):
                    key = f"engine b{batch} {'graphs' if graphs else 'eager'}"
                    r[key] = engine_decode_rate(cfg, linear, graphs, batch)
        results[linear] = r
        for key, value in r.items():
            shown = f"{value:9.1f} tok/s" if isinstance(value, float) else value
            rows.append((f"{linear:<5} {key}", shown))
            print(f"  {linear:<5} {key:<14} {shown}", flush=True)
    dense, int4, fp8 = results["dense"], results["int4"], results["fp8"]
    ratios = []
    for key in ("b1 eager", "b1 graph", "b32 eager", "b32 graph", "engine b1 graphs",
                "engine b32 graphs"):  # fmt: skip
        ours, peer = int4[key], dense[key]
        if isinstance(ours, float) and isinstance(peer, float):
            ratios.append((f"int4 / bf16 decode {key}", f"{ours / peer:.2f}x"))
    for length in (2048, 8192):
        key = f"prefill {length}"
        ratios.append((f"fp8 / bf16 {key}", f"{float(fp8[key]) / float(dense[key]):.2f}x"))
    hand = handoff_ms(cfg, 2048)
    prefill_2k = 2048 / float(fp8["prefill 2048"]) * 1e3
    ratios.append(("handoff 2k / fp8 prefill 2k", f"{hand:.3f} ms / {prefill_2k:.1f} ms = "
                   f"{hand / prefill_2k:.1%}"))  # fmt: skip
    print(f"\n| {card} | {args.layers} layers | value |\n|---|---|---|")
    for name, value in rows + ratios:
        print(f"| {name} | | {value} |")


if __name__ == "__main__":
    main()
