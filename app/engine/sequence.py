"""Sequence: one request's progress through decoding: what to feed, what was made, what may be shown."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from app.engine.sampling import SamplingParams, choose
from app.engine.stopping import StopChecker
from app.nn import State

FinishReason = Literal["length", "stop", "cancelled"]
_ids = itertools.count()
# A sampling row takes its uniform numbers from its generator this many at a time (fewer near its
# end): one call per block instead of one per character. torch.rand(n) gives the numbers of n calls
# of torch.rand(1), so the characters are the same.
UNIFORM_BLOCK = 64


class Status(enum.Enum):
    """Where a sequence is in the engine; the scheduler moves it along."""

    WAITING = "waiting"  # queued for a row
    PREFILLING = "prefilling"  # admitted, its prompt still being prefilled
    RUNNING = "running"  # a row of the batch, decoding
    FINISHED = "finished"  # its result is made


@dataclass(frozen=True)
class GenerationRequest:
    """`ids` are fed first; the last of them is the pending input of the first generated step.

    `generator_state` (a torch.Generator state) continues a sampler exactly; otherwise `seed` seeds it.
    """

    ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    generator_state: Tensor | None = None


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    ids: list[int]  # generated, a stop string excluded
    finish_reason: FinishReason
    state: State | None  # after everything up to, not including, `pending`; None: cancelled mid-prompt
    pending: int  # the last character: the input of the next step
    generator_state: Tensor  # the sampler's generator, to continue exactly
    consumed: list[int] = field(default_factory=list)  # every generated character, a stop string included
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Sequence:
    """Decoding state of one request; the engine (or the naive loop) feeds it one row of logits per step."""

    def __init__(self, req: GenerationRequest, chars: str, state: State | None) -> None:
        self.id = next(_ids)
        self.req = req
        self.chars = chars  # the vocabulary: id -> character
        self.status = Status.WAITING
        # still to prefill (the whole-sequence kernel): a prompt is prefilled to its end, and the
        # logits after it give the first character; with nothing to prefill, the first step does
        self.to_prefill = list(req.ids) if len(req.ids) > 1 else []
        self.pending = req.ids[-1]  # the input of the next step
        self.origin = state  # the state before the prompt
        self.state = state  # batch 1, or None for a zero state; while running it lives in the batch
        self.generator = self._first_generator()
        self.uniforms: list[float] = []  # drawn from the generator, not used yet, the next one last
        self.draws = 0  # uniform numbers used
        self.stopper = StopChecker(req.stop)
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.released = 0  # characters of self.ids the stop checker has let out
        self.unsent = ""  # released text not yet handed to the client
        self.finish_reason: FinishReason | None = None
        self.cancelled = False  # asked for by the client, from the event loop; the scheduler acts on it
        self.shown = False  # some of its text has reached the client's stream
        self.final: GenerationResult | None = None
        # the state a row started decoding from (after the prompt and the characters made from it,
        # `start_made`), before `start_pending`
        self.start_state: State | None = None
        self.start_pending = self.pending
        self.start_made = 0

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    def _first_generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.req.generator_state is not None:
            generator.set_state(self.req.generator_state)
        else:
            generator.manual_seed(self.req.seed)
        return generator

    def generator_state_after(self, made: int) -> Tensor:
        """The sampler's generator state after the first `made` characters: a sampled character
        takes one uniform draw (as `sampling.choose` and the engine's RowSampler make it), and
        `made` draws at once advance the generator as `made` single draws do."""
        generator = self._first_generator()
        if self.params.strategy == "sample":
            torch.rand(made, generator=generator, dtype=torch.float64)
        return generator.get_state()

    def uniform(self) -> float:
        """The sampler's next uniform number, as a draw of torch.rand(1, dtype=float64) would give it."""
        if not self.uniforms:
            block = min(UNIFORM_BLOCK, max(1, self.req.max_tokens - len(self.ids)))
            self.uniforms = torch.rand(block, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        self.draws += 1
        return self.uniforms.pop()

    def advance(self, logits: Tensor | None, nxt: int | None = None) -> None:
        """Take one step's logits (V,); choose the next character unless given (then the logits are
        needed only for logprobs)."""
        if nxt is None:
            assert logits is not None
            nxt = int(choose(logits.unsqueeze(0), self.params, self.generator)[0])
        if self.req.logprobs:
            assert logits is not None
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(lp, self.req.logprobs)
            alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            self.logprobs.append(TokenLogprob(nxt, float(lp[nxt]), alts))
        self.ids.append(nxt)
        self.pending = nxt
        text, stopped = self.stopper.push(self.chars[nxt])
        if stopped:
            self.finish_reason = "stop"
        elif len(self.ids) >= self.req.max_tokens:
            self.finish_reason = "length"
            text += self.stopper.flush()
        self.released += len(text)
        self.unsent += text

    def started(self, state: State) -> None:
        """Record the state after the prompt (and the first character, if made from it)."""
        self.start_state, self.start_pending, self.start_made = state, self.pending, len(self.ids)

    def cancel(self) -> None:
        """End now; what the stop checker held back is not a stop string, so it is released."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            text = self.stopper.flush()
            self.released += len(text)
            self.unsent += text

    def take_unsent(self) -> str:
        text, self.unsent = self.unsent, ""
        return text

    def finish(self, state: State | None) -> None:
        """Record the final result, with the state after the last character (None: not reached)."""
        self.final = self.result(state)
        self.status = Status.FINISHED

    def result(self, state: State | None) -> GenerationResult:
        assert self.finish_reason is not None
        n = self.released
        return GenerationResult(
            ids=self.ids[:n],
            finish_reason=self.finish_reason,
            state=state,
            pending=self.pending,
            # the generator is ahead by the uniform numbers drawn and not used
            generator_state=self.generator_state_after(self.draws) if self.uniforms else self.generator.get_state(),
            consumed=list(self.ids),
            logprobs=self.logprobs[:n],
        )
