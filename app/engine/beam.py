"""Beam search: keep the `width` most likely continuations, return the most likely one found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.compute import Steps
from app.nn import CharRNN, State, select_state


@dataclass
class Beam:
    ids: list[int]
    score: float  # sum of the chosen characters' logprobs
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, when asked for
    stopped_at: int = -1  # length of the text before the stop string, once one is reached


def first_stop(text: str, stop: tuple[str, ...]) -> int:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


@torch.inference_mode()
def beam_steps(
    model: CharRNN,
    chars: str,
    state: State,
    pending: int,
    max_tokens: int,
    width: int,
    stop: tuple[str, ...] = (),
    top_n: int = 0,
    on_text: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Steps[tuple[Beam, State]]:
    """The highest-scoring candidate and its state (after everything up to, not including, its last character).

    Candidates are the `width` live beams, all of the same length, and every beam that reached a
    stop string on the way. `on_text` receives, as soon as it is certain, the text that every
    candidate shares: none of them can change it any more. (Like any beam search, it can miss a
    sequence more likely than its best: the greedy path is not kept alongside, since that would
    hold back nearly all streamed text until the end.)
    """
    stop = tuple(s for s in stop if s)
    live = [Beam([], 0.0)]
    inputs = torch.tensor([pending])
    finished: list[tuple[Beam, State]] = []
    window = max((len(s) for s in stop), default=0)
    emitted = 0
    for _ in range(max_tokens):
        if cancelled is not None and cancelled():
            break
        logits, state = model(inputs.view(1, -1), state)
        lp = torch.log_softmax(logits[0].float(), dim=-1)  # (B, V)
        total = torch.tensor([b.score for b in live]).unsqueeze(1) + lp  # (B, V)
        best, flat = torch.topk(total.view(-1), min(width, total.numel()))
        rows, cols, scores = (flat // lp.shape[1]).tolist(), (flat % lp.shape[1]).tolist(), best.tolist()
        tops = torch.topk(lp, top_n) if top_n else None
        live = [
            Beam(
                [*live[r].ids, c],
                s,
                [*live[r].logprobs, float(lp[r, c])],
                [*live[r].top, list(zip(tops.indices[r].tolist(), tops.values[r].tolist(), strict=True))]
                if tops is not None
                else [],
            )
            for r, c, s in zip(rows, cols, scores, strict=True)
        ]
        state, inputs = select_state(state, torch.tensor(rows)), torch.tensor(cols)
        if stop:
            keep = []
            for i, beam in enumerate(live):
                # a stop string not seen before must end at the new character
                tail = beam.ids[-window:]
                at = first_stop("".join(chars[j] for j in tail), stop)
                if at >= 0:
                    beam.stopped_at = len(beam.ids) - len(tail) + at
                    finished.append((beam, select_state(state, torch.tensor([i]))))
                else:
                    keep.append(i)
            idx = torch.tensor(keep, dtype=torch.long)
            live, state, inputs = [live[i] for i in keep], select_state(state, idx), inputs[idx]
            if not live:
                break
        if on_text is not None:
            emitted = _emit_certain(chars, live, [b for b, _ in finished], window, emitted, on_text)
        yield
    candidates = finished + [(b, select_state(state, torch.tensor([i]))) for i, b in enumerate(live)]
    return max(candidates, key=lambda bs: bs[0].score)


def _emit_certain(
    chars: str, live: list[Beam], finished: list[Beam], window: int, emitted: int, on_text: Callable[[str], None]
) -> int:
    """Send the characters past `emitted` that all candidates share; returns the new count sent."""
    # a live beam may still be cut by a stop string starting in its last window-1 characters
    texts = [b.ids[: len(b.ids) - max(window - 1, 0)] for b in live] + [b.ids[: b.stopped_at] for b in finished]
    if not texts:
        return emitted
    end = emitted
    shortest = min(len(t) for t in texts)
    while end < shortest and all(t[end] == texts[0][end] for t in texts):
        end += 1
    if end > emitted:
        on_text("".join(chars[i] for i in texts[0][emitted:end]))
    return end
