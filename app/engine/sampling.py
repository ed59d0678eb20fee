"""Decoding parameters and pure functions on logits: temperature, top-k, top-p, min-p, choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Strategy = Literal["greedy", "sample", "beam"]
STRATEGIES: tuple[str, ...] = ("greedy", "sample", "beam")
SAMPLE_ONLY = ("temperature", "top_k", "top_p", "min_p")
BEAM_ONLY = ("beam_width",)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next character. Filters apply in the order temperature, top_k, top_p, min_p."""

    strategy: Strategy = "sample"
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    beam_width: int = 4

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use strategy 'greedy' for argmax)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if not 2 <= self.beam_width <= 16:
            raise ValueError("beam_width must be in 2..16")


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """True where a logit is outside the k largest of its row (ties at the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return torch.zeros_like(logits, dtype=torch.bool)
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits < kth


def top_p_mask(logits: Tensor, p: float) -> Tensor:
    """True outside the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True, stable=True)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def min_p_mask(logits: Tensor, min_p: float) -> Tensor:
    """True where a token's probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits, dim=-1)
    return probs < min_p * probs.max(dim=-1, keepdim=True).values


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Logits (..., V) after temperature, top-k, top-p and min-p; removed tokens are -inf."""
    x = logits / params.temperature
    # each filter sees the distribution left by the ones before it
    x = x.masked_fill(top_k_mask(x, params.top_k), float("-inf"))
    x = x.masked_fill(top_p_mask(x, params.top_p), float("-inf"))
    return x.masked_fill(min_p_mask(x, params.min_p), float("-inf"))


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next ids (B,) from logits (B, V): argmax for greedy, a draw from the filtered softmax otherwise."""
    if params.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
