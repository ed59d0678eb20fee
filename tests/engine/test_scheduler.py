"""Scheduler: admission, prefill budget and round robin, joins and leaves, as plain data (no tensors)."""

from __future__ import annotations

from app.engine.sampling import SamplingParams
from app.engine.scheduler import PREFILL_CHUNKS_PER_STEP, PREFILL_MIN_WIDTH, Plan, Scheduler
from app.engine.sequence import GenerationRequest, Sequence, Status

CHARS = "".join(chr(ord("a") + i) for i in range(26))


def seq(prompt_ids: int, max_tokens: int = 10) -> Sequence:
    """A sequence with `prompt_ids` ids to prefill (0, or 2 and more; 0: its first step decodes at once)."""
    req = GenerationRequest(list(range(max(prompt_ids, 1))), max_tokens, SamplingParams(strategy="greedy"), seed=0)
    return Sequence(req, CHARS, None)


def submitted(scheduler: Scheduler, *seqs: Sequence) -> list[Sequence]:
    for s in seqs:
        scheduler.add(s)
    return list(seqs)


def step(scheduler: Scheduler) -> Plan:
    """A step as the engine runs it, with what the runner would do to the sequences: each row
    decodes one character, each prompt that ends gets its first character."""
    plan = scheduler.schedule(scheduler.admit())
    for s in plan.left:
        s.finish(None)
    for s in scheduler.running + scheduler.ending:
        s.ids.append(0)
    end = scheduler.end_step()
    for s in end.left + end.finished:
        s.finish(None)
    return plan


def test_a_prompt_with_nothing_to_prefill_joins_and_decodes_in_its_first_step() -> None:
    scheduler = Scheduler(max_rows=4, prefill_chunk=8, prefill_together=False)
    (a,) = submitted(scheduler, seq(0))
    assert a.status is Status.WAITING and scheduler.load == 1
    plan = scheduler.schedule(scheduler.admit())
    assert plan.join == [a] and plan.prefill == [] and plan.decode
    assert scheduler.running == [a] and a.status is Status.RUNNING


def test_admission_takes_what_the_batch_has_room_for_and_every_cancelled_request() -> None:
    scheduler = Scheduler(max_rows=2, prefill_chunk=8, prefill_together=False)
    a, b, c, d = submitted(scheduler, seq(0), seq(0), seq(0), seq(0))
    d.cancelled = True
    admitted = scheduler.admit()
    assert admitted == [d, a, b]  # the cancelled one leaves the queue at once, without a row
    assert list(scheduler.waiting) == [c]
    plan = scheduler.schedule(admitted)
    assert plan.dropped == [d] and d.status is Status.FINISHED and d.final is not None
    assert d.final.finish_reason == "cancelled" and d.final.state is None
    assert scheduler.running == [a, b]
    assert scheduler.admit() == []  # no room until a row leaves


def test_long_prompts_prefill_a_chunk_per_call_within_the_step_budget_round_robin() -> None:
    chunk = 8
    scheduler = Scheduler(max_rows=16, prefill_chunk=chunk, prefill_together=False)
    seqs = submitted(scheduler, *(seq(3 * chunk) for _ in range(PREFILL_CHUNKS_PER_STEP + 2)))
    plan = scheduler.schedule(scheduler.admit())
    # one prompt per call, a chunk each, until the step's budget is spent
    assert [call.seqs for call in plan.prefill] == [[s] for s in seqs[:PREFILL_CHUNKS_PER_STEP]]
    assert all(len(call.rows[0]) == chunk and call.ends == [False] for call in plan.prefill)
    assert not plan.decode
    # those that read go to the back of the line
    assert scheduler.prefilling == seqs[PREFILL_CHUNKS_PER_STEP:] + seqs[:PREFILL_CHUNKS_PER_STEP]
    plan = scheduler.schedule([])
    assert [call.seqs[0] for call in plan.prefill][:2] == seqs[PREFILL_CHUNKS_PER_STEP:]


def test_prompts_prefilled_together_read_in_one_call_a_slice_each() -> None:
    chunk = 64
    scheduler = Scheduler(max_rows=16, prefill_chunk=chunk, prefill_together=True)
    seqs = submitted(scheduler, *(seq(n) for n in (5, 100, 300)))
    (call,) = scheduler.schedule(scheduler.admit()).prefill
    width = min(chunk, max(PREFILL_MIN_WIDTH, PREFILL_CHUNKS_PER_STEP * chunk // 3))
    assert call.seqs == seqs
    assert [len(row) for row in call.rows] == [5, width, width]
    assert call.ends == [True, False, False]
    many = Scheduler(max_rows=64, prefill_chunk=chunk, prefill_together=True)
    submitted(many, *(seq(100) for _ in range(40)))
    (call,) = many.schedule(many.admit()).prefill
    assert {len(row) for row in call.rows} == {PREFILL_MIN_WIDTH}  # never thinner than this


def test_a_prompt_that_ends_joins_after_the_decode_unless_its_first_character_finished_it() -> None:
    scheduler = Scheduler(max_rows=4, prefill_chunk=8, prefill_together=False)
    running, ending, done = submitted(scheduler, seq(0), seq(4), seq(4))
    plan = scheduler.schedule(scheduler.admit())
    assert plan.join == [running] and scheduler.running == [running]  # decoded without the ending ones
    assert scheduler.ending == [ending, done]
    done.finish_reason = "length"  # its first character, from the prefill, was its last
    end = scheduler.end_step()
    assert end.join == [ending] and end.finished == [done]
    assert scheduler.running == [running, ending] and scheduler.ending == []


def test_rows_that_are_cancelled_leave_before_the_decode_and_finished_ones_after_it() -> None:
    scheduler = Scheduler(max_rows=4, prefill_chunk=8, prefill_together=False)
    a, b, c = submitted(scheduler, seq(0), seq(0), seq(0))
    step(scheduler)
    b.cancelled = True
    plan = scheduler.schedule([])
    assert plan.leave == [1] and plan.left == [b] and b.finish_reason == "cancelled"
    assert plan.decode and scheduler.running == [a, c]
    c.finish_reason = "stop"  # made by the decode
    end = scheduler.end_step()
    assert end.leave == [1] and end.left == [c] and scheduler.running == [a]
    a.cancelled = True
    plan = scheduler.schedule([])
    assert plan.left == [a] and not plan.decode and scheduler.idle


def test_steps_run_back_to_back_only_while_every_row_just_decodes() -> None:
    scheduler = Scheduler(max_rows=4, prefill_chunk=8, prefill_together=False)
    (a,) = submitted(scheduler, seq(0))
    step(scheduler)
    assert not scheduler.only_decoding()  # its first character must go out first
    a.shown = True
    assert scheduler.only_decoding()
    (b,) = submitted(scheduler, seq(0))
    assert not scheduler.only_decoding()  # a request waits
    step(scheduler)
    b.shown = True
    assert scheduler.only_decoding()
    b.cancelled = True
    assert not scheduler.only_decoding()


def test_a_failed_step_ends_every_admitted_sequence_cancelled_without_a_state() -> None:
    scheduler = Scheduler(max_rows=3, prefill_chunk=8, prefill_together=False)
    running, long, ending, queued = submitted(scheduler, seq(0), seq(100), seq(4), seq(0))
    scheduler.schedule(scheduler.admit())
    failed = scheduler.fail_all()
    assert set(failed) == {running, long, ending}
    for s in failed:
        assert s.final is not None and s.final.finish_reason == "cancelled" and s.final.state is None
    assert list(scheduler.waiting) == [queued] and scheduler.running == scheduler.prefilling == []


def test_each_sequence_goes_waiting_prefilling_running_finished() -> None:
    scheduler = Scheduler(max_rows=4, prefill_chunk=4, prefill_together=False)
    (a,) = submitted(scheduler, seq(10, max_tokens=2))
    seen = [a.status]
    while a.status is not Status.FINISHED:
        step(scheduler)
        if a.status is Status.RUNNING and len(a.ids) >= 2:
            a.finish_reason = "length"
        seen.append(a.status)
    assert [s for i, s in enumerate(seen) if i == 0 or s is not seen[i - 1]] == [
        Status.WAITING, Status.PREFILLING, Status.RUNNING, Status.FINISHED,
    ]  # fmt: skip
