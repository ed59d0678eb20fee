"""Determinism probes: batches are padded, and prompts prefilled together, only where the kernels need it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.probes import ROW_MULTIPLE, prefill_min_rows, row_multiple
from app.nn import CharRNN, State


class RowwiseStep:
    """A step of elementwise operations only (each row on its own); `drift` > 0 makes it depend on the batch size."""

    def __init__(self, model: CharRNN, drift: float = 0.0) -> None:
        self.model = model
        self.drift = drift

    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h = state[0] if isinstance(state, tuple) else state
        logits = h[-1][:, :1] * self.model.head.weight[:, 0] + self.model.embed.weight[ids, :1] + self.drift * len(ids)
        return logits, state


def test_batches_are_padded_only_where_the_kernels_need_it(tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("lstm")
    assert row_multiple(RowwiseStep(model), model) == 1
    assert row_multiple(RowwiseStep(model, drift=1e-3), model) == ROW_MULTIPLE


class RowwisePrefill:
    """A prefill of elementwise operations only, carrying its state exactly across calls;
    `drift` > 0 makes a row depend on the batch size, `single_drift` > 0 makes a lone row differ,
    `split_drift` > 0 makes two calls differ from one."""

    def __init__(self, model: CharRNN, drift: float = 0.0, single_drift: float = 0.0, split_drift: float = 0.0) -> None:
        self.model, self.drift, self.single_drift, self.split_drift = model, drift, single_drift, split_drift

    def __call__(self, rows: list[list[int]], state: State) -> tuple[torch.Tensor, State]:
        h = state[0] if isinstance(state, tuple) else state
        scale = torch.tensor([0.5 ** len(row) * (1 + self.split_drift * len(row) ** 2) for row in rows])
        h = h * scale.view(1, -1, 1)  # halving is exact: two calls give the bits of one
        logits = h[-1][:, :1] * self.model.head.weight[:, 0] + self.drift * len(rows)
        if len(rows) == 1:
            logits = logits + self.single_drift
        return logits, (h, h) if isinstance(state, tuple) else h


def test_prompts_are_prefilled_together_only_where_a_row_cannot_depend_on_the_others(
    tiny_model: Callable[..., CharRNN],
) -> None:
    model = tiny_model("gru")
    assert prefill_min_rows(RowwisePrefill(model), model) == 1
    assert prefill_min_rows(RowwisePrefill(model, single_drift=1e-3), model) == 2
    assert prefill_min_rows(RowwisePrefill(model, drift=1e-3), model) == 0
    assert prefill_min_rows(RowwisePrefill(model, split_drift=1e-3), model) == 0
