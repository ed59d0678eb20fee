"""Inside the model: per-character activations, next-character predictions, and the units that
track simple features of the text (after Karpathy, Johnson and Fei-Fei, "Visualizing and
Understanding Recurrent Networks")."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from app.nn import CharRNN

MAX_UNITS = 64  # units whose activations one request may ask for
DEFAULT_UNITS = 16  # units chosen when the request names none
TOP_CORRELATED = 5  # units listed per feature
SPEAKER_LINE = re.compile(r"[A-Z][A-Z '&,-]*\.")  # a speaker's name on its own line: "FIRST CITIZEN."


@dataclass(frozen=True)
class Trace:
    """What the model did on a text, as plain lists (row t: after reading character t)."""

    units: list[int]
    activations: list[list[float]]  # (T, len(units))
    top: list[list[tuple[int, float]]]  # (T, n): (character id, probability), most likely first
    features: dict[str, list[tuple[int, float]]]  # feature -> (unit, Pearson r), strongest first


@torch.inference_mode()
def layer_states(model: CharRNN, ids: list[int], layer: int, kind: str) -> tuple[Tensor, Tensor]:
    """Feed `ids` (BOS first) one character at a time.

    Returns the layer's state ("h": its output, "c": the LSTM cell) after each character but the
    first, (T, H), and the next-character distribution after each of them, (T, V).
    """
    state = model.zero_state(1)
    states, logits = [], []
    for i in ids:
        out, state = model(torch.tensor([[i]]), state)  # out (1, 1, V)
        states.append((state[0] if kind == "h" else state[1]) if isinstance(state, tuple) else state)
        logits.append(out[0, 0])
    acts = torch.stack([s[layer, 0] for s in states[1:]])  # (T, H)
    return acts, torch.softmax(torch.stack(logits[1:]), dim=-1)


def text_features(text: str) -> dict[str, Tensor]:
    """Per character, after reading it: its column in the line, whether it is inside brackets or
    double quotes, on a speaker's name line, or a line end."""
    column, brackets, quotes, speaker, line_end = [], [], [], [], []
    depth, quoted, col = 0, False, 0
    for line in text.splitlines(keepends=True):
        is_speaker = SPEAKER_LINE.fullmatch(line.rstrip("\n")) is not None
        for ch in line:
            depth = depth + 1 if ch in "([{" else max(0, depth - 1) if ch in ")]}" else depth
            quoted = not quoted if ch == '"' else quoted
            column.append(col)
            brackets.append(depth > 0)
            quotes.append(quoted)
            speaker.append(is_speaker and ch != "\n")
            line_end.append(ch == "\n")
            col = 0 if ch == "\n" else col + 1
    named = {"column": column, "in_brackets": brackets, "in_quotes": quotes, "speaker": speaker, "line_end": line_end}
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in named.items()}


def correlations(acts: Tensor, feature: Tensor) -> Tensor:
    """Pearson r of every unit's activations (T, H) with a feature (T,); 0 where either is constant."""
    a = acts - acts.mean(dim=0)
    f = feature - feature.mean()
    denom = a.norm(dim=0) * f.norm()
    return torch.where(denom > 0, (a * f[:, None]).sum(dim=0) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def best_units(acts: Tensor, features: dict[str, Tensor]) -> dict[str, list[tuple[int, float]]]:
    """For each feature that varies in the text, the units most correlated with it (by |r|)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for name, feature in features.items():
        if feature.max() == feature.min():
            found[name] = []
            continue
        r = correlations(acts, feature)
        order = r.abs().argsort(descending=True)[:TOP_CORRELATED]
        found[name] = [(int(u), round(float(r[u]), 3)) for u in order]
    return found


def default_units(acts: Tensor, found: dict[str, list[tuple[int, float]]]) -> list[int]:
    """Each feature's best units, taken in turn, then the most variable units, up to DEFAULT_UNITS."""
    units: list[int] = []
    for rank in range(TOP_CORRELATED):
        units += [pairs[rank][0] for pairs in found.values() if rank < len(pairs)]
    units += acts.var(dim=0).argsort(descending=True).tolist() if acts.shape[0] > 1 else list(range(acts.shape[1]))
    return list(dict.fromkeys(units))[:DEFAULT_UNITS]


def inspect(
    model: CharRNN, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
) -> Trace:
    """The trace of `text` (encoded as `ids`, BOS first) at `layer`'s `kind` state ("h" or "c")."""
    acts, probs = layer_states(model, ids, layer, kind)
    found = best_units(acts, text_features(text))
    chosen = units if units is not None else default_units(acts, found)
    p, idx = probs.topk(top, dim=-1)  # (T, top)
    rows = zip(idx.tolist(), p.round(decimals=4).tolist(), strict=True)
    return Trace(
        units=chosen,
        activations=acts[:, chosen].round(decimals=4).tolist(),
        top=[list(zip(i, q, strict=True)) for i, q in rows],
        features=found,
    )
