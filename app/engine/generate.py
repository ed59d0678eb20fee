"""The naive generation loop (one request, one recurrent call per character), prefill, beam runs and scoring."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.beam import beam_steps
from app.engine.compute import Steps, run_to_end
from app.engine.config import CHUNK
from app.engine.sequence import FinishReason, GenerationRequest, GenerationResult, Sequence, TokenLogprob
from app.nn import CharRNN, State


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
def prefill_logits(model: CharRNN, ids: list[int], state: State) -> tuple[torch.Tensor, State]:
    """Run `ids` (not empty) through the whole-sequence kernel: the logits after the last (V,) and the state there."""
    logits, state = model(torch.tensor(ids, dtype=torch.long).view(-1, 1), state)  # (T, 1, V)
    return logits[-1, 0], state


def prefill_steps(model: CharRNN, ids: list[int], state: State | None) -> Steps[State]:
    """prefill, one chunk of `ids` per step."""
    state = state if state is not None else model.zero_state(1)
    for start in range(0, len(ids), CHUNK):
        state = prefill(model, ids[start : start + CHUNK], state)
        yield
    return state


@torch.inference_mode()
def generate(model: CharRNN, chars: str, req: GenerationRequest, state: State | None) -> GenerationResult:
    """Generate after `req.ids`, continuing from `state`: the baseline the batched engine is measured against."""
    if req.params.strategy == "beam":
        return run_to_end(beam_generation(model, chars, req, state))
    seq = Sequence(req, chars, state)
    state = seq.state if seq.state is not None else model.zero_state(1)
    if seq.to_prefill:
        logits, state = prefill_logits(model, seq.to_prefill, state)
        seq.advance(logits)
    while seq.finish_reason is None:
        logits, state = model(torch.tensor([[seq.pending]]), state)
        seq.advance(logits[0, 0])
    return seq.result(state)


def beam_generation(
    model: CharRNN,
    chars: str,
    req: GenerationRequest,
    state: State | None,
    on_text: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Steps[GenerationResult]:
    """Beam search for one request, a step at a time; `on_text(str)` receives text as it becomes certain."""
    state = yield from prefill_steps(model, req.ids[:-1], state)
    width = req.params.beam_width
    beam, state = yield from beam_steps(
        model, chars, state, req.ids[-1], req.max_tokens, width, req.stop, req.logprobs, on_text, cancelled
    )
    logprobs = [TokenLogprob(i, lp, top) for i, lp, top in zip(beam.ids, beam.logprobs, beam.top, strict=False)]
    n = beam.stopped_at if beam.stopped_at >= 0 else len(beam.ids)
    finish: FinishReason = "stop" if beam.stopped_at >= 0 else "length"
    if finish == "length" and len(beam.ids) < req.max_tokens:
        finish = "cancelled"
    return GenerationResult(
        ids=beam.ids[:n],
        finish_reason=finish,
        state=state,
        pending=beam.ids[-1] if beam.ids else req.ids[-1],
        generator_state=torch.Generator().manual_seed(req.seed).get_state(),
        consumed=beam.ids,
        logprobs=logprobs[:n],
    )


@torch.inference_mode()
def score_steps(model: CharRNN, ids: list[int], state: State | None) -> Steps[list[float]]:
    """Logprob of each of ids[1:] given everything before it, starting from `state`; a chunk per step."""
    if state is None:
        state = model.zero_state(1)
    x = torch.tensor(ids, dtype=torch.long).view(-1, 1)
    out: list[float] = []
    for start in range(0, len(ids) - 1, CHUNK):
        inputs, targets = x[start : start + CHUNK], x[start + 1 : start + CHUNK + 1]
        logits, state = model(inputs[: len(targets)], state)  # (T, 1, V)
        lp = torch.log_softmax(logits[:, 0].float(), dim=-1)
        out += lp.gather(1, targets).squeeze(1).tolist()
        yield
    return out


def score(model: CharRNN, ids: list[int], state: State | None) -> list[float]:
    """score_steps run to its end."""
    return run_to_end(score_steps(model, ids, state))
