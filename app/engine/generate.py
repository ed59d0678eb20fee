"""The naive generation loop (one request, one recurrent call per character), prefill and scoring."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.beam import beam_search
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
def generate(model: CharRNN, decode: str, req: GenerationRequest, state: State | None) -> GenerationResult:
    """Generate after `req.ids`, continuing from `state`: the baseline the batched engine is measured against."""
    if req.params.strategy == "beam":
        return run_beam(model, decode, req, state)
    seq = Sequence(req, decode, state)
    state = prefill(model, seq.to_prefill, seq.state)
    while seq.finish_reason is None:
        logits, state = model(torch.tensor([[seq.pending]]), state)
        seq.advance(logits[0, 0])
    return seq.result(state)


def run_beam(
    model: CharRNN,
    decode: str,
    req: GenerationRequest,
    state: State | None,
    on_text: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Beam search for one request; `on_text(str)` receives text as it becomes certain."""
    state = prefill(model, req.ids[:-1], state)
    width = req.params.beam_width
    beam, state = beam_search(
        model, decode, state, req.ids[-1], req.max_tokens, width, req.stop, req.logprobs, on_text, cancelled
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
def score(model: CharRNN, ids: list[int], state: State | None) -> list[float]:
    """Logprob of each of ids[1:] given everything before it, starting from `state`."""
    if state is None:
        state = model.zero_state(1)
    x = torch.tensor(ids, dtype=torch.long).view(-1, 1)
    logits, _ = model(x[:-1], state)  # (T-1, 1, V)
    lp = torch.log_softmax(logits[:, 0].float(), dim=-1)
    return lp.gather(1, x[1:]).squeeze(1).tolist()
