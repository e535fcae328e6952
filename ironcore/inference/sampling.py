"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Filters apply in the usual order (as Hugging Face and Megatron do): divide by the temperature, keep
the ``top_k`` most likely tokens, then keep the smallest set whose probability reaches ``top_p``.
Draws come from an explicit ``torch.Generator``, so a seed reproduces a generation exactly, and
every TP rank (same logits, same seed) draws the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy decoding (top-k/top-p are then unused);
    ``top_k == 0`` and ``top_p == 1.0`` disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits [b, V]`` with everything below the k-th largest value set to -inf (k=0: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits [b, V]`` keeping the most likely tokens until their probability mass reaches ``p``
    (at least one token is always kept); the rest are set to -inf (p=1: unchanged)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass of the tokens ranked above it already reaches p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token ``[b]`` (int64) for each row of full-vocabulary ``logits [b, V]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    logits = filter_top_p(filter_top_k(logits, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
