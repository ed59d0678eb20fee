"""CharRNN: embedding -> stacked RNN/LSTM/GRU layers -> linear head, with batched-state helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

ARCHS = ("rnn", "lstm", "gru")

# A recurrent state: (L, B, H) for rnn/gru; the pair (h, c), each (L, B, H), for lstm.
State = Tensor | tuple[Tensor, Tensor]
# a decoding step: ids (B,) and a state -> logits (B, V) and the next state
Step = Callable[[Tensor, State], tuple[Tensor, State]]


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "lstm"
    vocab_size: int = 96
    embedding_size: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding_size)
        cell = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[c.arch]
        # dropout between stacked layers; the head gets its own dropout below
        self.rnn = cell(
            c.embedding_size,
            c.hidden_size,
            num_layers=c.num_layers,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        if c.arch == "lstm":
            self._init_forget_bias()

    def _init_forget_bias(self) -> None:
        # gates are ordered (input, forget, cell, output); a forget bias of 1 helps early training
        h = self.config.hidden_size
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    p[h : 2 * h].fill_(1.0)
                elif name.startswith("bias_hh"):
                    p[h : 2 * h].zero_()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_state(self, batch_size: int = 1) -> State:
        c = self.config
        device = self.head.weight.device
        h = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device)  # (L, B, H)
        return (h, torch.zeros_like(h)) if c.arch == "lstm" else h

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (T, B) int64 -> logits (T, B, V) and the state after the last step."""
        x = self.embed(ids)  # (T, B, E)
        out, state = self.rnn(x, state)  # (T, B, H)
        return self.head(self.drop(out)), state  # (T, B, V)


def state_parts(state: State) -> tuple[Tensor, ...]:
    """The tensors of a state: (h,) for rnn/gru, (h, c) for lstm."""
    return state if isinstance(state, tuple) else (state,)


def state_from_parts(parts: Sequence[Tensor]) -> State:
    """The inverse of state_parts."""
    return (parts[0], parts[1]) if len(parts) == 2 else parts[0]


def stack_states(states: list[State]) -> State:
    """Per-sequence states (batch 1 or more each) -> one state batched along dim 1."""
    first = states[0]
    if isinstance(first, tuple):
        return (
            torch.cat([s[0] for s in states], dim=1),
            torch.cat([s[1] for s in states], dim=1),
        )
    return torch.cat(states, dim=1)  # type: ignore[arg-type]


def split_state(state: State) -> list[State]:
    """A batched state -> one state of batch 1 per sequence (views, cloned)."""
    if isinstance(state, tuple):
        h, c = state
        return [(h[:, i : i + 1].clone(), c[:, i : i + 1].clone()) for i in range(h.shape[1])]
    return [state[:, i : i + 1].clone() for i in range(state.shape[1])]


def select_state(state: State, index: Tensor) -> State:
    """Rows `index` of a batched state (for beam search and batch filtering)."""
    if isinstance(state, tuple):
        return (state[0].index_select(1, index), state[1].index_select(1, index))
    return state.index_select(1, index)
