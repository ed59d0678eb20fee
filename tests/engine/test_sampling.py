"""Sampling: temperature, top-k, top-p and min-p masks, their order, and seeded draws."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.sampling import (
    SamplingParams,
    choose,
    draw,
    filter_logits,
    filtered_logits,
    min_p_mask,
    softmax,
    top_k_mask,
    top_p_mask,
)

# probabilities that are exact in binary, so "cumulative mass reaches p" is an exact comparison
DYADIC = [0.5, 0.25, 0.125, 0.0625, 0.0625]

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}

T, F = True, False


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def kept(logits: torch.Tensor, params: SamplingParams) -> list[bool]:
    return torch.isfinite(filtered_logits(logits, params)).tolist()


def test_top_k_1_sampling_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(strategy="sample", top_k=1, temperature=1.7)
    for seed in range(50):
        logits = torch.randn(8, 30, generator=gen) * 3
        picked = choose(logits, params, torch.Generator().manual_seed(seed))
        assert picked.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.5, [F, F, T, T, T]),  # threshold 0.25: exactly at the threshold is kept
        (0.2, [F, F, F, T, T]),  # threshold 0.1
        (0.125, [F, F, F, F, F]),  # threshold 0.0625: the tied last two sit exactly on it
        (0.13, [F, F, F, T, T]),  # just above: both tied tokens go together
    ],
)
def test_min_p_mask_by_hand(min_p: float, expected: list[bool]) -> None:
    assert min_p_mask(log_probs(DYADIC), min_p).tolist() == expected


def test_min_p_mask_tied_maxima_and_rows() -> None:
    # two tied maxima are both kept; ratios to the max are e^-2 ~ 0.135 and e^-3 ~ 0.050
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert min_p_mask(logits, 0.1).tolist() == [[F, F, F, T, F], [F, F, F, F, F]]
    assert min_p_mask(logits, 0.0).tolist() == [[F] * 5, [F] * 5]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.5, [F, T, T, T, T]),  # the top token alone reaches 0.5 exactly
        (0.75, [F, F, T, T, T]),  # 0.5 + 0.25 reaches 0.75 exactly: the third is not needed
        (0.76, [F, F, F, T, T]),
        (0.875, [F, F, F, T, T]),
        (0.3, [F, T, T, T, T]),
        (1.0, [F, F, F, F, F]),  # off
    ],
)
def test_top_p_mask_by_hand(p: float, expected: list[bool]) -> None:
    assert top_p_mask(log_probs(DYADIC), p).tolist() == expected


def test_top_p_mask_follows_token_positions_not_rank() -> None:
    # the same distribution, shuffled: the mask moves with the tokens
    perm = [3, 0, 4, 2, 1]
    logits = log_probs([DYADIC[i] for i in perm])  # [0.0625, 0.5, 0.0625, 0.125, 0.25]
    assert top_p_mask(logits, 0.75).tolist() == [T, F, T, T, F]
    assert top_p_mask(torch.stack([logits, log_probs(DYADIC)]), 0.75).tolist() == [
        [T, F, T, T, F],
        [F, F, T, T, T],
    ]


def test_top_p_mask_ties() -> None:
    # tied top pair: both are needed for p = 0.75 and both kept for p = 0.5 (the second's
    # preceding mass, 0.375, is below p)
    logits = log_probs([0.375, 0.375, 0.125, 0.0625, 0.0625])
    assert top_p_mask(logits, 0.75).tolist() == [F, F, T, T, T]
    assert top_p_mask(logits, 0.5).tolist() == [F, F, T, T, T]
    # a tie across the boundary: the smallest set reaching 0.5 is two of the three tied tokens
    mask = top_p_mask(log_probs([0.25, 0.25, 0.25, 0.125, 0.125]), 0.5).tolist()
    assert mask[3:] == [T, T]
    assert mask[:3].count(F) == 2


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, [F, T, T, T, T]),
        (2, [F, F, F, T, T]),  # the tie at the 2nd place is kept
        (3, [F, F, F, T, T]),
        (4, [F, F, F, F, T]),
        (0, [F, F, F, F, F]),  # off
        (5, [F, F, F, F, F]),
    ],
)
def test_top_k_mask_by_hand(k: int, expected: list[bool]) -> None:
    assert top_k_mask(torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0]), k).tolist() == expected


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.3, 4.0])
def test_temperature_matches_closed_form(temperature: float) -> None:
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(5)) * 2
    got = torch.softmax(filtered_logits(logits, SamplingParams(temperature=temperature)), dim=-1).double().numpy()
    x = logits.double().numpy() / temperature
    expected = np.exp(x - x.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_filters_leave_kept_logits_untouched_and_others_minus_inf() -> None:
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5, 2.5, -1.0]])
    out = filtered_logits(logits, SamplingParams(temperature=2.0, top_k=3))
    assert out.tolist() == [[0.5, 1.5, -math.inf, -math.inf, 1.25, -math.inf]]


def test_order_top_k_before_top_p() -> None:
    # probs 0.4 0.3 0.1 0.1 0.1: top-k 2 renormalises to 4/7 3/7, so top-p 0.5 then keeps one
    # token; top-p first would keep two (0.4 + 0.3)
    logits = log_probs([0.4, 0.3, 0.1, 0.1, 0.1])
    assert kept(logits, SamplingParams(top_k=2, top_p=0.5)) == [T, F, F, F, F]
    assert kept(logits, SamplingParams(top_p=0.5)) == [T, T, F, F, F]


def test_order_top_p_before_min_p() -> None:
    # top-p 0.5 keeps {0, 1}; min-p 0.5 after it keeps both (3/7 >= 0.5 * 4/7).
    # min-p first would keep {0, 1} too, and a top-p 0.5 after it only {0}.
    logits = log_probs([0.4, 0.3, 0.1, 0.1, 0.1])
    assert kept(logits, SamplingParams(top_p=0.5, min_p=0.5)) == [T, T, F, F, F]
    assert kept(logits, SamplingParams(min_p=0.5)) == [T, T, F, F, F]


def test_order_temperature_before_top_p_and_min_p() -> None:
    logits = log_probs([0.4, 0.3, 0.1, 0.1, 0.1])
    # at T=1 top-p 0.5 keeps two tokens; T=4 flattens the distribution so it needs three
    assert kept(logits, SamplingParams(top_p=0.5)) == [T, T, F, F, F]
    assert kept(logits, SamplingParams(temperature=4.0, top_p=0.5)) == [T, T, T, F, F]
    # min-p 0.3: 0.1 < 0.3 * 0.4 at T=1; at T=4 the ratio is (1/4) ** (1/4) ~ 0.71
    assert kept(logits, SamplingParams(min_p=0.3)) == [T, T, F, F, F]
    assert kept(logits, SamplingParams(temperature=4.0, min_p=0.3)) == [T, T, T, T, T]
    # T=0.25 sharpens: 0.3/0.4 = 0.75 -> 0.75 ** 4 ~ 0.32 < 0.5
    assert kept(logits, SamplingParams(temperature=0.25, min_p=0.5)) == [T, F, F, F, F]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=4),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=1.5, top_k=7, top_p=0.9, min_p=0.05),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "min_p", "all"],
)
def test_draws_follow_the_filtered_distribution(params: SamplingParams) -> None:
    n = 20_000
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(11)) * 1.5
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)[0].double().numpy()
    draws = choose(logits.expand(n, -1), params, torch.Generator().manual_seed(1234)).numpy()
    counts = np.bincount(draws, minlength=10)
    allowed = probs > 0
    assert counts[~allowed].sum() == 0, "a filtered-out token was drawn"
    expected = probs[allowed] * n
    assert expected.min() >= 5  # the chi-square approximation holds
    chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
    df = int(allowed.sum()) - 1
    assert df >= 1
    assert chi2 < CHI2_CRIT_0001[df], (chi2, counts.tolist(), expected.tolist())


def test_filtered_tokens_are_never_drawn() -> None:
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(top_k=5, top_p=0.7, min_p=0.2)
    allowed = torch.isfinite(filtered_logits(logits, params))
    for seed in range(20):
        picked = choose(logits, params, torch.Generator().manual_seed(seed))
        assert allowed.gather(1, picked.unsqueeze(1)).all()


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "topk"},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": -0.1},
        {"top_p": 1.01},
        {"top_p": math.nan},
        {"min_p": -0.01},
        {"min_p": 1.0},
        {"min_p": math.nan},
        {"beam_width": 1},
        {"beam_width": 17},
    ],
)
def test_sampling_params_reject_bad_values(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_sampling_params_accept_the_edges() -> None:
    SamplingParams(strategy="beam", beam_width=2)
    SamplingParams(beam_width=16, top_p=1.0, min_p=0.0, top_k=0, temperature=1e-3)
    SamplingParams(strategy="greedy", top_p=1e-6, min_p=0.999)


def test_choose_on_a_batch_is_reproducible() -> None:
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(9))
    params = SamplingParams(temperature=1.2, top_p=0.95)
    a = choose(logits, params, torch.Generator().manual_seed(42))
    b = choose(logits, params, torch.Generator().manual_seed(42))
    c = choose(logits, params, torch.Generator().manual_seed(43))
    assert a.shape == (16,)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_choose_greedy_is_argmax_and_ignores_the_generator() -> None:
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(strategy="greedy")
    assert choose(logits, params, None).tolist() == logits.argmax(-1).tolist()
    assert choose(logits, params, torch.Generator().manual_seed(1)).tolist() == logits.argmax(-1).tolist()


def test_draw_is_the_inverse_cdf_search() -> None:
    """draw equals torch's search of each row's float32 cdf for uniform * total (rounded to float32),
    zero-probability tokens and uniforms at the cdf's steps included."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 84, generator=g) * 4
    logits[::3, 10:30] = float("-inf")  # tokens of probability 0
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    uniforms = torch.rand(64, generator=g, dtype=torch.float64)
    uniforms[:8] = (cdf[:8, 5] / cdf[:8, -1]).double()  # on a step of the cdf
    uniforms[8] = 0.0
    target = (uniforms.reshape(-1, 1) * cdf[:, -1:]).to(torch.float32)
    expected = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=83).tolist()
    drawn = draw(probs, uniforms.tolist())
    assert drawn == expected
    assert all(probs[i, token] > 0 for i, token in enumerate(drawn))


def test_temperature_one_leaves_the_logits_as_they_are() -> None:
    logits = torch.randn(4, 84)
    assert torch.equal(filter_logits(logits, 1.0), logits)
    assert torch.equal(filter_logits(logits, 2.0), logits / 2.0)
    column = torch.tensor([[1.0], [2.0], [0.5], [1.0]])
    assert torch.equal(filter_logits(logits, column), logits / column)


def test_softmax_is_torchs_within_rounding() -> None:
    logits = torch.randn(32, 84) * 4
    logits[::2, :40] = float("-inf")
    probs = softmax(logits)
    assert probs.dtype == torch.float32 and probs.shape == (32, 84)
    assert torch.allclose(probs, torch.softmax(logits, dim=-1), rtol=1e-5, atol=1e-7)
    assert bool((probs[::2, :40] == 0).all())


def test_sampling_a_batch_forks_no_thread_team() -> None:
    """Every filter and a draw on a batch of 32 rows start none of torch's OpenMP threads, whose spinning
    after a parallel region takes the cores the decoding step needs (torch's own softmax does start them)."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        from app.engine.sampling import draw, filter_logits, softmax
        torch.set_num_threads(2)
        threads = lambda: len(os.listdir("/proc/self/task"))
        logits, before = torch.randn(32, 84), threads()
        if sys.argv[1] == "torch":
            torch.softmax(logits, dim=-1)
        else:
            column = torch.full((32, 1), 0.8)
            filtered = filter_logits(logits, column, torch.full((32, 1), 5), column, torch.full((32, 1), 0.05))
            draw(softmax(filtered), [0.5] * 32)
        print(threads() - before)
        """
    )

    def started(kind: str) -> int:
        root = Path(__file__).parents[2]
        out = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, check=True, cwd=root)
        return int(out.stdout)

    assert started("torch") >= 1  # the check sees a team being started ...
    assert started("ours") == 0  # ... and sampling starts none
