"""Decoding parameters, pure functions on logits (temperature, top-k, top-p, min-p, choice), the batched sampler."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
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


Param = float | Tensor  # one value for every row, or a column (B, 1) of per-row values


def softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim, computed by numpy on the calling thread.

    torch's softmax and exp kernels fork its OpenMP thread team at a batch's sizes, and the team's
    threads then spin for a while, on the cores the next decoding step needs.
    """
    x = logits.detach().numpy()
    # the ufuncs' own reductions: the array methods (max, sum) go through a Python wrapper each, which at
    # one row costs as much as the arithmetic
    e = np.exp(x - np.maximum.reduce(x, axis=-1, keepdims=True))
    return torch.from_numpy(e / np.add.reduce(e, axis=-1, keepdims=True))


def _column(value: Param, logits: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=logits.dtype).reshape(-1, 1)


def _rows(mask_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Param], Tensor]:
    """Run a mask on (B, V) rows whatever the logits' leading shape; the mask keeps that shape."""

    @functools.wraps(mask_fn)
    def wrapper(logits: Tensor, value: Param) -> Tensor:
        rows = logits.reshape(-1, logits.shape[-1])
        return mask_fn(rows, _column(value, rows)).reshape(logits.shape)

    return wrapper


@_rows
def top_k_mask(logits: Tensor, k: Tensor) -> Tensor:
    """True where a logit is outside the k largest of its row (ties at the k-th are kept); k <= 0: off."""
    k = k.long()
    desc = torch.sort(logits, dim=-1, descending=True).values
    kth = desc.gather(-1, (k - 1).clamp(0, logits.shape[-1] - 1).expand(desc.shape[0], 1))
    return (logits < kth) & (k > 0)


@_rows
def top_p_mask(logits: Tensor, p: Tensor) -> Tensor:
    """True outside the smallest set of most likely tokens whose probability reaches p; p >= 1: off."""
    probs, order = torch.sort(softmax(logits), dim=-1, descending=True, stable=True)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = (before >= p) & (p < 1.0)
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


@_rows
def min_p_mask(logits: Tensor, min_p: Tensor) -> Tensor:
    """True where a token's probability is below min_p times the most likely token's; 0: off."""
    probs = softmax(logits)
    return probs < min_p * probs.amax(dim=-1, keepdim=True)


def filter_logits(
    logits: Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0
) -> Tensor:
    """Logits (B, V) after temperature, top-k, top-p and min-p; removed tokens are -inf.

    Each parameter is one value or a column of per-row values, so rows with different
    parameters are filtered together.
    """
    if isinstance(temperature, Tensor):
        x = logits / temperature.to(logits.dtype).reshape(-1, 1)
    else:  # dividing by 1 changes no bit: skipped
        x = logits if temperature == 1.0 else logits / torch.tensor(temperature, dtype=logits.dtype)
    # each filter sees the distribution left by the ones before it; one that is off for every
    # row would remove nothing, so it is skipped (the result is the same, bit for bit)
    if _any(top_k, lambda v: v > 0):
        x = x.masked_fill(top_k_mask(x, top_k), float("-inf"))
    if _any(top_p, lambda v: v < 1.0):
        x = x.masked_fill(top_p_mask(x, top_p), float("-inf"))
    if _any(min_p, lambda v: v > 0.0):
        x = x.masked_fill(min_p_mask(x, min_p), float("-inf"))
    return x


def _any(value: Param, on: Callable[[Any], Any]) -> bool:
    """Whether a filter parameter (one value or a column) is on for at least one row."""
    return bool(on(value).any()) if isinstance(value, Tensor) else bool(on(value))


def filtered_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """filter_logits with one request's parameters."""
    return filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)


def draw(probs: Tensor, uniforms: Sequence[float] | np.ndarray) -> list[int]:
    """Inverse-CDF draws: row i takes the token where its cumulative probability passes uniforms[i].

    Never a token of probability 0 (the search is for the first cumulative mass strictly above).
    """
    # (B, V), non-decreasing along each row; summed in float64 and rounded, as torch.cumsum does on a CPU
    cdf = np.add.accumulate(probs.numpy(), axis=-1, dtype=np.float64).astype(np.float32)
    # in float64, then rounded to the cdf's float32; numpy here: a few small torch ops cost more than the rest
    target = (np.asarray(uniforms, dtype=np.float64).reshape(-1, 1) * cdf[:, -1:]).astype(np.float32)
    # the first index whose cumulative mass is above the target: the count of those at or below it
    return np.minimum(np.add.reduce(cdf <= target, axis=1), probs.shape[-1] - 1).tolist()


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next ids (B,) from logits (B, V): argmax for greedy, a draw from the filtered softmax otherwise.

    A draw uses one uniform number per row from `generator`, like the engine's batched sampling.
    """
    if params.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = softmax(filtered_logits(logits, params))
    return torch.tensor(draw(probs, torch.rand(logits.shape[0], generator=generator, dtype=torch.float64).numpy()))


class Row(Protocol):
    """What the batched sampler needs of a row's sequence."""

    @property
    def id(self) -> int: ...
    @property
    def params(self) -> SamplingParams: ...
    @property
    def finish_reason(self) -> str | None: ...
    def uniform(self) -> float: ...


class RowSampler:
    """The next character of every row of a batch at once: argmax for greedy rows; for sampling
    rows, their own filters and one uniform draw from their own generator each (as `choose`).
    Built once per batch composition: per step, only the logits are new."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.key = self._key(rows)
        self.rows = [i for i, row in enumerate(rows) if row.params.strategy == "sample" and row.finish_reason is None]
        self.sampling = [rows[i] for i in self.rows]
        params = [row.params for row in self.sampling]
        # a filter that is off for every row is passed as its scalar "off" value, so it is skipped
        self.temperature = self._column([p.temperature for p in params], 1.0)
        self.top_k = self._column([p.top_k for p in params], 0)
        self.top_p = self._column([p.top_p for p in params], 1.0)
        self.min_p = self._column([p.min_p for p in params], 0.0)
        columns = (self.temperature, self.top_k, self.top_p, self.min_p)
        self.filtering = any(isinstance(c, Tensor) for c in columns)  # a filter on for some row

    @staticmethod
    def _key(rows: Sequence[Row]) -> tuple[int, ...]:
        return tuple(row.id if row.finish_reason is None else -1 for row in rows)

    @staticmethod
    def _column(values: list[float], off: float) -> Tensor | float:
        if all(v == off for v in values):
            return off
        return torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # (R, 1)

    def fits(self, rows: Sequence[Row]) -> bool:
        return self._key(rows) == self.key

    def choose(self, logits: Tensor) -> list[int]:
        if not self.rows:
            return logits.argmax(dim=-1).tolist()
        every = len(self.rows) == logits.shape[0]  # every row samples: no gather, no scatter
        sampled = logits if every else logits[self.rows]
        if self.filtering:
            sampled = filter_logits(sampled, self.temperature, self.top_k, self.top_p, self.min_p)
        drawn = draw(softmax(sampled), [row.uniform() for row in self.sampling])
        if every:
            return drawn
        chosen = logits.argmax(dim=-1).tolist()
        for row, nxt in zip(self.rows, drawn, strict=True):
            chosen[row] = nxt
        return chosen
