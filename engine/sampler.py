"""Token sampling for a batch of last-position logits, on the logits' device.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw
with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which needs one random
vector per row. A seeded request draws it on the host from its own generator, so its
samples never depend on what else is in the batch, nor on the device (the same noise on a
CPU and on a GPU). An unseeded request promises no reproducibility: on a GPU its noise is
drawn there, inside the step (a host draw of a 128k vocabulary costs milliseconds).
Everything after the host's draws is `sample_tokens`, with no host sync, so a CUDA graph
captures it right after the LM head (engine.cuda_graphs): on a GPU a Triton sampler that
finds the top-k and top-p cuts by search instead of sorting the vocabulary
(`kernels.sampling_triton`), elsewhere whole-batch torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from kernels.argmax import argmax_rows


@dataclass(frozen=True)
class TokenLogprobs:
    token_logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(frozen=True)
class SamplerPlan:
    """Which steps of sampling a batch needs: a step computes only those, and a CUDA graph
    is captured per plan. `top_k` is a power-of-two bound on the batch's largest top-k
    (0: no row uses top-k), so a handful of plans cover every request. `device_noise`:
    the unseeded sampled rows' noise is drawn on the logits' device, in the step."""

    sample: bool = False
    top_k: int = 0
    top_p: bool = False
    device_noise: bool = False

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> SamplerPlan:
        sampled = [p for p in params if not p.greedy]
        ks = [p.top_k for p in sampled if 0 < p.top_k < vocab_size]
        bound = min(1 << (max(ks) - 1).bit_length(), vocab_size) if ks else 0
        unseeded = device.type != "cpu" and any(p.seed is None for p in sampled)
        return cls(bool(sampled), bound, any(p.top_p < 1.0 for p in sampled), unseeded)


GREEDY = SamplerPlan()


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling inputs: temperature [B] (0: greedy), top_k [B] (0: off), top_p [B]
    (1: off), Exp(1) noise [B, vocab] drawn on the host, and which rows use it (`host_noise`
    [B]; under a `device_noise` plan the other rows draw theirs in the step)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    noise: torch.Tensor
    host_noise: torch.Tensor

    @classmethod
    def empty(
        cls, rows: int, vocab_size: int, device: torch.device | str = "cpu", pin: bool = False
    ) -> SamplingTensors:
        def make(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.ones(shape, dtype=dtype, device=device, pin_memory=pin)

        return cls(
            make(rows, dtype=torch.float32),
            make(rows, dtype=torch.int64),
            make(rows, dtype=torch.float32),
            make(rows, vocab_size, dtype=torch.float32),
            make(rows, dtype=torch.bool),
        )

    def fill(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        plan: SamplerPlan,
    ) -> bool:
        """Write the rows of `params` (host tensors); rows past them become greedy padding.
        Draws one noise vector per sampled row the plan leaves to the host, in row order;
        returns whether there was one."""
        n = len(params)
        # A greedy row's temperature is 0 whatever its params say (below SAMPLING_EPS).
        self.temperature[:n] = torch.tensor([0.0 if p.greedy else p.temperature for p in params])
        self.temperature[n:] = 0.0
        self.top_k[:n] = torch.tensor([p.top_k for p in params])
        self.top_p[:n] = torch.tensor([p.top_p for p in params])
        host = [not p.greedy and not (plan.device_noise and p.seed is None) for p in params]
        self.host_noise[:n] = torch.tensor(host)
        self.host_noise[n:] = True
        vocab = self.noise.shape[1]
        for i, generator in enumerate(generators):
            if host[i]:
                # Drawn as a fresh vector, as the engine's other draws of a request's
                # generator are (LLMEngine._skip_sample): the same values on every path.
                self.noise[i] = torch.empty(vocab).exponential_(generator=generator)
        return any(host)

    def copy_(self, src: SamplingTensors, rows: int, noise: bool) -> None:
        """Asynchronously copy the first `rows` rows of `src` (pinned) into these tensors."""
        names = ["temperature", "top_k", "top_p", "host_noise"] + (["noise"] if noise else [])
        for name in names:
            getattr(self, name)[:rows].copy_(getattr(src, name)[:rows], non_blocking=True)

    def to(self, device: torch.device) -> SamplingTensors:
        return SamplingTensors(*(t.to(device) for t in vars(self).values()))


def sample_tokens(
    logits: torch.Tensor, plan: SamplerPlan, sampling: SamplingTensors | None
) -> torch.Tensor:
    """logits [B, vocab] (any float dtype; sampling runs in float32) -> [B] int64 token
    ids, without a host sync: on a GPU the sort-free Triton sampler
    (`kernels.sampling_triton`), elsewhere `sample_tokens_torch`, its reference.

    Each row's arithmetic is its own (row-wise ops only), so a row samples the same token
    whatever else is in the batch, and the same as a batch of one.
    """
    if plan.sample and logits.is_cuda and logits.stride(1) == 1:
        return sample_tokens_triton(logits, plan, sampling)
    return sample_tokens_torch(logits, plan, sampling)


def sample_tokens_triton(
    logits: torch.Tensor,
    plan: SamplerPlan,
    sampling: SamplingTensors | None,
    chunk: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """`sample_tokens` through `kernels.sampling_triton` (on a CPU only under Triton's
    interpreter); `chunk` and `block` override its tiles (tests use small ones)."""
    assert sampling is not None, "a sampling plan needs its SamplingTensors"
    # Imported here: a CPU-only install never loads Triton (as kernels.argmax).
    from kernels.sampling_triton import sample_rows

    drawn = None
    if plan.device_noise:
        drawn = torch.empty(logits.shape, device=logits.device).exponential_()
    sampled = sample_rows(
        logits,
        sampling.temperature,
        sampling.top_k if plan.top_k else None,
        sampling.top_p if plan.top_p else None,
        sampling.noise,
        drawn,
        sampling.host_noise if plan.device_noise else None,
        chunk=chunk,
        block=block,
    )
    return torch.where(sampling.temperature > 0, sampled, argmax_rows(logits))


def sample_tokens_torch(
    logits: torch.Tensor, plan: SamplerPlan, sampling: SamplingTensors | None
) -> torch.Tensor:
    """`sample_tokens` in torch ops: the CPU path, and the GPU kernel's reference (it
    sorts the vocabulary for top-p)."""
    greedy = argmax_rows(logits)
    if not plan.sample:
        return greedy
    assert sampling is not None, "a sampling plan needs its SamplingTensors"
    logits = logits.float()
    temperature = sampling.temperature
    scaled = logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)
    if plan.top_k:
        top_k = sampling.top_k
        # The k-th largest value, from the plan's bound of largest values; rows without
        # top-k keep everything (a threshold of -inf).
        index = (top_k.clamp(1, plan.top_k) - 1).unsqueeze(1)
        kth = scaled.topk(plan.top_k, dim=-1).values.gather(1, index)
        off = (top_k <= 0) | (top_k >= logits.shape[-1])
        kth = kth.masked_fill(off.unsqueeze(1), float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if plan.top_p:
        top_p = sampling.top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p.unsqueeze(1)
        drop &= (top_p < 1.0).unsqueeze(1)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    noise = sampling.noise
    if plan.device_noise:
        drawn = torch.empty_like(probs).exponential_()
        noise = torch.where(sampling.host_noise.unsqueeze(1), noise, drawn)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


class Sampler:
    """The eager path: prefill steps, mixed batches, and steps that suppress tokens or
    want logprobs (a CUDA graph's steps sample inside the graph)."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppressed: list[tuple[int, ...]] | None = None,
    ) -> SampleResult:
        """logits [B, vocab] (any float dtype) -> one token per row.

        `suppressed[i]` lists token ids row i must not sample (EOS before `min_tokens`).
        Logprobs are the model's own, from the logits before that suppression (as vLLM's
        default raw logprobs): a blocked EOS still shows, and the rest are not renormalized.
        """
        logits = logits.float()
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp = torch.log_softmax(logits[wanted], dim=-1) if wanted else None  # a copy
        for i, ids in enumerate(suppressed or ()):
            if ids:
                logits[i, list(ids)] = float("-inf")
        tokens = argmax_rows(logits)
        # Only the sampled rows pay for noise, softmax and sorting (greedy rows are their
        # argmax; sample_tokens is row-wise, so the subset samples what the batch would).
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            chosen = [params[i] for i in sampled]
            plan = SamplerPlan.of(chosen, logits.shape[1], logits.device)
            host = SamplingTensors.empty(len(sampled), logits.shape[1])
            host.fill(chosen, [generators[i] for i in sampled], plan)
            idx = torch.tensor(sampled, device=logits.device)
            tokens[idx] = sample_tokens(logits[idx], plan, host.to(logits.device))
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        if lp is not None:
            for row, i in enumerate(wanted):
                logprobs[i] = _row_logprobs(lp[row], token_list[i], params[i].logprobs or 0)
        return SampleResult(token_list, logprobs)


def _row_logprobs(lp: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = lp.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(float(lp[token]), top)
