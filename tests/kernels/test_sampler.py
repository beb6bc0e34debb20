"""engine.sampler.sample_tokens: the batched sampler the engine runs eagerly and inside its
decode CUDA graphs, against the one-row-at-a-time algorithm it replaced (kept here as the
reference), on this machine's device (`interp`: CPU in CI; `cuda`: the GPU)."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import (
    GREEDY,
    Sampler,
    SamplerPlan,
    SamplingTensors,
    sample_tokens,
    sample_tokens_torch,
    sample_tokens_triton,
)
from engine.sampling_params import SamplingParams

VOCAB = 1000
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    SamplingParams(temperature=0.7, top_p=0.5, seed=3),
    SamplingParams(temperature=1.0, top_k=100, top_p=0.9, seed=4),
    SamplingParams(temperature=0.0, top_k=3),  # greedy: its top-k is never read
    SamplingParams(temperature=1.0, top_k=1, seed=5),  # top-k 1 is the argmax
]


def _reference_row(logits: torch.Tensor, p: SamplingParams, noise: torch.Tensor) -> int:
    """The engine's sampler before it was batched (session 14), one row at a time."""
    if p.greedy:
        return int(logits.argmax())
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int((probs / noise.to(probs.device)).argmax())


def _noise(params: list[SamplingParams]) -> list[torch.Tensor]:
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    return [torch.empty(VOCAB).exponential_(generator=g) for g in gens]


def _tensors(
    params: list[SamplingParams], device: torch.device
) -> tuple[SamplerPlan, SamplingTensors]:
    plan = SamplerPlan.of(params, VOCAB, device)
    host = SamplingTensors.empty(len(params), VOCAB)
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    host.fill(params, gens, plan)
    return plan, host.to(device)


def test_plan_names_only_the_steps_the_batch_uses():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert SamplerPlan.of([SamplingParams(temperature=0.0, top_k=7)], VOCAB, gpu) == GREEDY
    assert SamplerPlan.of(PARAMS, VOCAB, gpu) == SamplerPlan(sample=True, top_k=128, top_p=True)
    assert SamplerPlan.of(PARAMS[:3], VOCAB, cpu) == SamplerPlan(sample=True, top_k=8)
    # top_k >= vocab keeps every token, as top_k 0 does.
    assert SamplerPlan.of([SamplingParams(top_k=VOCAB, seed=1)], VOCAB, cpu) == SamplerPlan(True)
    # Unseeded rows draw their noise on a GPU, on the host for a CPU.
    unseeded = [SamplingParams(temperature=0.5)]
    assert SamplerPlan.of(unseeded, VOCAB, gpu) == SamplerPlan(sample=True, device_noise=True)
    assert SamplerPlan.of(unseeded, VOCAB, cpu) == SamplerPlan(sample=True)


def test_batched_sampler_matches_row_by_row_reference(device: torch.device):
    logits = torch.randn(len(PARAMS), VOCAB, device=device) * 3
    plan, sampling = _tensors(PARAMS, device)
    tokens = sample_tokens(logits, plan, sampling).tolist()
    noise = _noise(PARAMS)
    expected = [_reference_row(logits[i], p, noise[i]) for i, p in enumerate(PARAMS)]
    assert tokens == expected
    assert tokens[6] == int(logits[6].argmax())  # top-k 1
    # Each row alone samples what it sampled in the batch.
    for i, p in enumerate(PARAMS):
        plan_i, sampling_i = _tensors([p], device)
        assert sample_tokens(logits[i : i + 1], plan_i, sampling_i).tolist() == [tokens[i]]


def test_eager_sampler_samples_a_mixed_batch_as_the_reference(device: torch.device):
    """The eager sampler (greedy rows by argmax, the sampled rows as a sub-batch) draws
    each seeded row's noise from its own generator, as the reference does."""
    logits = torch.randn(len(PARAMS), VOCAB, device=device) * 3
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in PARAMS]
    result = Sampler()(logits, PARAMS, gens, [()] * len(PARAMS))
    noise = _noise(PARAMS)
    expected = [_reference_row(logits[i], p, noise[i]) for i, p in enumerate(PARAMS)]
    assert result.token_ids == expected


def test_eager_sampler_suppresses_and_reports_logprobs(device: torch.device):
    logits = torch.randn(2, VOCAB, device=device)
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    result = Sampler()(logits, params, [None, None], [(top,), ()])
    assert result.token_ids[0] != top and result.token_ids[1] == int(logits[1].argmax())
    lp = result.logprobs[0]
    # The model's logprobs, from before the suppression: the blocked token still leads.
    assert lp is not None and [t for t, _ in lp.top] == [top, result.token_ids[0]]
    assert result.logprobs[1] is None


@pytest.mark.gpu
def test_sampler_in_a_cuda_graph_matches_eager():
    device = torch.device("cuda")
    logits = torch.randn(len(PARAMS), VOCAB, device=device) * 3
    plan, sampling = _tensors(PARAMS, device)
    static = logits.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_tokens(static, plan, sampling)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample_tokens(static, plan, sampling)
    for _ in range(3):
        fresh = torch.randn_like(logits) * 3
        static.copy_(fresh)
        graph.replay()
        assert tokens.tolist() == sample_tokens(fresh, plan, sampling).tolist()


def test_unseeded_rows_sample_within_their_limits(device: torch.device):
    """Unseeded rows (noise drawn on a GPU in the step) beside seeded ones: the seeded
    rows' tokens are the reference's, and every unseeded token is one its top-k / top-p
    allows; over many draws they spread over more than one token."""
    params = [
        *PARAMS,
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.3),
    ]
    logits = torch.randn(len(params), VOCAB, device=device) * 3
    plan, sampling = _tensors(params, device)
    assert plan.device_noise == (device.type == "cuda")
    noise = _noise(PARAMS)
    seeded = [_reference_row(logits[i], p, noise[i]) for i, p in enumerate(PARAMS)]
    top4 = set(logits[-2].topk(4).indices.tolist())
    sorted_probs, order = torch.softmax(logits[-1], dim=-1).sort(descending=True)
    nucleus = set(order[: int((sorted_probs.cumsum(0) < 0.3).sum()) + 1].tolist())
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(20):
        if device.type == "cpu":  # the host draws an unseeded row's noise afresh each step
            plan, sampling = _tensors(params, device)
        tokens = sample_tokens(logits, plan, sampling).tolist()
        assert tokens[: len(PARAMS)] == seeded
        assert tokens[-3] == int(logits[-3].argmax())
        for s, t in zip(seen, tokens[-3:], strict=True):
            s.add(t)
    assert seen[1] <= top4 and len(seen[1]) > 1
    assert seen[2] <= nucleus


def _triton_sample(logits: torch.Tensor, plan: SamplerPlan, sampling: SamplingTensors) -> list[int]:
    """The Triton sampler on its own, small chunks so each row spans several programs."""
    return sample_tokens_triton(logits, plan, sampling, chunk=256, block=128).tolist()


def test_triton_sampler_samples_as_the_torch_path(device: torch.device):
    """Same rows, same noise: the sort-free kernel draws the torch path's tokens, with
    bf16 and fp32 logits, ties at the k-th largest value and suppressed (-inf) tokens."""
    params = [*PARAMS, SamplingParams(temperature=0.9, top_k=7, seed=6)]
    params += [SamplingParams(temperature=1.1, top_k=20, top_p=0.7, seed=7)]
    logits = torch.randn(len(params), VOCAB, device=device) * 3
    logits[-2, :12] = logits[-2].max() + 1.0  # twelve tokens tie above the 7th
    logits[-1, ::3] = float("-inf")
    plan, sampling = _tensors(params, device)
    drawn = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        expected = sample_tokens_torch(x, plan, sampling).tolist()
        drawn[dtype] = _triton_sample(x, plan, sampling)
        assert drawn[dtype] == expected
    assert drawn[torch.float32][-1] % 3 != 0


def _edges(probs: torch.Tensor, p: SamplingParams) -> tuple[int, int | None]:
    """The least probable token a row keeps and the most probable one it drops (None if
    it keeps all), from the reference's sorted order."""
    order = probs.argsort(descending=True)
    keep = len(order)
    if 0 < p.top_k < len(order):
        keep = p.top_k
    if p.top_p < 1.0:
        kept = probs[order[:keep]] / probs[order[:keep]].sum()  # renormalized after top-k
        before = kept.cumsum(0) - kept
        keep = min(keep, int((before < p.top_p).sum()))
    return int(order[keep - 1]), int(order[keep]) if keep < len(order) else None


def test_triton_sampler_cuts_exactly_at_the_top_k_and_top_p_edges(device: torch.device):
    """Noise that makes the most probable dropped token the winner were it kept, and the
    least probable kept one the winner otherwise: a cut one token off either way shows."""
    params = [
        SamplingParams(temperature=1.0, top_k=37, seed=1),
        SamplingParams(temperature=0.6, top_p=0.8, seed=2),
        SamplingParams(temperature=1.4, top_p=0.35, seed=3),
        SamplingParams(temperature=1.0, top_k=300, top_p=0.97, seed=4),
        SamplingParams(temperature=2.0, top_k=2, top_p=0.999, seed=5),
        SamplingParams(temperature=0.5, seed=6),  # no cut: the least probable token wins
    ]
    logits = torch.randn(len(params), VOCAB, device=device) * 2
    plan, sampling = _tensors(params, device)
    expected = []
    for i, p in enumerate(params):
        probs = torch.softmax(logits[i].double().cpu() / p.temperature, dim=-1)
        last_kept, first_dropped = _edges(probs, p)
        sampling.noise[i] = 1.0
        sampling.noise[i, last_kept] = 1e-30
        if first_dropped is not None:
            sampling.noise[i, first_dropped] = 1e-35
        expected.append(last_kept)
    assert _triton_sample(logits, plan, sampling) == expected


def test_triton_sampler_races_each_row_against_its_own_noise(device: torch.device):
    """Under a device-noise plan, rows marked host race the host's noise and the others
    noise drawn on the device in the step: the same draw as the torch path's."""
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0)]
    logits = torch.randn(2, VOCAB, device=device)
    plan = SamplerPlan(sample=True, device_noise=True)
    sampling = SamplingTensors.empty(2, VOCAB, device)
    sampling.fill(params, [torch.Generator().manual_seed(1), None], plan)
    assert sampling.host_noise.tolist() == [True, False]
    torch.manual_seed(5)
    tokens = _triton_sample(logits, plan, sampling)
    torch.manual_seed(5)
    assert tokens == sample_tokens_torch(logits, plan, sampling).tolist()
    torch.manual_seed(5)
    drawn = torch.empty(2, VOCAB, device=device).exponential_()
    probs = torch.softmax(logits, dim=-1)
    assert tokens[0] == int((probs[0] / sampling.noise[0]).argmax())
    assert tokens[1] == int((probs[1] / drawn[1]).argmax())


def test_triton_sampler_keeps_tokens_tied_at_the_top_p_edge_together(device: torch.device):
    """Four tokens of equal probability straddle the top-p edge: the mass above each is
    below top_p, so all four stay (the reference's sort keeps whichever came first)."""
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=1)]
    logits = torch.full((1, VOCAB), -20.0, device=device)
    logits[0, 0] = 1.0
    tied = [100, 200, 300, 400]
    logits[0, tied] = 0.0  # p(0) ~ 0.4, each tied one ~ 0.15: the edge falls inside them
    plan, sampling = _tensors(params, device)
    for token in tied:
        sampling.noise.fill_(1.0)
        sampling.noise[0, token] = 1e-9
        assert _triton_sample(logits, plan, sampling) == [token]
    sampling.noise[0, 500] = 1e-30  # below the edge: never drawn
    assert _triton_sample(logits, plan, sampling) == [400]
