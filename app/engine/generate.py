"""The generation loop of one request: prefill the prompt in one call, then one step per character."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from app.engine.beam import beam_search
from app.engine.sampling import SamplingParams, choose
from app.engine.stopping import StopChecker
from app.nn import CharRNN, State

FinishReason = Literal["length", "stop", "cancelled"]


@dataclass(frozen=True)
class GenerationRequest:
    """`ids` are fed first; the last of them is the pending input of the first generated step."""

    ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int
    stop: tuple[str, ...] = ()
    logprobs: int = 0


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    ids: list[int]  # generated, the stop string excluded
    finish_reason: FinishReason
    state: State  # after consuming everything up to, not including, `pending`
    pending: int  # the last character: the input of the next step
    logprobs: list[TokenLogprob] = field(default_factory=list)


@torch.inference_mode()
def prefill(model: CharRNN, ids: list[int], state: State | None) -> State:
    """Run `ids` through the whole-sequence kernel; returns the state after the last one."""
    if state is None:
        state = model.zero_state(1)
    if not ids:
        return state
    _, state = model(torch.tensor(ids, dtype=torch.long).view(-1, 1), state)
    return state


@torch.inference_mode()
def generate(model: CharRNN, decode: str, req: GenerationRequest, state: State | None) -> GenerationResult:
    """Generate up to max_tokens characters after `req.ids`, continuing from `state`."""
    state = prefill(model, req.ids[:-1], state)
    pending = req.ids[-1]
    if req.params.strategy == "beam":
        return _beam(model, decode, req, state, pending)
    generator = torch.Generator().manual_seed(req.seed)
    stopper = StopChecker(req.stop)
    out: list[int] = []
    logprobs: list[TokenLogprob] = []
    text_len = 0  # characters released by the stop checker so far
    finish: FinishReason = "length"
    for _ in range(req.max_tokens):
        logits, state = model(torch.tensor([[pending]]), state)
        logits = logits[0]  # (1, V)
        nxt = int(choose(logits, req.params, generator)[0])
        if req.logprobs:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            top = torch.topk(lp, req.logprobs)
            alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            logprobs.append(TokenLogprob(nxt, float(lp[nxt]), alts))
        out.append(nxt)
        pending = nxt
        released, stopped = stopper.push(decode[nxt])
        text_len += len(released)
        if stopped:
            finish = "stop"
            break
    if finish == "stop":
        # the state has consumed the stop string: the session continues after it
        out = out[:text_len]
    return GenerationResult(out, finish, state, pending, logprobs[: len(out)])


def _beam(model: CharRNN, decode: str, req: GenerationRequest, state: State, pending: int) -> GenerationResult:
    width = req.params.beam_width
    beam, state = beam_search(model, decode, state, pending, req.max_tokens, width, req.stop, req.logprobs)
    logprobs = [TokenLogprob(i, lp, top) for i, lp, top in zip(beam.ids, beam.logprobs, beam.top, strict=False)]
    if beam.stopped_at >= 0:
        return GenerationResult(beam.ids[: beam.stopped_at], "stop", state, beam.ids[-1], logprobs[: beam.stopped_at])
    return GenerationResult(beam.ids, "length", state, beam.ids[-1], logprobs)


@torch.inference_mode()
def score(model: CharRNN, ids: list[int], state: State | None) -> list[float]:
    """Logprob of each of ids[1:] given everything before it, starting from `state`."""
    if state is None:
        state = model.zero_state(1)
    x = torch.tensor(ids, dtype=torch.long).view(-1, 1)
    logits, _ = model(x[:-1], state)  # (T-1, 1, V)
    lp = torch.log_softmax(logits[:, 0].float(), dim=-1)
    return lp.gather(1, x[1:]).squeeze(1).tolist()
