"""The engine on a GPU (issue 9): a random-weight model with Llama-3-8B's shapes.

    python bench/engine_gpu.py                   # on a CUDA GPU
    python bench/engine_gpu.py --layers 4        # a quicker, shallower model
    python bench/engine_gpu.py --sections compile  # the torch.compile peer alone
    python bench/engine_gpu.py --sections engine --batches 1 --baseline DIR
        # the engine's decode steps against an earlier tree (`git archive` into DIR)
    python bench/engine_gpu.py --sections handoff  # prefill and decode in two processes
    python bench/engine_gpu.py --sections ablate   # each op family's share of a b1 step
    python bench/engine_gpu.py --sections kv --batches 32  # FP8 KV cache against bf16

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
  prompt's FP8 prefill time;
- (section handoff) the same prompt handed across processes: an FP8 engine's process puts
  its blocks into a kvstore shard (shared memory), an INT4 engine's process gets them and
  decodes from them;
- the peer: the same bf16 weights decoded by a plain PyTorch loop (`StaticCacheLlama`, no
  Baton code in its step) compiled with `torch.compile`, at batch 1 and 32: 50 steps from
  position 512, each attending over the whole 576-slot static cache under a mask. Its step
  includes the LM head and greedy argmax, as the engine's does.

- (section ablate) the INT4 engine's batch-1 step (INT4 LM head) with one family of ops
  replaced by a no-op (wrong output, timing only): what each costs inside the graph as it
  runs, PDL overlap included, which a profile's per-kernel sums cannot say.

Weights are N(0, 1/fan-in) (no checkpoint can be downloaded); the numbers do not depend
on their values. Timing: CUDA events around many steps after warm-up, median of 5.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paged_runner import BLOCK, Runner
from bench.word_tokenizer import word_tokenizer
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine_args import EngineArgs
from engine.handoff import prefill_params
from engine.kv_port import copy_blocks
from engine.llm_engine import LLMEngine
from engine.loaders import LoadedCheckpoint
from engine.loaders.tensor_layout import expected_shapes
from engine.model import LlamaModel
from engine.rope import RotaryTable
from engine.sampler import SamplerPlan
from engine.sampling_params import SamplingParams
from kernels.pending_norm import PendingNorm

CONTEXT = 512
SECTIONS = ("compile", "formats", "engine", "kv", "handoff", "profile", "ablate")
HANDOFF_RUNS = 3


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
        # crc32, not hash(): the same weights in every process (a handoff's two engines).
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
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


def random_engine(cfg: ModelConfig, linear: str, **args: Any) -> LLMEngine:
    """An engine on the GPU (Triton kernels) over `RandomWeights`, a word-per-id tokenizer."""
    checkpoint = LoadedCheckpoint(
        config=cfg, tensors=RandomWeights(cfg, "cuda"),  # type: ignore[arg-type]
        tokenizer=word_tokenizer(cfg.vocab_size, cfg.eos_token_ids),
        model_id="random-llama-3-8b-shapes", weights_digest="0" * 64, source=Path("<memory>"),
    )  # fmt: skip
    return EngineArgs(
        dtype="bfloat16", linear=linear, kernel_backend="triton", device="cuda", **args
    ).create_engine(checkpoint)


def engine_decode_rate(
    cfg: ModelConfig,
    linear: str,
    graphs: int,
    batch: int,
    sampled: bool = False,
    lm_head: str = "dense",
    kv_cache_dtype: str = "auto",
    context: int = CONTEXT,
) -> tuple[float, float | None]:
    """Tokens/s of `LLMEngine.step` (scheduler, model runner, sampler) once `batch` requests
    with `context`-token prompts all decode, greedy or `sampled` (temperature and top-p,
    unseeded); `graphs` is the engine's cuda_graph_max_batch, `lm_head` its LM head's weight
    format, `kv_cache_dtype` its paged cache's.
    With graphs, also the ms of one replay of
    the step's graph alone (forward, LM head, sampler; CUDA events): the GPU's share of a
    step, the rest being the host's."""
    kv_bytes = max(4 << 30, 2 * batch * (context + 256) * cfg.num_layers * cfg.kv_size * 2)
    engine = random_engine(
        cfg, linear, max_model_len=context + 256, kv_cache_bytes=kv_bytes, max_num_seqs=batch,
        max_num_batched_tokens=min(context * batch, 16384), cuda_graph_max_batch=graphs,
        lm_head_linear=lm_head, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    for b in range(batch):
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        if sampled:
            params = SamplingParams(max_tokens=200, temperature=0.8, top_p=0.9, ignore_eos=True)
        engine.add_request([(b * 31 + i) % cfg.vocab_size for i in range(context)], params)
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
    replay_ms = None
    if engine.runner.graphs is not None:
        plan = SamplerPlan.of([params], cfg.vocab_size, torch.device("cuda"))
        replay_ms = median_ms(engine.runner.graphs.graph(batch, plan).replay, steps)
    del engine
    torch.cuda.empty_cache()
    return tokens / elapsed, replay_ms


def step_profile(
    cfg: ModelConfig, linear: str, batch: int, lm_head: str = "dense", top: int = 24
) -> list[str]:
    """Where the GPU's time in one engine decode step goes: the kernels of the step's CUDA
    graph (forward, LM head, sampler), replayed under torch.profiler, summed by name per
    step; the last line compares their sum with the replay's wall time (the gaps)."""
    from torch.profiler import ProfilerActivity, profile

    engine = random_engine(
        cfg, linear, max_model_len=CONTEXT + 256, kv_cache_bytes=4 << 30, max_num_seqs=batch,
        max_num_batched_tokens=CONTEXT * batch, cuda_graph_max_batch=64, lm_head_linear=lm_head,
    )  # fmt: skip
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(b * 31 + i) % cfg.vocab_size for i in range(CONTEXT)], params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step())
    for _ in range(3):
        engine.step()
    assert engine.runner.graphs is not None
    graph = engine.runner.graphs.graph(
        batch, SamplerPlan.of([params], cfg.vocab_size, torch.device("cuda"))
    )
    replay = median_ms(graph.replay, 50)
    steps = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time / steps
            t[1] += 1 / steps
    lines = []
    busy = sum(t for t, _ in totals.values())
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us:8.1f} us {n:6.1f}x  {name[:90]}")
    count = sum(n for _, n in totals.values())
    lines.append(f"kernels {busy:.1f} us in {count:.0f} launches; replay {replay * 1e3:.1f} us")
    del engine
    torch.cuda.empty_cache()
    return lines


def _no_norm(self: Any, x: torch.Tensor, weight: Any, eps: float, residual: Any = None) -> Any:
    return x, (x if residual is None else residual)


def _no_attention(self: Any, q: torch.Tensor, *args: Any) -> torch.Tensor:
    return q


def _rows(x: Any) -> torch.Tensor:
    return x.scaled if isinstance(x, PendingNorm) else x


def _no_int4(self: Any, x: Any, weight: Any, bias: Any = None) -> torch.Tensor:
    rows = _rows(x)
    return torch.empty((rows.shape[0], weight.out_features), dtype=rows.dtype, device=rows.device)


def _no_int4_swiglu(self: Any, x: Any, weight: Any) -> torch.Tensor:
    rows = _rows(x)
    shape = (rows.shape[0], weight.out_features // 2)
    return torch.empty(shape, dtype=rows.dtype, device=rows.device)


def _no_int4_add_norm(
    self: Any, x: torch.Tensor, weight: Any, residual: torch.Tensor, gamma: Any, eps: float
) -> tuple[PendingNorm, torch.Tensor]:
    sumsq = torch.ones((residual.shape[0], 1), dtype=torch.float32, device=residual.device)
    return PendingNorm(residual, sumsq, eps), residual


ABLATIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "nothing": {},
    "RMSNorm": {"rms_norm": _no_norm},
    "attention (RoPE, KV write)": {"rope_attention": _no_attention},
    "both": {"rms_norm": _no_norm, "rope_attention": _no_attention},
    "INT4 GEMMs (LM head too)": {
        "int4_linear": _no_int4,
        "int4_linear_swiglu": _no_int4_swiglu,
        "int4_linear_normed": _no_int4,
        "int4_linear_add_norm": _no_int4_add_norm,
    },
}
"""What section ablate removes: TritonBackend methods and their no-op stand-ins."""


def ablated_step_us(cfg: ModelConfig, removed: str) -> tuple[float, float]:
    """(engine tok/s, graph replay us) of the batch-1 INT4 engine (INT4 LM head) with the
    ops of `ABLATIONS[removed]` replaced by no-ops (outputs are garbage; timing only)."""
    from kernels.triton_backend import TritonBackend

    saved = {name: getattr(TritonBackend, name) for name in ABLATIONS[removed]}
    try:
        for name, stand_in in ABLATIONS[removed].items():
            setattr(TritonBackend, name, stand_in)
        rate, replay_ms = engine_decode_rate(cfg, "int4", 64, 1, lm_head="int4")
    finally:
        for name, method in saved.items():
            setattr(TritonBackend, name, method)
    assert replay_ms is not None
    return rate, replay_ms * 1e3


def tree_decode_rate(
    tree: str, layers: int, linear: str, batch: int, lm_head: str = "dense", sampled: bool = False
) -> tuple[float, float | None]:
    """`engine_decode_rate` (greedy, graphs) of another Baton tree (`git archive` of a
    commit) in a fresh process of its own: (tokens/s, ms of one step's graph replay, None
    where that tree does not report it). The A/B against an earlier engine (`--baseline`,
    `bench/engine_ab.py`)."""
    head = "" if lm_head == "dense" else f", lm_head={lm_head!r}"  # trees before INT4 heads
    code = (
        f"import sys; sys.path.insert(0, {tree!r}); import torch; "
        "torch.set_grad_enabled(False); "
        "from bench.engine_gpu import engine_decode_rate, llama3_8b; "
        f"r = engine_decode_rate(llama3_8b({layers}), {linear!r}, 64, {batch}, {sampled}{head}); "
        "r = r if isinstance(r, tuple) else (r, None); "
        "print('RATE', r[0], r[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    rate, replay = out.rsplit("RATE", 1)[1].split()
    return float(rate), None if replay == "None" else float(replay)


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


def _serve_shard(port: int, capacity: int, ready: Any) -> None:
    """A kvstore shard (in-process prefix index, shared-memory arena) in its own process."""
    from services.kvstore.server import KVStoreServer, ServerConfig

    async def serve() -> None:
        config = ServerConfig(f"bench-{port}", capacity, host="127.0.0.1", port=port)
        server = KVStoreServer(config)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def _prompt(length: int, salt: int, vocab: int) -> list[int]:
    return [(i * 7919 + salt * 104729) % vocab for i in range(length)]


def _block_sums(kv_cache: torch.Tensor, block_ids: list[int]) -> list[int]:
    """Each block's bf16 bit patterns summed as integers: equal on both sides of a
    bit-exact copy, and a block landing in the wrong slot changes the list."""
    blocks = kv_cache[torch.tensor(block_ids, device=kv_cache.device)]
    return blocks.view(torch.int16).flatten(1).sum(1, dtype=torch.int64).tolist()


def _handoff_side(
    layers: int, length: int, linear: str
) -> tuple[ModelConfig, LLMEngine, torch.Tensor, Any]:
    """One side of the cross-process handoff: (model config, engine, a pinned staging
    buffer for a prompt's blocks, the KV store client's config: shared memory)."""
    from services.kvstore.client import ClientConfig

    torch.set_grad_enabled(False)
    cfg = llama3_8b(layers)
    engine = random_engine(cfg, linear, max_model_len=length + 64, kv_cache_bytes=2 << 30,
                           max_num_batched_tokens=length)  # fmt: skip
    kv_cache = engine.port.kv_cache
    staging = torch.empty((length // BLOCK, *kv_cache.shape[1:]), dtype=kv_cache.dtype,
                          pin_memory=True)  # fmt: skip
    return cfg, engine, staging, ClientConfig(timeout_s=120, shared_memory=True)


def _prefill_worker(layers: int, length: int, address: str, conn: Any) -> None:
    """The prefill process: FP8 engine; per prompt, prefill it (timed), then hand its blocks
    to the KV store (timed: `KVPort.read_blocks` into pinned memory, the client's put)."""
    from services.kvstore.client import KVStoreClient

    cfg, engine, staging, config = _handoff_side(layers, length, "fp8")
    port = engine.port

    async def run() -> None:
        client = KVStoreClient([address], engine.fingerprint, engine.block_format, config)
        for salt in range(HANDOFF_RUNS):  # the first warms up kernels and the transfer path
            prompt = _prompt(length, salt, cfg.vocab_size)
            params = prefill_params(SamplingParams(max_tokens=8, temperature=0.0))
            torch.cuda.synchronize()
            began = time.perf_counter()
            rid = engine.add_request(prompt, params, hold_prompt_blocks=True)
            (first,) = [c.token_ids[0] for c in engine.collect([rid])]
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - began
            held = port.held(rid)
            hashes, ids = [h for h, _ in held], [i for _, i in held]
            began = time.perf_counter()
            port.read_blocks(ids, staging)
            read_s = time.perf_counter() - began
            summary = await client.put(hashes, list(staging))
            put_s = time.perf_counter() - began - read_s
            conn.send(dict(prompt=prompt, first=first, hashes=hashes,
                           fingerprint=engine.fingerprint, sums=_block_sums(port.kv_cache, ids),
                           prefill_s=prefill_s, read_s=read_s, put_s=put_s,
                           stored=summary.stored))  # fmt: skip
            port.release_held(rid)
        await client.close()

    asyncio.run(run())


def _decode_worker(layers: int, length: int, address: str, conn: Any) -> None:
    """The decode process: INT4 engine; per handoff, pull its blocks from the KV store
    (timed: the client's get into pinned memory, `KVPort.write_blocks`), then decode."""
    from services.kvstore.client import KVStoreClient

    _, engine, staging, config = _handoff_side(layers, length, "int4")
    port = engine.port

    async def run() -> None:
        clients: dict[bytes, KVStoreClient] = {}
        for _ in range(HANDOFF_RUNS):
            h = conn.recv()
            fingerprint = h["fingerprint"]
            if fingerprint.digest not in clients:
                clients[fingerprint.digest] = KVStoreClient(
                    [address], fingerprint, engine.block_format, config
                )
            client = clients[fingerprint.digest]
            ids = port.reserve(len(h["hashes"]))
            assert ids is not None
            began = time.perf_counter()
            got = await client.get_into(h["hashes"], list(staging))
            get_s = time.perf_counter() - began
            port.write_blocks(ids, staging)
            write_s = time.perf_counter() - began - get_s
            port.publish(ids, h["hashes"])
            exact = _block_sums(port.kv_cache, ids) == h["sums"]
            rid = engine.add_request(
                h["prompt"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                kv_fingerprint=fingerprint, output_prefix=[h["first"]], pinned_blocks=ids,
            )  # fmt: skip
            (done,) = engine.collect([rid])
            conn.send(dict(got=got, get_s=get_s, write_s=write_s, exact=exact,
                           cached=done.num_cached_tokens, tokens=len(done.token_ids)))  # fmt: skip
        for c in clients.values():
            await c.close()

    asyncio.run(run())


def _receive(conn: Any, worker: str) -> Any:
    if not conn.poll(240):
        raise RuntimeError(f"the {worker} worker sent nothing for 240 s (see its traceback)")
    return conn.recv()


def cross_process_handoff(layers: int, length: int) -> list[dict[str, Any]]:
    """A `length`-token prompt prefilled by an FP8 engine in one process and decoded by an
    INT4 engine in another, its KV blocks through a kvstore shard (a third process) over
    the shared-memory path. One dict of timings per run (the first warms up)."""
    spawn = mp.get_context("spawn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    ready = spawn.Event()
    nbytes = length // BLOCK * BLOCK * 2 * llama3_8b(layers).kv_size * layers * 2
    shard = spawn.Process(target=_serve_shard, args=(port, (HANDOFF_RUNS + 1) * nbytes, ready))
    shard.start()
    prefill_end, prefill_conn = spawn.Pipe()
    decode_end, decode_conn = spawn.Pipe()
    workers = [
        spawn.Process(target=_prefill_worker, args=(layers, length, address, prefill_conn)),
        spawn.Process(target=_decode_worker, args=(layers, length, address, decode_conn)),
    ]
    try:
        if not ready.wait(60):
            raise RuntimeError("the kvstore shard did not start")
        for w in workers:
            w.start()
        runs = []
        for _ in range(HANDOFF_RUNS):
            handoff = _receive(prefill_end, "prefill")
            decode_end.send(handoff)
            pulled = _receive(decode_end, "decode")
            runs.append({**handoff, **pulled, "nbytes": nbytes})
        return runs
    finally:
        for p in (*workers, shard):
            p.join(timeout=30 if p is not shard else 0)
            if p.is_alive():
                p.terminate()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [batch, heads, head_dim]; cos/sin [1, head_dim // 2] in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class PeerLayer(torch.nn.Module):
    """A Llama decoder layer with its own static KV cache [batch, kv_heads, max_len, head_dim]."""

    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(
        self, cfg: ModelConfig, w: Mapping[str, torch.Tensor], i: int, batch: int, max_len: int,
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        layer = f"model.layers.{i}."
        attn, mlp = layer + "self_attn.", layer + "mlp."
        # Fused q/k/v and gate/up, as gpt-fast and the engine both do: one GEMM each.
        qkv = torch.cat([w[attn + f"{x}_proj.weight"] for x in "qkv"])
        gate_up = torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]])
        self.register_buffer("attn_norm", w[layer + "input_layernorm.weight"].to(dtype))
        self.register_buffer("wqkv", qkv.to(dtype))
        self.register_buffer("wo", w[attn + "o_proj.weight"].to(dtype))
        self.register_buffer("mlp_norm", w[layer + "post_attention_layernorm.weight"].to(dtype))
        self.register_buffer("w13", gate_up.to(dtype))
        self.register_buffer("w2", w[mlp + "down_proj.weight"].to(dtype))
        # Random, not zeros: the cache up to CONTEXT stands for a prefilled prompt.
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        gen = torch.Generator(device="cuda").manual_seed(1000 + i)
        for name in ("k_cache", "v_cache"):
            cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
            self.register_buffer(name, cache.to(dtype))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        cfg, batch = self.cfg, x.shape[0]
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = F.linear(rms_norm(x, self.attn_norm, cfg.rms_norm_eps), self.wqkv).split(
            [cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1
        )
        q = rope(q.view(batch, heads, dim), cos, sin)
        k = rope(k.view(batch, kv_heads, dim), cos, sin)
        self.k_cache[:, :, pos] = k.unsqueeze(2)
        self.v_cache[:, :, pos] = v.view(batch, kv_heads, 1, dim)
        # The query heads that share a KV head attend as that head's query rows, so the
        # cache is read once, never repeated per query head; the mask hides slots > pos.
        q = q.view(batch, kv_heads, heads // kv_heads, dim)
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + F.linear(o.reshape(batch, cfg.q_size), self.wo)
        gate, up = F.linear(rms_norm(x, self.mlp_norm, cfg.rms_norm_eps), self.w13).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, self.w2)


class StaticCacheLlama(torch.nn.Module):
    """The peer: Llama decode as a user writes it for `torch.compile`, without Baton (gpt-fast's
    shape). Each call is one greedy decode step of every sequence: it reads `tokens` and the
    device-tensor position `pos`, writes K/V at `pos`, attends over the whole static cache
    under a mask, and leaves the argmax in `tokens` and `pos + 1` in `pos`, so one compiled
    graph serves every step and nothing syncs with the host. Returns the logits."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor
    tokens: torch.Tensor
    pos: torch.Tensor

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        self.cfg = cfg
        w = RandomWeights(cfg, "cuda")  # the engine's dense model's very tensors
        self.register_buffer("embed", w["model.embed_tokens.weight"].to(dtype))
        self.layers = torch.nn.ModuleList(
            PeerLayer(cfg, w, i, batch, max_len, dtype) for i in range(cfg.num_layers)
        )
        self.register_buffer("norm", w["model.norm.weight"].to(dtype))
        self.register_buffer("lm_head", w["lm_head.weight"].to(dtype))
        rotary = RotaryTable(cfg, max_len, "cuda")
        self.register_buffer("cos", rotary.cos)
        self.register_buffer("sin", rotary.sin)
        self.register_buffer("slots", torch.arange(max_len, device="cuda"))
        self.register_buffer("tokens", torch.zeros(batch, dtype=torch.int64, device="cuda"))
        self.register_buffer("pos", torch.zeros(1, dtype=torch.int64, device="cuda"))

    def restart(self, tokens: torch.Tensor) -> None:
        self.tokens.copy_(tokens)
        self.pos.fill_(CONTEXT)

    def forward(self) -> torch.Tensor:
        x = self.embed[self.tokens]
        cos, sin = self.cos[self.pos], self.sin[self.pos]
        mask = (self.slots <= self.pos).view(1, 1, 1, -1)
        for layer in self.layers:
            x = layer(x, cos, sin, self.pos, mask)
        logits = F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)
        self.tokens.copy_(logits.argmax(dim=-1))  # greedy, kept on the device
        self.pos.add_(1)
        return logits


def compiled_decode_rate(cfg: ModelConfig, batch: int, mode: str) -> tuple[float, str]:
    """Tokens/s of the compiled peer decoding `batch` sequences from CONTEXT, and how it got
    there: compile and capture times, and the check of its first step's logits against
    eager bf16's and against the same model's in fp32 (the same bf16 values, upcast)."""
    steps = 50
    max_len = -(-(CONTEXT + steps) // 16) * 16
    first = (torch.arange(batch, device="cuda") * 31 + 7) % cfg.vocab_size
    reference = StaticCacheLlama(cfg, batch, max_len, torch.float32)
    reference.restart(first)
    fp32 = reference()
    del reference
    model = StaticCacheLlama(cfg, batch, max_len)
    model.restart(first)
    eager = model().float()
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    # dynamic=False: batch 1 and 32 each get a graph specialised to their shapes.
    step = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
    try:
        times = []
        for _ in range(3):  # compile (and run once), record the CUDA graph, replay it
            model.restart(first)
            torch.compiler.cudagraph_mark_step_begin()
            start = time.perf_counter()
            logits = step().float()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        diff = (logits - eager).abs().max().item()
        same = int((logits.argmax(-1) == eager.argmax(-1)).sum())
        eager_err, compiled_err = (
            ((x - fp32).norm() / fp32.norm()).item() for x in (eager, logits)
        )
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
        how = (f"compile {times[0]:.1f} s, capture {times[1]:.2f} s; vs eager bf16 max |diff| "
               f"{diff:.3f}, argmax {same}/{batch}; rel err vs fp32: eager {eager_err:.1e}, "
               f"compiled {compiled_err:.1e}")  # fmt: skip
        if skips:
            how += f", {skips} cudagraph skips"
        # Random weights amplify bf16 rounding over 32 layers, so eager bf16 itself lands
        # ~5e-2 from fp32; a replay reading a stale position or cache would be far worse.
        assert compiled_err < 1.5 * eager_err + 1e-2, f"compiled logits are off: {how}"
        runs = []
        for _ in range(6):  # the first is warm-up
            model.restart(first)
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                torch.compiler.cudagraph_mark_step_begin()
                step()
            end.record()
            torch.cuda.synchronize()
            runs.append(begin.elapsed_time(end) / steps)
        assert int(model.pos) == CONTEXT + steps, int(model.pos)
    finally:
        del step, model
        torch._dynamo.reset()  # frees the compiled graphs and their CUDA graph pools
        torch.cuda.empty_cache()
    return batch / statistics.median(runs[1:]) * 1e3, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="compile: the torch.compile peer; formats: the engine's bf16/INT4/FP8; engine: "
        "the engine's decode steps alone (graphs), against --baseline",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="section engine")
    ap.add_argument(
        "--baseline",
        help="section engine: a `git archive` of an earlier Baton tree, whose engine's "
        "greedy decode is measured in the same run (a subprocess per row)",
    )
    ap.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "max-autotune-no-cudagraphs"),
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = llama3_8b(args.layers)
    card = torch.cuda.get_device_name()
    print(f"{card}; Llama-3-8B shapes, {args.layers} layers, random weights, Triton backend")
    rows: list[tuple[str, str]] = []

    def report(name: str, value: float | str) -> None:
        shown = f"{value:9.1f} tok/s" if isinstance(value, float) else value
        rows.append((name, shown))
        print(f"  {name:<26} {shown}", flush=True)

    peer: dict[int, float | str] = {}
    if "compile" in args.sections:  # first, while the card holds nothing else
        for batch in (1, 32):
            name = f"torch.compile bf16 b{batch}"
            try:
                peer[batch], how = compiled_decode_rate(cfg, batch, args.compile_mode)
            except Exception as e:  # report why the peer cannot run
                peer[batch], how = f"failed: {type(e).__name__}: {str(e)[:200]}", ""
            report(name, peer[batch])
            report(f"{name} ({args.compile_mode})", how)
    results: dict[str, dict[str, float | str]] = {}
    for linear in ("dense", "int4", "fp8") if "formats" in args.sections else ():
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
                    r[key] = engine_decode_rate(cfg, linear, graphs, batch)[0]
        results[linear] = r
        for key, value in r.items():
            report(f"{linear:<5} {key}", value)
    ratios = []
    if "engine" in args.sections:
        rates: dict[str, float] = {}
        for linear in ("dense", "int4"):
            for batch in args.batches:
                if args.baseline:
                    key = f"{linear} baseline engine b{batch}"
                    rates[key] = tree_decode_rate(args.baseline, args.layers, linear, batch)[0]
                    report(key, rates[key])
                variants = [(False, "dense")]
                if linear == "int4":  # also with the LM head in INT4, as torchao's figure
                    variants += [(False, "int4"), (True, "int4")]
                for sampled, head in variants:
                    key = f"{linear} engine b{batch}" + (" sampled" if sampled else "")
                    key += " int4 head" if head == "int4" else ""
                    rates[key], replay = engine_decode_rate(
                        cfg, linear, 64, batch, sampled, lm_head=head
                    )
                    report(key, rates[key])
                    assert replay is not None
                    report(f"{key} graph replay alone", batch / replay * 1e3)
        for batch in args.batches:
            int4_rate, dense_rate = rates[f"int4 engine b{batch}"], rates[f"dense engine b{batch}"]
            ratios.append((f"int4 / bf16 engine b{batch}", f"{int4_rate / dense_rate:.2f}x"))
            head_rate = rates[f"int4 engine b{batch} int4 head"]
            ratios.append(
                (f"int4 (int4 head) / bf16 engine b{batch}", f"{head_rate / dense_rate:.2f}x")
            )
            for linear in ("dense", "int4") if args.baseline else ():
                was = rates[f"{linear} baseline engine b{batch}"]
                now = rates[f"{linear} engine b{batch}"]
                ratios.append((f"{linear} engine b{batch} / baseline", f"{now / was:.2f}x"))
    if "kv" in args.sections:  # the FP8 KV cache against the bf16 one, INT4 weights
        for context in (512, 2048):
            for batch in args.batches:
                kv_rates = {}
                for kv in ("auto", "fp8"):
                    key = f"int4 engine b{batch} ctx {context} kv {kv}"
                    kv_rates[kv] = engine_decode_rate(
                        cfg, "int4", 64, batch, lm_head="int4", kv_cache_dtype=kv, context=context
                    )[0]
                    report(key, kv_rates[kv])
                ratios.append(
                    (
                        f"fp8 / bf16 KV b{batch} ctx {context}",
                        f"{kv_rates['fp8'] / kv_rates['auto']:.2f}x",
                    )
                )
    if "profile" in args.sections:
        for linear, head in (("int4", "int4"), ("int4", "dense"), ("dense", "dense")):
            print(f"{linear} engine ({head} LM head) b1 decode step, per step:")
            for line in step_profile(cfg, linear, 1, head):
                print("  " + line, flush=True)
    if "ablate" in args.sections:
        print("int4 engine (int4 LM head) b1 decode step with one family of ops removed:")
        base_us = 0.0
        for removed in ABLATIONS:
            rate, us = ablated_step_us(cfg, removed)
            base_us = base_us or us
            print(f"  {removed:<26} {rate:7.1f} tok/s, replay {us:7.1f} us "
                  f"({base_us - us:6.1f} us a step)", flush=True)  # fmt: skip
    if "handoff" in args.sections:
        length = 2048
        for i, h in enumerate(cross_process_handoff(args.layers, length)):
            moved = h["read_s"] + h["put_s"] + h["get_s"] + h["write_s"]
            gbps = h["nbytes"] / moved / 1e9
            report(f"cross-process handoff {length} run {i}", (
                f"{moved * 1e3:.1f} ms ({gbps:.1f} GB/s; read {h['read_s'] * 1e3:.1f} + put "
                f"{h['put_s'] * 1e3:.1f} + get {h['get_s'] * 1e3:.1f} + write "
                f"{h['write_s'] * 1e3:.1f}) / fp8 prefill {h['prefill_s'] * 1e3:.1f} ms = "
                f"{moved / h['prefill_s']:.0%}; {h['got']} blocks, bit-exact {h['exact']}, "
                f"decode cached {h['cached']} tokens, {h['tokens']} out"))  # fmt: skip
    if results:
        dense, int4, fp8 = results["dense"], results["int4"], results["fp8"]
        for key in ("b1 eager", "b1 graph", "b32 eager", "b32 graph", "engine b1 graphs",
                    "engine b32 graphs"):  # fmt: skip
            ours, other = int4[key], dense[key]
            if isinstance(ours, float) and isinstance(other, float):
                ratios.append((f"int4 / bf16 decode {key}", f"{ours / other:.2f}x"))
        for length in (2048, 8192):
            key = f"prefill {length}"
            ratios.append((f"fp8 / bf16 {key}", f"{float(fp8[key]) / float(dense[key]):.2f}x"))
        hand = handoff_ms(cfg, 2048)
        prefill_2k = 2048 / float(fp8["prefill 2048"]) * 1e3
        ratios.append(("handoff 2k / fp8 prefill 2k", f"{hand:.3f} ms / {prefill_2k:.1f} ms = "
                       f"{hand / prefill_2k:.1%}"))  # fmt: skip
    for batch, compiled in peer.items():
        for linear in ("int4", "dense"):
            engine = results.get(linear, {}).get(f"engine b{batch} graphs")
            if isinstance(engine, float) and isinstance(compiled, float):
                name = f"{linear} engine b{batch} graphs / torch.compile bf16 b{batch}"
                ratios.append((name, f"{engine / compiled:.2f}x"))
    print(f"\n| {card} | {args.layers} layers | value |\n|---|---|---|")
    for name, value in rows + ratios:
        print(f"| {name} | | {value} |")


if __name__ == "__main__":
    main()
