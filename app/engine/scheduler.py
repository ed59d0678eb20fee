"""The scheduler: in plain Python, which sequences wait, prefill, run and leave, step by step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from app.engine.sequence import Sequence, Status

# A step prefills about this many chunks' worth of prompt characters, over all the sequences still
# prefilling (together where one call can take them all, else one at a time, round robin): a
# burst of new requests then neither stalls the running rows for long nor waits for all the
# others' prompts before its first character.
PREFILL_CHUNKS_PER_STEP = 4
# Where prompts are prefilled together (each row to its own length, in one call), each takes at
# least this many characters per step, however many there are.
PREFILL_MIN_WIDTH = 16


@dataclass(frozen=True)
class PrefillCall:
    """One call of the prefill kernel: the next ids of each sequence's prompt."""

    seqs: list[Sequence]
    rows: list[list[int]]  # the ids each prefills now
    ends: list[bool]  # whether its prompt ends here: the logits after it give its first character


@dataclass(frozen=True)
class Plan:
    """A step, before its decode: what the runner does, in this order."""

    dropped: list[Sequence] = field(default_factory=list)  # end without a row: cancelled before running
    prefill: list[PrefillCall] = field(default_factory=list)
    join: list[Sequence] = field(default_factory=list)  # become the last rows: nothing to prefill
    leave: list[int] = field(default_factory=list)  # rows (after `join`) that leave: finished or cancelled
    left: list[Sequence] = field(default_factory=list)  # their sequences
    decode: bool = False  # whether the rows left decode one character


@dataclass(frozen=True)
class StepEnd:
    """A step, after its decode."""

    leave: list[int] = field(default_factory=list)  # rows that finished in the decode
    left: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # prompts that ended on a finished first character
    join: list[Sequence] = field(default_factory=list)  # prompts that ended: they become the last rows


class Scheduler:
    """Queues and rows of one model's engine. `running` is the batch: row i of the runner's state is
    `running[i]` once the runner has carried out each plan."""

    def __init__(self, max_rows: int, prefill_chunk: int, prefill_together: bool) -> None:
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.prefill_together = prefill_together  # one call prefills every prompt (else one per call)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt still being prefilled
        self.running: list[Sequence] = []
        self.ending: list[Sequence] = []  # prompts ending in the current step: they join after its decode

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Take from the queue what the batch has room for, and the cancelled (they leave at once)."""
        room = self.max_rows - len(self.running) - len(self.prefilling)
        gone = [seq for seq in self.waiting if seq.cancelled]
        for seq in gone:
            self.waiting.remove(seq)
        return gone + [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def schedule(self, admitted: list[Sequence]) -> Plan:
        """The step's plan up to its decode; the sequences' lists are as after it."""
        for seq in admitted:
            seq.status = Status.PREFILLING
        self.prefilling.extend(admitted)
        dropped = [seq for seq in self.prefilling if seq.cancelled]
        for seq in dropped:
            self.prefilling.remove(seq)
            seq.cancel()
            seq.finish(None)  # the prompt was not fully prefilled: no state to continue from
        join = [seq for seq in self.prefilling if not seq.to_prefill]
        calls = self._prefill_calls([seq for seq in self.prefilling if seq.to_prefill])
        self.ending = [seq for call in calls for seq, end in zip(call.seqs, call.ends, strict=True) if end]
        self._run(join)
        for seq in self.running:
            if seq.cancelled:
                seq.cancel()
        leave, left = self._leave()
        return Plan(dropped, calls, join, leave, left, decode=bool(self.running))

    def end_step(self) -> StepEnd:
        """The rest of the step, after its decode: rows that finished leave, ended prompts join."""
        leave, left = self._leave()
        finished = [seq for seq in self.ending if seq.finish_reason is not None]
        join = [seq for seq in self.ending if seq.finish_reason is None]
        self.ending = []
        self._run(join)
        return StepEnd(leave, left, finished, join)

    def only_decoding(self) -> bool:
        """Whether the next step can run without the event loop's attention in between: nothing
        waits or prefills, and every row has shown text and goes on."""
        if self.waiting or self.prefilling or not self.running:
            return False
        # a row's first character goes out at once (time to first character); a cancelled row leaves at once
        return all(seq.shown and seq.finish_reason is None and not seq.cancelled for seq in self.running)

    def fail_all(self) -> list[Sequence]:
        """Every admitted sequence, ended as cancelled: a step failed midway."""
        failed = self.prefilling + self.ending + self.running
        for seq in failed:
            seq.cancel()
            seq.finish(None)
        self.prefilling, self.ending, self.running = [], [], []
        return failed

    def _run(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.status = Status.RUNNING
        self.running.extend(seqs)

    def _leave(self) -> tuple[list[int], list[Sequence]]:
        leave = [i for i, seq in enumerate(self.running) if seq.finish_reason is not None]
        if not leave:
            return [], []
        left = [self.running[i] for i in leave]
        self.running = [seq for seq in self.running if seq.finish_reason is None]
        return leave, left

    def _prefill_calls(self, prompts: list[Sequence]) -> list[PrefillCall]:
        """This step's prefill calls; the sequences that prefill go to the back of the line (round robin)."""
        budget = PREFILL_CHUNKS_PER_STEP * self.prefill_chunk  # prompt characters this step may prefill
        groups: list[tuple[list[Sequence], int]] = []
        if self.prefill_together and prompts:  # every prompt at once, a slice of each
            width = min(self.prefill_chunk, max(PREFILL_MIN_WIDTH, budget // len(prompts)))
            groups.append((prompts, width))
        else:  # one prompt per call, a chunk each
            for seq in prompts:
                if budget <= 0:
                    break
                groups.append(([seq], self.prefill_chunk))
                budget -= min(len(seq.to_prefill), self.prefill_chunk)
        calls = []
        for seqs, width in groups:
            rows = [seq.to_prefill[:width] for seq in seqs]
            for seq in seqs:
                seq.to_prefill = seq.to_prefill[width:]
            calls.append(PrefillCall(seqs, rows, [not seq.to_prefill for seq in seqs]))
        took = {seq.id for seqs, _ in groups for seq in seqs}
        behind = [seq for seq in prompts if seq.id in took and seq.to_prefill]
        self.prefilling = [seq for seq in prompts if seq.id not in took] + behind
        return calls
