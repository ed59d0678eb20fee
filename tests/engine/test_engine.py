"""ModelEngine: batching never shows in results; joins, leaves, chunked prefill, abort, queue, streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from app.checkpoint import Checkpoint
from app.engine.compute import run_to_end
from app.engine.config import STEP_BUDGET_S, Backend, EngineConfig
from app.engine.engine import Engine
from app.engine.generate import beam_generation
from app.engine.model_engine import TRIP_S_PER_ROW, ModelEngine, trip_budget
from app.engine.sampling import RowSampler, SamplingParams
from app.engine.scheduler import PREFILL_CHUNKS_PER_STEP
from app.engine.sequence import UNIFORM_BLOCK, GenerationRequest, GenerationResult, Sequence
from app.engine.stream import Stream
from app.errors import OverloadedError
from app.nn import CharRNN, State
from app.vocab import Vocab

GREEDY = SamplingParams(strategy="greedy")
FOREVER = 10**9  # max_tokens of a generation that only ends when aborted


def run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    """Drive a coroutine to its end in a fresh event loop; a hung engine fails the test instead of hanging it."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def make_engine(
    model: CharRNN,
    vocab: Vocab,
    max_batch: int = 64,
    max_queue: int = 64,
    prefill_chunk: int = 1024,
    step_budget: float = STEP_BUDGET_S,
    step: str = "torch",
    weights: str = "fp32",
) -> ModelEngine:
    config = EngineConfig(max_batch, max_queue, step, weights, step_budget, prefill_chunk)  # type: ignore[arg-type]
    return ModelEngine(Checkpoint("tiny", model, vocab, {}, "0" * 64), config)


@asynccontextmanager
async def started(engine: ModelEngine) -> AsyncIterator[ModelEngine]:
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@dataclass
class StepTrace:
    """What each engine step saw: rows admitted, then prefilling and running rows once it was done."""

    admitted: list[int]
    prefilling: list[int]
    running: list[int]


def trace_steps(engine: ModelEngine) -> StepTrace:
    trace = StepTrace([], [], [])
    step = engine._step

    def traced(admitted: list[Sequence]) -> list[Sequence]:
        touched = step(admitted)
        trace.admitted.append(len(admitted))
        trace.prefilling.append(len(engine.scheduler.prefilling))
        trace.running.append(len(engine.scheduler.running))
        return touched

    engine._step = traced  # type: ignore[method-assign]
    return trace


async def collect(stream: Stream) -> tuple[list[str], GenerationResult]:
    pieces: list[str] = []
    while True:
        item = await stream.next()
        if isinstance(item, GenerationResult):
            return pieces, item
        assert isinstance(item, str) and item, item
        pieces.append(item)


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def steps_reach(engine: ModelEngine, n: int, stream: Stream | None = None) -> None:
    """Until the engine has run `n` steps (or `stream` has its result)."""
    await until(lambda: engine.steps >= n or (stream is not None and stream.result is not None))


def request(
    vocab: Vocab, prompt: str, n: int, params: SamplingParams = GREEDY, seed: int = 0, **kw: Any
) -> GenerationRequest:
    return GenerationRequest(ids=[vocab.bos, *vocab.encode(prompt)], max_tokens=n, params=params, seed=seed, **kw)


def assert_states_equal(a: State | None, b: State | None) -> None:
    assert a is not None and b is not None
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    for x, y in pairs:
        assert torch.equal(x, y)  # type: ignore[arg-type]


def assert_states_close(a: State | None, b: State | None) -> None:
    assert a is not None and b is not None
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


async def alone(
    model: CharRNN, vocab: Vocab, req: GenerationRequest, step: str = "torch", weights: str = "fp32"
) -> tuple[list[str], GenerationResult]:
    """The reference: the request with nothing else in a fresh engine."""
    async with started(make_engine(model, vocab, step=step, weights=weights)) as engine:
        return await collect(engine.submit(req))


def mixed_requests(vocab: Vocab) -> list[GenerationRequest]:
    """20 seeded requests: greedy and sample with every filter, prompts of several lengths, stops, logprobs."""
    samplers = [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.1, temperature=0.9),
        GREEDY,
    ]
    prompts = ["", "ROMEO:", "All:\nSpeak, speak.\n", "First Citizen:\nBefore we proceed any further, hear me."]
    reqs = []
    for i in range(20):
        params = samplers[i % len(samplers)]
        extra: dict[str, Any] = {}
        if i % 5 == 3:
            extra["stop"] = ("a", "e", "o", "i ", "th")
        if i % 4 == 1:
            extra["logprobs"] = 2
        reqs.append(request(vocab, prompts[i % len(prompts)], 5 + (i * 7) % 56, params, seed=100 + i, **extra))
    return reqs


@pytest.mark.parametrize(("step", "weights"), [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")])
@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_batch_composition_does_not_change_any_result(
    arch: str, step: str, weights: str, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model(arch)
    reqs = mixed_requests(vocab)

    async def main() -> tuple[
        list[tuple[list[str], GenerationResult]], list[tuple[list[str], GenerationResult]], StepTrace
    ]:
        solo = [await alone(model, vocab, r, step, weights) for r in reqs]
        engine = make_engine(model, vocab, step=step, weights=weights)
        trace = trace_steps(engine)
        async with started(engine):
            tasks = []
            for wave in range(4):  # join in four waves, a few steps apart
                if wave:
                    await steps_reach(engine, engine.steps + 3)
                tasks += [asyncio.create_task(collect(engine.submit(r))) for r in reqs[wave::4]]
            together = list(await asyncio.gather(*tasks))
        order = [i for wave in range(4) for i in range(wave, len(reqs), 4)]
        by_index = dict(zip(order, together, strict=True))
        return solo, [by_index[i] for i in range(len(reqs))], trace

    solo, together, trace = run(main())
    assert max(trace.running) > 8, "the batch never outgrew one padded block: the test proves nothing"
    assert len([n for n in trace.admitted if n]) >= 2, "every request joined in the same step"
    for req, (solo_pieces, a), (pieces, b) in zip(reqs, solo, together, strict=True):
        assert b.ids == a.ids, req
        assert b.finish_reason == a.finish_reason
        assert "".join(pieces) == "".join(solo_pieces) == vocab.decode(a.ids)
        assert b.consumed == a.consumed
        assert b.pending == a.pending
        assert torch.equal(b.generator_state, a.generator_state)
        assert [(x.id, x.logprob, x.top) for x in b.logprobs] == [(x.id, x.logprob, x.top) for x in a.logprobs]
        assert_states_equal(b.state, a.state)
    reasons = {r.finish_reason for _, r in together}
    assert reasons == {"length", "stop"}


def test_requests_join_and_leave_between_steps(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("gru")
    short, long = 10, 1000

    async def main() -> tuple[StepTrace, int, int, GenerationResult, GenerationResult]:
        engine = make_engine(model, vocab)
        trace = trace_steps(engine)
        async with started(engine):
            assert engine.load == 0
            long_stream = engine.submit(request(vocab, "A", long))
            assert engine.load == 1
            await until(lambda: engine.steps >= 3)
            short_stream = engine.submit(request(vocab, "B", short))
            _, short_result = await collect(short_stream)
            load_after_short = engine.load
            _, long_result = await collect(long_stream)
            return trace, load_after_short, engine.load, short_result, long_result

    trace, load_after_short, load_at_end, short_result, long_result = run(main())
    assert short_result.finish_reason == long_result.finish_reason == "length"
    assert len(short_result.ids) == short and len(long_result.ids) == long
    assert load_after_short == 1 and load_at_end == 0
    # one step per character: the long request is alone, the short one joins, leaves after `short` steps
    assert len(trace.running) == long
    joined = trace.admitted.index(1, 1)
    assert joined >= 1
    assert trace.running[:joined] == [1] * joined
    assert trace.running[joined : joined + short - 1] == [2] * (short - 1)
    assert trace.running[joined + short - 1 : -1] == [1] * (long - joined - short)
    assert trace.running[-1] == 0
    assert set(trace.prefilling) == {0}


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model(arch)
    prompt = tiny_text[:100]
    n = 30
    chunk = 16
    chunk_steps = -(-100 // chunk)  # 100 prompt characters go through the kernel (bos + 99; the last is pending)

    async def main() -> tuple[GenerationResult, GenerationResult, GenerationResult, GenerationResult, int, StepTrace]:
        whole = make_engine(model, vocab, prefill_chunk=1024)
        async with started(whole):
            _, ref = await collect(whole.submit(request(vocab, prompt, n)))
            _, ref_other = await collect(whole.submit(request(vocab, "KING:", n)))
        whole_steps = whole.steps
        chunked = make_engine(model, vocab, prefill_chunk=chunk)
        trace = trace_steps(chunked)
        async with started(chunked):
            # submitted together: the short prompt decodes while the long one is still being prefilled
            long_stream = chunked.submit(request(vocab, prompt, n))
            other_stream = chunked.submit(request(vocab, "KING:", n))
            (_, got), (_, got_other) = await asyncio.gather(collect(long_stream), collect(other_stream))
        return ref, got, ref_other, got_other, whole_steps, trace

    ref, got, ref_other, got_other, whole_steps, trace = run(main())
    assert whole_steps == 2 * n  # one chunk: the first character comes in the admitting step
    assert vocab.decode(got.ids) == vocab.decode(ref.ids)
    assert_states_close(got.state, ref.state)
    assert got_other.ids == ref_other.ids
    # chunked: the long prompt is prefilling for chunk_steps - 1 steps, then joins and decodes
    assert trace.prefilling[: chunk_steps - 1] == [1] * (chunk_steps - 1)
    assert trace.running[: chunk_steps - 1] == [1] * (chunk_steps - 1)  # the short one did not wait
    assert trace.prefilling[chunk_steps - 1 :] == [0] * (len(trace.prefilling) - chunk_steps + 1)
    assert len(trace.running) == chunk_steps - 1 + n


def test_a_burst_of_prompts_is_prefilled_a_few_chunks_per_step_while_the_first_ones_decode(
    tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model("gru")
    chunk = 16
    prompts = [tiny_text[i * 7 : i * 7 + 40] for i in range(10)]  # 40 characters to prefill each (bos + 39)
    reqs = [request(vocab, p, 12, SamplingParams(), seed=i) for i, p in enumerate(prompts)]

    async def alone() -> list[GenerationResult]:
        async with started(make_engine(model, vocab, prefill_chunk=chunk)) as engine:
            return [(await collect(engine.submit(r)))[1] for r in reqs]

    async def burst() -> tuple[list[GenerationResult], StepTrace]:
        engine = make_engine(model, vocab, prefill_chunk=chunk)
        trace = trace_steps(engine)
        async with started(engine):
            done = await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))
        return [r for _, r in done], trace

    expected = run(alone())
    got, trace = run(burst())
    assert [r.ids for r in got] == [r.ids for r in expected]
    prefilling = [n for n in trace.prefilling if n]
    budget = PREFILL_CHUNKS_PER_STEP * chunk
    assert len(prefilling) >= 10 * 40 // budget - 1  # the prompts took several steps to prefill ...
    assert any(p and r for p, r in zip(trace.prefilling, trace.running, strict=True))  # ... while others decoded


def test_abort_frees_the_slot_at_the_next_step(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("lstm")
    other_req = request(vocab, "B", 1000, SamplingParams(temperature=0.8), seed=5)

    async def main() -> tuple[list[str], GenerationResult, int, StepTrace, GenerationResult, GenerationResult]:
        _, other_alone = await alone(model, vocab, other_req)
        engine = make_engine(model, vocab)
        trace = trace_steps(engine)
        async with started(engine):
            victim = engine.submit(request(vocab, "A", FOREVER, SamplingParams(), seed=1))
            other = engine.submit(other_req)
            await until(lambda: engine.steps >= 5)
            at_abort = engine.steps
            victim.abort()
            pieces, result = await collect(victim)
            _, other_result = await collect(other)
        return pieces, result, at_abort, trace, other_result, other_alone

    pieces, result, at_abort, trace, other_result, other_alone = run(main())
    assert result.finish_reason == "cancelled"
    # trace.running[k] is the batch after step k + 1: the victim left at the step in flight or the next one
    left = trace.running.index(1) + 1
    assert trace.running[: left - 1] == [2] * (left - 1)
    assert at_abort < left <= at_abort + 2
    assert len(result.ids) == left - 1  # the step that drops it decodes nothing for it
    assert "".join(pieces) == vocab.decode(result.ids)
    # it had started decoding: it can be continued, from the state before its last character (its
    # neighbour's step did not feed it)
    _, ref = model(torch.tensor([vocab.bos, *vocab.encode("A"), *result.ids[:-1]]).view(-1, 1))
    assert_states_close(result.state, ref)
    assert result.pending == result.ids[-1]
    assert other_result.ids == other_alone.ids  # its neighbour never noticed


def test_abort_while_prefilling_ends_without_a_state(
    tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model("gru")
    prompt = tiny_text * 2  # one step per prompt character: over a thousand steps of prefill

    async def main() -> tuple[list[str], GenerationResult, int, int, int]:
        engine = make_engine(model, vocab, prefill_chunk=1)
        async with started(engine):
            stream = engine.submit(request(vocab, prompt, 10))
            await until(lambda: engine.steps >= 2)
            at_abort = engine.steps
            stream.abort()
            pieces, result = await collect(stream)
            return pieces, result, at_abort, engine.steps, engine.load

    pieces, result, at_abort, steps, load = run(main())
    assert result.finish_reason == "cancelled"
    assert result.state is None and result.ids == [] and pieces == []
    assert steps <= at_abort + 2 < len(prompt)  # the rest of the prompt was never fed
    assert load == 0


def test_result_after_is_the_result_as_of_the_characters_a_client_received(
    tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model("lstm")

    async def main() -> tuple[GenerationResult, GenerationResult | None, GenerationResult | None]:
        async with started(make_engine(model, vocab)) as engine:
            stream = engine.submit(request(vocab, "ROMEO:", 40, SamplingParams(), seed=4))
            _, full = await collect(stream)
            return full, await stream.result_after(10), await stream.result_after(0)

    full, cut, none_sent = run(main())
    prompt = [vocab.bos, *vocab.encode("ROMEO:")]
    assert cut is not None and none_sent is not None
    assert cut.ids == cut.consumed == full.ids[:10] and cut.finish_reason == "cancelled"
    assert cut.pending == full.ids[9]
    _, ref = model(torch.tensor([*prompt, *full.ids[:9]]).view(-1, 1))
    assert_states_close(cut.state, ref)
    after_ten = torch.Generator().manual_seed(4)
    torch.rand(10, generator=after_ten, dtype=torch.float64)  # one draw per character made
    assert torch.equal(cut.generator_state, after_ten.get_state())
    # nothing received: the state after the prompt, its last character pending
    assert none_sent.ids == [] and none_sent.pending == prompt[-1]
    _, ref = model(torch.tensor(prompt[:-1]).view(-1, 1))
    assert_states_close(none_sent.state, ref)


def test_abort_after_the_end_changes_nothing(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    async def main() -> tuple[GenerationResult, str | GenerationResult | None]:
        async with started(make_engine(tiny_model("rnn"), vocab)) as engine:
            stream = engine.submit(request(vocab, "A", 5))
            _, result = await collect(stream)
            stream.abort()
            with pytest.raises(StopAsyncIteration):
                await stream.next()
            return result, stream.result

    result, again = run(main())
    assert result.finish_reason == "length" and again is result


def test_abort_of_a_queued_request_frees_its_queue_place(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    async def main() -> tuple[int, int, str | GenerationResult | None]:
        engine = make_engine(tiny_model("rnn"), vocab, max_batch=1, max_queue=1)
        async with started(engine):
            runner = engine.submit(request(vocab, "A", FOREVER))
            queued = engine.submit(request(vocab, "B", 10))
            await until(lambda: engine.steps >= 2)
            assert engine.load == 2
            queued.abort()
            await steps_reach(engine, engine.steps + 3)
            load = engine.load
            item = await queued.next(timeout=10)
            runner.abort()
            await collect(runner)
            return load, engine.load, item

    load, final_load, item = run(main())
    assert final_load == 0
    assert load == 1
    assert isinstance(item, GenerationResult) and item.finish_reason == "cancelled"


def test_bounded_queue_raises_overloaded(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("gru")

    async def main() -> tuple[OverloadedError, OverloadedError, int, str | None]:
        engine = make_engine(model, vocab, max_batch=2, max_queue=1)
        async with started(engine):
            streams = [engine.submit(request(vocab, "A", FOREVER, seed=i)) for i in range(3)]
            await until(lambda: len(engine.scheduler.running) == 2)
            assert engine.load == 3 and len(engine.scheduler.waiting) == 1
            with pytest.raises(OverloadedError) as full:
                engine.submit(request(vocab, "A", 5))
            beam = SamplingParams(strategy="beam", beam_width=2)
            with pytest.raises(OverloadedError) as full_beam:
                engine.submit(request(vocab, "A", 5, beam))
            streams[0].abort()
            await collect(streams[0])
            await until(lambda: engine.load == 2)
            late = engine.submit(request(vocab, "C", 3))  # there is room again
            await until(lambda: len(engine.scheduler.running) == 2)  # the queued one took the freed slot
            for s in streams[1:]:
                s.abort()
            _, result = await collect(late)
            return full.value, full_beam.value, engine.load, vocab.decode(result.ids)

    full, full_beam, load, late_text = run(main())
    for err in (full, full_beam):
        assert err.retry_after == 1
        assert err.type == "overloaded_error"
        assert "2 running" in err.message and "1 queued" in err.message
    assert len(late_text) == 3
    assert load == 0


def test_next_coalesces_everything_made_since_the_last_call(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("lstm")

    async def main() -> tuple[int, Any, Any, int, Any]:
        engine = make_engine(model, vocab, step_budget=0)  # one step, so one piece, per trip
        async with started(engine):
            stream = engine.submit(request(vocab, "A", 60, SamplingParams(), seed=3))
            await until(lambda: stream.result is not None)  # let every step run, reading nothing
            waiting = len(stream.texts)
            text = await stream.next()
            result = await stream.next()
            sent = stream.sent
            with pytest.raises(StopAsyncIteration):
                await stream.next()
        # nothing new within the timeout: None, not an exception
        idle = make_engine(model, vocab)  # never started: its streams make no progress
        quiet = await idle.submit(request(vocab, "A", 5)).next(timeout=0.05)
        return waiting, text, result, sent, quiet

    waiting, text, result, sent, quiet = run(main())
    assert waiting == 60  # one piece per step was waiting ...
    assert isinstance(text, str) and len(text) == 60  # ... and one next() returned them all
    assert isinstance(result, GenerationResult) and vocab.decode(result.ids) == text
    assert sent == 60
    assert quiet is None


def test_next_returns_several_characters_while_the_generation_runs(
    tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    async def main() -> tuple[list[str], GenerationResult]:
        engine = make_engine(tiny_model("rnn"), vocab)
        async with started(engine):
            stream = engine.submit(request(vocab, "A", 400))
            pieces: list[str] = []
            while True:
                await steps_reach(engine, engine.steps + 6, stream)
                item = await stream.next()
                if isinstance(item, GenerationResult):
                    return pieces, item
                assert isinstance(item, str)
                pieces.append(item)

    pieces, result = run(main())
    assert "".join(pieces) == vocab.decode(result.ids)
    assert len(pieces) >= 2
    # (the first character may go out alone: it is sent as soon as it is made)
    assert all(len(p) >= 5 for p in pieces[1:-1]), [len(p) for p in pieces]


@pytest.mark.parametrize("stop", [(), ("PCC", "zz")])
def test_beam_streams_prefixes_of_the_final_text(
    stop: tuple[str, ...], tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model("gru")  # its beams wander a while before they settle into a loop
    req = request(vocab, "All:\n", 60, SamplingParams(strategy="beam", beam_width=4), stop=stop)

    async def main() -> tuple[list[str], GenerationResult, int, list[str]]:
        engine = make_engine(model, vocab)
        async with started(engine):
            stream = engine.submit(req)
            pushed: list[str] = []  # what the search handed out, piece by piece (reads may coalesce them)
            push = stream.push_text
            stream.push_text = lambda text: (pushed.append(text), push(text))[1]  # type: ignore[method-assign]
            during = engine.load
            pieces: list[str] = []
            while True:
                item = await stream.next()
                if isinstance(item, GenerationResult):
                    return pieces, item, during, pushed
                assert isinstance(item, str)
                pieces.append(item)
                # what was sent so far is already final: it is a prefix of what the naive run returns
                assert vocab.decode(direct.ids).startswith("".join(pieces))

    direct = run_to_end(beam_generation(model, vocab.chars, req, None))
    pieces, result, during, pushed = run(main())
    assert during == 1
    assert result.ids == direct.ids and result.finish_reason == direct.finish_reason
    assert "".join(pieces) == "".join(pushed) == vocab.decode(result.ids)
    assert len(pushed) >= 2, "beam sent everything at the end"
    if stop:
        assert result.finish_reason == "stop"
        assert not any(s in "".join(pieces) for s in stop)


def test_beam_abort_ends_it_cancelled(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    async def main() -> tuple[list[str], GenerationResult, int]:
        engine = make_engine(tiny_model("gru"), vocab)
        async with started(engine):
            stream = engine.submit(request(vocab, "A", 100_000, SamplingParams(strategy="beam", beam_width=2)))
            first = await stream.next()
            stream.abort()
            pieces, result = await collect(stream)
            return [first, *pieces], result, engine.load  # type: ignore[list-item]

    pieces, result, load = run(main())
    assert result.finish_reason == "cancelled"
    assert "".join(pieces) == vocab.decode(result.ids)
    assert load == 0


class FailingOnce:
    """A decoding step that raises on its `at`-th call, then works."""

    def __init__(self, step: Any, at: int) -> None:
        self.step, self.at, self.calls = step, at, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("simulated kernel failure")
        return self.step(*args)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    tiny_model: Callable[..., CharRNN], vocab: Vocab, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("lstm")

    async def main() -> tuple[GenerationResult, GenerationResult, list[str], GenerationResult, int]:
        engine = make_engine(model, vocab)
        engine.kernels.decode = FailingOnce(engine.kernels.decode, at=5)  # type: ignore[method-assign]
        async with started(engine):
            a = engine.submit(request(vocab, "A", 50))
            b = engine.submit(request(vocab, "B", 50, SamplingParams(), seed=1))
            (_, ra), (_, rb) = await asyncio.gather(collect(a), collect(b))
            pieces, rc = await collect(engine.submit(request(vocab, "A", 20)))
            return ra, rb, pieces, rc, engine.load

    ra, rb, pieces, rc, load = run(main())
    for r in (ra, rb):
        assert r.finish_reason == "cancelled"
        assert r.state is None
        assert len(r.ids) == 5  # kept: the first character (from the prompt) and what the four good steps made
    assert rc.finish_reason == "length" and "".join(pieces) == vocab.decode(rc.ids) and len(rc.ids) == 20
    assert load == 0
    assert "engine step failed for model tiny" in caplog.text


def test_a_failing_beam_search_ends_its_stream(
    tiny_model: Callable[..., CharRNN], vocab: Vocab, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kw: Any) -> GenerationResult:
        raise RuntimeError("simulated beam failure")

    monkeypatch.setattr("app.engine.model_engine.beam_generation", broken)

    async def main() -> tuple[str | GenerationResult | None, int]:
        async with started(make_engine(tiny_model("gru"), vocab)) as engine:
            stream = engine.submit(request(vocab, "A", 10, SamplingParams(strategy="beam")))
            item = await stream.next(timeout=30)
            return item, engine.load

    item, load = run(main())
    assert load == 0
    assert isinstance(item, GenerationResult) and item.finish_reason == "cancelled"


# -- several steps per trip to the worker thread -------------------------------------------------


def count_trips(engine: ModelEngine) -> list[int]:
    """Steps run by each trip to the worker thread."""
    trips: list[int] = []
    steps = engine._trip

    def counted(admitted: list[Sequence]) -> list[Sequence]:
        before = engine.steps
        touched = steps(admitted)
        trips.append(engine.steps - before)
        return touched

    engine._trip = counted  # type: ignore[method-assign]
    return trips


def test_a_trip_runs_several_steps_and_changes_no_result(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("lstm")
    reqs = [request(vocab, "A", 300), request(vocab, "KING:", 250, SamplingParams(top_k=5), seed=9)]

    async def main(budget: float) -> tuple[list[tuple[list[str], GenerationResult]], list[int]]:
        engine = make_engine(model, vocab, step_budget=budget)
        trips = count_trips(engine)
        async with started(engine):
            streams = [engine.submit(r) for r in reqs]
            return list(await asyncio.gather(*(collect(s) for s in streams))), trips

    one_by_one, single_trips = run(main(0.0))
    bursts, trips = run(main(10.0))
    assert set(single_trips) == {1}
    assert [r.ids for _, r in bursts] == [r.ids for _, r in one_by_one]
    assert sum(trips) == sum(single_trips) == 300  # the same steps ...
    assert len(trips) < 10  # ... in a handful of trips: joining, first characters, a row's end
    for pieces, result in bursts:
        assert len(pieces[0]) == 1  # the first character went out as soon as it was made
        assert "".join(pieces) == vocab.decode(result.ids)


def test_a_trip_is_longer_for_a_large_batch_so_events_per_second_stay_bounded() -> None:
    assert trip_budget(0.02, 1) == trip_budget(0.02, 20) == 0.02
    assert trip_budget(0.02, 128) == pytest.approx(128 * TRIP_S_PER_ROW)
    assert 128 * TRIP_S_PER_ROW > 0.02
    assert trip_budget(0.0, 128) == 0.0  # one step per trip stays one step


def test_a_trip_ends_for_a_new_request_and_for_an_abort(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    async def main() -> tuple[GenerationResult, GenerationResult]:
        engine = make_engine(tiny_model("gru"), vocab, step_budget=3600.0)  # only events end a trip
        async with started(engine):
            runner = engine.submit(request(vocab, "A", FOREVER))
            assert isinstance(await runner.next(), str)
            await steps_reach(engine, engine.steps + 3)  # a long trip is under way
            _, short = await asyncio.wait_for(collect(engine.submit(request(vocab, "B", 5))), 10)
            runner.abort()
            _, aborted = await asyncio.wait_for(collect(runner), 10)
            return short, aborted

    short, aborted = run(main())
    assert short.finish_reason == "length" and len(short.ids) == 5
    assert aborted.finish_reason == "cancelled"


# -- the compute thread and the batch's kernels -----------------------------------------------------


def test_every_model_call_runs_on_the_one_compute_thread(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("lstm")
    threads: set[str] = set()
    forward = model.forward

    def recorded(*args: Any, **kw: Any) -> Any:
        threads.add(threading.current_thread().name)
        return forward(*args, **kw)

    model.forward = recorded  # type: ignore[method-assign]

    async def main() -> None:
        engine = Engine(EngineConfig(backend=Backend.TORCH))
        ckpt = Checkpoint("tiny", model, vocab, {}, "0" * 64)
        await engine.start({ckpt.name: ckpt})
        try:
            await collect(engine.submit(ckpt, request(vocab, "KING:", 20)))
            await collect(
                engine.submit(ckpt, request(vocab, "KING:", 20, SamplingParams(strategy="beam", beam_width=3)))
            )
            await engine.score(ckpt, [vocab.bos, *vocab.encode("To be, or not to be")])
            await engine.engines[ckpt.name].prefill(vocab.encode("Let me not to the marriage of true minds" * 20))
        finally:
            await engine.stop()

    run(main())
    assert len(threads) == 1 and next(iter(threads)).startswith("compute")


def test_the_sampling_columns_are_rebuilt_only_when_the_batch_changes(
    tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model("gru")
    engine = make_engine(model, vocab)
    built: list[int] = []
    original = RowSampler.__init__

    def counted(self: RowSampler, seqs: Any) -> None:
        built.append(len(seqs))
        original(self, seqs)

    reqs = [request(vocab, "A", 30, SamplingParams(temperature=0.7), seed=1), request(vocab, "B", 60, GREEDY)]

    async def main() -> list[GenerationResult]:
        async with started(engine):
            RowSampler.__init__ = counted  # type: ignore[method-assign]
            try:
                return [r for _, r in await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))]
            finally:
                RowSampler.__init__ = original  # type: ignore[method-assign]

    results = run(main())
    assert [len(r.ids) for r in results] == [30, 60]
    # one per prompt for its first character (one or two prefill calls), then the batch's: both rows
    # join, the first leaves; a handful of builds for 60 steps
    assert 3 <= len(built) <= 5 and built[-1] == 1


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_a_burst_of_prompts_is_prefilled_in_one_call_with_the_results_of_each_alone(
    arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model(arch)
    reqs = [request(vocab, tiny_text[i * 5 : i * 5 + 10 + 7 * i], 15, SamplingParams(), seed=i) for i in range(6)]
    calls: list[int] = []

    async def main() -> tuple[list[GenerationResult], list[GenerationResult], bool]:
        solo = [(await alone(model, vocab, r, "onnx"))[1] for r in reqs]
        engine = make_engine(model, vocab, step="onnx", prefill_chunk=16)
        prefill = engine.kernels.prefill

        def counted(rows: list[list[int]], state: State) -> tuple[torch.Tensor, State]:
            calls.append(len(rows))
            return prefill(rows, state)

        engine.kernels.prefill = counted  # type: ignore[method-assign]
        async with started(engine):
            together = await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))
        return solo, [r for _, r in together], engine.kernels.prefill_rows == (2 if arch == "rnn" else 1)

    solo, together, batched = run(main())
    assert batched
    # 11 to 46 ids per prompt, 16 of each per call (the step's budget, 64, over 6 rows is less):
    # every prompt in the first call, then those still prefilling
    assert calls == [6, 5, 2]
    assert [r.ids for r in together] == [r.ids for r in solo]
    for a, b in zip(together, solo, strict=True):
        assert_states_equal(a.state, b.state)


@pytest.mark.parametrize("step", ["torch", "onnx"])
def test_a_prompt_gives_its_first_character_without_a_decoding_step(
    step: str, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model("lstm")
    steps: list[int] = []

    async def main() -> tuple[GenerationResult, GenerationResult, GenerationResult]:
        engine = make_engine(model, vocab, step=step)
        decode = engine.kernels.decode

        def counted(ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
            steps.append(len(ids))
            return decode(ids, state)

        engine.kernels.decode = counted  # type: ignore[method-assign]
        async with started(engine):
            one = (await collect(engine.submit(request(vocab, "ROMEO:", 1))))[1]
            stepped = len(steps)
            empty = (await collect(engine.submit(request(vocab, "", 1))))[1]
            three = (await collect(engine.submit(request(vocab, "ROMEO:", 3))))[1]
        assert stepped == 0 and len(steps) == 1 + 2  # the empty prompt's character, then the two after the first
        return one, empty, three

    one, empty, three = run(main())
    assert len(one.ids) == len(empty.ids) == 1 and three.ids[:1] == one.ids
    # the state after the prompt, before its first character (the pending input of the next step)
    _, ref = model(torch.tensor([vocab.bos, *vocab.encode("ROMEO:")]).view(-1, 1))
    assert_states_close(one.state, ref)
    assert one.pending == one.ids[0]


def test_a_row_that_stops_early_stores_the_generator_state_of_its_draws(
    tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    """The engine draws a row's uniform numbers in blocks; a row that stops before using them all
    stores the state after the ones it used, so a continuation without a seed goes on exactly."""
    model = tiny_model("lstm")
    req = request(vocab, "ROMEO:", 500, SamplingParams(), seed=3, stop=("e",))

    async def main() -> GenerationResult:
        async with started(make_engine(model, vocab, step="onnx")) as engine:
            return (await collect(engine.submit(req)))[1]

    result = run(main())
    made = len(result.consumed)
    assert result.finish_reason == "stop" and made % UNIFORM_BLOCK, "the row did not stop inside a block"
    after = torch.Generator().manual_seed(3)
    torch.rand(made, generator=after, dtype=torch.float64)  # one draw per character made
    assert torch.equal(result.generator_state, after.get_state())
