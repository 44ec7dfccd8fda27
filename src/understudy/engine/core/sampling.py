"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import torch
from torch import Tensor

from understudy.common.params import SamplingParams  # noqa: F401  (re-exported: its home before params.py)


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row of logits [B, V]."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [params[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out.tolist()


def skip_draws(generator: torch.Generator, draws: int, vocab_size: int, device) -> None:
    """Advance a request's generator past `draws` calls of `sample` (SamplingParams.seed_offset).

    Each sampled token is one torch.multinomial over the vocabulary (float32 probabilities), whose
    random numbers do not depend on the probabilities' values: uniform ones consume the same."""
    probs = torch.ones(vocab_size, dtype=torch.float32, device=device)
    for _ in range(draws):
        torch.multinomial(probs, 1, generator=generator)


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays: a top_p
        # that is 0 in float32, e.g. 1e-300, dropped every token and the step died on NaN probabilities)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)
