"""Token sampling for a batch of last-position logits.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw
with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which needs one random
vector per row: a seeded request draws it from its own generator, so its samples never
depend on what else is in the batch. Logits may live on any device; the noise is drawn on
the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    token_logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        suppressed: list[tuple[int, ...]] | None = None,
    ) -> SampleResult:
        """logits [B, vocab] (any float dtype) -> one token per row.

        `suppressed[i]` lists token ids row i must not sample (EOS before `min_tokens`).
        """
        logits = logits.float()
        for i, ids in enumerate(suppressed or ()):
            if ids:
                logits[i, list(ids)] = float("-inf")
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, generators[i])
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(logits[wanted], dim=-1)
            for row, i in enumerate(wanted):
                logprobs[i] = _row_logprobs(lp[row], token_list[i], params[i].logprobs or 0)
        return SampleResult(token_list, logprobs)

    @staticmethod
    def _sample_row(
        logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None
    ) -> int:
        scaled = logits / p.temperature
        if 0 < p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        # Drawn on the host from the request's (CPU) generator, whatever device the logits
        # are on: a seeded request samples the same noise on a CPU and on a GPU.
        noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=generator)
        return int((probs / noise.to(probs.device)).argmax())


def _row_logprobs(lp: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = lp.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(float(lp[token]), top)
