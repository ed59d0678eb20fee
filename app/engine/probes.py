"""Determinism probes: whether a kernel gives a row the same bits whatever else is in its call."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.nn import CharRNN, State, Step, select_state, state_from_parts, state_parts

# Where the decoding step's kernels give a row different bits at different batch sizes (as torch's CPU
# matmuls can), steps run on a batch padded to a multiple of this many rows: a row then gets the
# same bits whatever else is in the batch, so a seeded request's text never depends on load.
ROW_MULTIPLE = 8

# rows of prompt ids (each not empty) and their state -> the logits after each row's last id (B, V), the state there
Prefill = Callable[[list[list[int]], State], tuple[torch.Tensor, State]]


def _noise_state(model: CharRNN, rows: int, g: torch.Generator) -> State:
    """A state of `rows` rows with values in (-1, 1), as after some text."""
    return state_from_parts([torch.randn(t.shape, generator=g).tanh() for t in state_parts(model.zero_state(rows))])


def _same(a: tuple[torch.Tensor, State], b: tuple[torch.Tensor, State]) -> bool:
    pairs = zip((a[0], *state_parts(a[1])), (b[0], *state_parts(b[1])), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@torch.inference_mode()
def prefill_min_rows(prefill: Prefill, model: CharRNN, rows: int = 12) -> int:
    """The fewest rows a call of `prefill` must have for every row to get the same bits whatever the
    other rows and their lengths, with two calls giving the bits of one; 0 where there is none:
    prompts are then prefilled one at a time, in fixed chunks."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (rows,), generator=g).tolist()
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    state = _noise_state(model, rows, g)
    whole = prefill(ids, state)
    _, half = prefill([row[: len(row) // 2] for row in ids], state)
    if not _same(prefill([row[len(row) // 2 :] for row in ids], half), whole):
        return 0
    alike = [
        all(
            _same(
                prefill(ids[first : first + n], select_state(state, part)),
                (whole[0][part], select_state(whole[1], part)),
            )
            for first in (0, rows - n)
            for part in [torch.arange(first, first + n)]
        )
        for n in range(1, rows)
    ]
    return next((least for least in (1, 2) if all(alike[least - 1 :])), 0)


@torch.inference_mode()
def row_multiple(step: Step, model: CharRNN, rows: int = 16) -> int:
    """1 when `step` gives each row the same bits at every batch size from 1 to `rows`, else
    ROW_MULTIPLE: batches are then padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows,), generator=g)
    full = _noise_state(model, rows, g)
    logits, after = step(ids, full)
    for n in range(1, rows):
        first = torch.arange(n)
        if not _same(step(ids[:n], select_state(full, first)), (logits[:n], select_state(after, first))):
            return ROW_MULTIPLE
    return 1
