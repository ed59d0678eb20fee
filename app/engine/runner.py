"""The runner: carries out the scheduler's plans on tensors: the batch's state, padding, kernels, sampling."""

from __future__ import annotations

import time

import numpy as np
import torch

from app import metrics
from app.engine.kernels import Kernels
from app.engine.sampling import RowSampler
from app.engine.scheduler import Plan, PrefillCall, StepEnd
from app.engine.sequence import Sequence
from app.nn import CharRNN, State, select_state, stack_states


class Runner:
    """The batch's state (row i: the scheduler's `running[i]`) and the kernels that advance it.
    Runs on the compute thread."""

    def __init__(self, name: str, model: CharRNN, kernels: Kernels) -> None:
        self.model = model
        self.kernels = kernels
        self.state: State | None = None
        self.sampler = RowSampler([])
        # compute-thread seconds of the current trip by phase, added to the metric when it ends
        self.spent = dict.fromkeys(metrics.PHASES, 0.0)
        self.seconds = {phase: metrics.ENGINE_SECONDS.labels(name, phase) for phase in metrics.PHASES}
        self.batch_sizes = metrics.BATCH.labels(name)  # looked up once, observed every step
        self.chars_made = metrics.CHARS.labels(name)

    def run(self, plan: Plan, rows: list[Sequence]) -> None:
        """A step up to and including its decode; `rows`: the batch as the plan leaves it."""
        for call in plan.prefill:
            self.prefill(call)
        self.join(plan.join)
        self.leave(plan.leave, plan.left)
        if plan.decode:
            self.decode(rows)

    def end(self, end: StepEnd) -> None:
        self.leave(end.leave, end.left)
        for seq in end.finished:  # its first character was its last: it ends with the state after the prompt
            assert seq.state is not None
            seq.started(seq.state)
            seq.finish(seq.state)
        self.join(end.join)

    def reset(self) -> None:
        self.state = None

    def account(self, trip: float) -> None:
        """Add a trip's seconds to the metric by phase; what the phases do not cover is bookkeeping."""
        self.spent["bookkeeping"] = max(0.0, trip - sum(self.spent.values()))
        for phase, seconds in self.spent.items():
            self.seconds[phase].inc(seconds)
            self.spent[phase] = 0.0

    def join(self, seqs: list[Sequence]) -> None:
        """Sequences become the last rows of the batch; their states move into it."""
        if not seqs:
            return
        states = [seq.state if seq.state is not None else self.model.zero_state(1) for seq in seqs]
        self.state = stack_states(([self.state] if self.state is not None else []) + states)
        for seq, state in zip(seqs, states, strict=True):
            seq.started(state)
            seq.state = None  # it lives in the batch now

    def leave(self, rows: list[int], seqs: list[Sequence]) -> None:
        """Rows leave the batch; their sequences finish with their state (all but their pending character)."""
        if not rows:
            return
        assert self.state is not None
        for i, seq in zip(rows, seqs, strict=True):
            seq.finish(select_state(self.state, torch.tensor([i])))
        n = self._rows()
        gone = set(rows)
        keep = [i for i in range(n) if i not in gone]
        self.state = select_state(self.state, torch.tensor(keep, dtype=torch.long)) if keep else None

    def _rows(self) -> int:
        assert self.state is not None
        h = self.state[0] if isinstance(self.state, tuple) else self.state
        return int(h.shape[1])  # (L, B, H)

    def prefill(self, call: PrefillCall) -> None:
        """One prefill call; a sequence whose prompt ends gets its first character from the logits after it."""
        seqs = call.seqs
        start = time.perf_counter()
        pad = max(0, self.kernels.prefill_rows - len(seqs))  # dummy rows of one character
        states = [seq.state if seq.state is not None else self.model.zero_state(1) for seq in seqs]
        if pad:
            states.append(self.model.zero_state(pad))
        logits, state = self.kernels.prefill(call.rows + [[0]] * pad, stack_states(states))
        for i, seq in enumerate(seqs):
            seq.state = select_state(state, torch.tensor([i]))
        ended = [i for i, end in enumerate(call.ends) if end]
        done = time.perf_counter()
        self.spent["prefill"] += done - start
        if ended:
            first = [seqs[i] for i in ended]
            chosen = RowSampler(first).choose(logits[ended])
            for i, seq, nxt in zip(ended, first, chosen, strict=True):
                seq.advance(logits[i], nxt)
            self.chars_made.inc(len(ended))
            self.spent["choose"] += time.perf_counter() - done

    def decode(self, seqs: list[Sequence]) -> None:
        """Every row decodes one character (`seqs`: the rows, in order)."""
        assert self.state is not None
        n = len(seqs)
        pad = -n % self.kernels.row_multiple
        ids = torch.from_numpy(np.array([seq.pending for seq in seqs] + [0] * pad, dtype=np.int64))  # (B,)
        state = self.state
        if pad:
            state = stack_states([state, self.model.zero_state(pad)])
        start = time.perf_counter()
        logits, state = self.kernels.decode(ids, state)  # (B, V)
        stepped = time.perf_counter()
        self.spent["step"] += stepped - start
        self.state = select_state(state, torch.arange(n)) if pad else state
        self.batch_sizes.observe(n)
        if not self.sampler.fits(seqs):  # the batch changed: the sampling columns are rebuilt
            self.sampler = RowSampler(seqs)
        chosen = self.sampler.choose(logits[:n] if pad else logits)
        made = 0
        for i, seq in enumerate(seqs):
            if seq.finish_reason is None:
                seq.advance(logits[i] if seq.req.logprobs else None, chosen[i])
                made += 1
        self.chars_made.inc(made)
        self.spent["choose"] += time.perf_counter() - stepped
