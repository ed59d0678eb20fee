"""generate: seeds, stop strings, logprobs, and exact continuation from (state, pending)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from app.engine.generate import CHUNK, GenerationRequest, GenerationResult, generate, prefill, prefill_steps, score
from app.engine.sampling import SamplingParams
from app.engine.sequence import Sequence
from app.nn import CharRNN, State
from app.vocab import Vocab

ARCHS = ("rnn", "lstm", "gru")
GREEDY = SamplingParams(strategy="greedy")


def ids_of(vocab: Vocab, prompt: str) -> list[int]:
    return [vocab.bos, *vocab.encode(prompt)]


def gen(
    model: CharRNN,
    vocab: Vocab,
    ids: list[int],
    n: int,
    params: SamplingParams = GREEDY,
    seed: int = 0,
    state: State | None = None,
    **kw: object,
) -> GenerationResult:
    req = GenerationRequest(ids=ids, max_tokens=n, params=params, seed=seed, **kw)  # type: ignore[arg-type]
    return generate(model, vocab.chars, req, state)


def assert_states_equal(a: State | None, b: State | None) -> None:
    assert a is not None and b is not None
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    else:
        assert isinstance(b, torch.Tensor)
        assert torch.equal(a, b)


def assert_states_close(a: State | None, b: State | None) -> None:
    assert a is not None and b is not None
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_ids_other_seed_other_ids(arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "ROMEO:")
    a = gen(model, vocab, ids, 50, SamplingParams(), seed=7)
    b = gen(model, vocab, ids, 50, SamplingParams(), seed=7)
    c = gen(model, vocab, ids, 50, SamplingParams(), seed=8)
    assert len(a.ids) == 50
    assert a.finish_reason == "length"
    assert a.ids == b.ids
    assert a.ids != c.ids
    assert a.pending == a.ids[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_is_excluded_and_finish_reason_is_stop(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "All:")
    full = vocab.decode(gen(model, vocab, ids, 60).ids)
    stop = full[30:33]
    at = full.index(stop)
    out = gen(model, vocab, ids, 60, stop=(stop,), logprobs=2)
    text = vocab.decode(out.ids)
    assert out.finish_reason == "stop"
    assert stop not in text
    assert text == full[:at]
    assert len(out.logprobs) == len(out.ids)
    # the stop string was consumed: pending is its last character
    assert out.pending == vocab.stoi[stop[-1]]
    assert vocab.decode(out.consumed) == text + stop


@pytest.mark.parametrize("arch", ARCHS)
def test_continuing_after_a_stop_goes_on_after_the_stop_string(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "First Citizen:\n")
    full = vocab.decode(gen(model, vocab, ids, 80).ids)
    stop = full[25:28]
    end = full.index(stop) + len(stop)
    first = gen(model, vocab, ids, 80, stop=(stop,))
    assert first.finish_reason == "stop"
    rest = gen(model, vocab, [first.pending], 80 - end, state=first.state)
    assert vocab.decode(first.ids) + stop + vocab.decode(rest.ids) == full


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.8, top_k=10)], ids=["greedy", "sample"])
def test_logprobs_match_the_ids(
    arch: str, params: SamplingParams, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "Speak")
    out = gen(model, vocab, ids, 30, params, seed=3, logprobs=4)
    assert [lp.id for lp in out.logprobs] == out.ids
    # the logprob of each generated char is the model's (unfiltered) one, as scored independently
    expected = score(model, [*ids, *out.ids], None)[len(ids) - 1 :]
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(expected, abs=1e-5)
    for lp in out.logprobs:
        assert len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.logprob <= values[0] + 1e-6
        if lp.id in dict(lp.top):
            assert dict(lp.top)[lp.id] == pytest.approx(lp.logprob)
        if params.strategy == "greedy":
            assert lp.top[0][0] == lp.id


def test_no_logprobs_unless_asked(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    assert gen(tiny_model(), vocab, ids_of(vocab, "A"), 10).logprobs == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 37])
def test_greedy_2n_in_one_call_equals_n_then_n(
    arch: str, n: int, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "Before we proceed")
    whole = gen(model, vocab, ids, 2 * n)
    first = gen(model, vocab, ids, n)
    second = gen(model, vocab, [first.pending], n, state=first.state)
    assert first.ids + second.ids == whole.ids
    assert second.pending == whole.pending
    assert_states_equal(second.state, whole.state)


@pytest.mark.parametrize("strategy", ["sample", "greedy"])
def test_the_generator_state_after_n_characters_is_that_of_a_run_of_n(
    strategy: str, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model, ids, params = tiny_model("gru"), ids_of(vocab, "Before"), SamplingParams(strategy=strategy)
    runs = {n: gen(model, vocab, ids, n, params, seed=4) for n in (1, 7, 30, 300)}
    first = Sequence(GenerationRequest(ids=ids, max_tokens=30, params=params, seed=4), vocab.chars, None)
    for n, run in runs.items():
        assert torch.equal(first.generator_state_after(n), run.generator_state), n
    # from a stored generator state (a continuation without a seed), as well
    go_on = GenerationRequest(ids=[runs[7].pending], max_tokens=23, params=params, seed=0,
                              generator_state=runs[7].generator_state)  # fmt: skip
    assert torch.equal(Sequence(go_on, vocab.chars, None).generator_state_after(23), runs[30].generator_state)
    moved = not torch.equal(runs[1].generator_state, runs[30].generator_state)
    assert moved == (strategy == "sample")


@pytest.mark.parametrize("arch", ARCHS)
def test_feeding_a_then_b_equals_feeding_ab(arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model(arch)
    a, b = vocab.encode("You are all resolved"), vocab.encode(" rather to die")
    split = prefill(model, b, prefill(model, a, None))
    assert_states_close(split, prefill(model, a + b, None))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_returned_state_excludes_pending(arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, "Resolved")
    out = gen(model, vocab, ids, 12)
    assert_states_close(out.state, prefill(model, [*ids, *out.ids[:-1]], None))


@pytest.mark.parametrize("arch", ARCHS)
def test_score_matches_log_softmax_of_a_manual_forward(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model(arch)
    ids = ids_of(vocab, (tiny_text * 8)[: CHUNK * 2 + 80])  # several chunks, the last one short
    lps = score(model, ids, None)
    assert len(lps) == len(ids) - 1
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids[:-1]).view(-1, 1))
    manual = torch.log_softmax(logits[:, 0], -1).gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0]
    assert lps == pytest.approx(manual.tolist(), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_in_steps_equals_one_call(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model(arch)
    ids = vocab.encode((tiny_text * 8)[: CHUNK * 3 + 7])
    steps = prefill_steps(model, ids, None)
    slices = 0
    while True:
        try:
            next(steps)
            slices += 1
        except StopIteration as end:
            chunked = end.value
            break
    assert slices == 4
    assert_states_close(chunked, prefill(model, ids, None))


def test_uniform_numbers_drawn_in_blocks_are_those_of_single_draws(vocab: Vocab) -> None:
    req = GenerationRequest(ids=[vocab.bos], max_tokens=150, params=SamplingParams(), seed=9)
    seq = Sequence(req, vocab.chars, None)
    single = torch.Generator().manual_seed(9)
    for n in range(150):
        assert seq.uniform() == torch.rand(1, generator=single, dtype=torch.float64).item(), n
        seq.ids.append(0)  # a character made: the blocks shrink towards max_tokens
    assert seq.draws == 150 and not seq.uniforms  # never drawn past the last character
    assert torch.equal(seq.generator.get_state(), single.get_state())
