"""The kernels a model's engine runs, one class per Backend: the decoding step and the prompt prefill."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from app.engine.config import Backend, EngineConfig, Weights
from app.engine.generate import prefill_logits
from app.engine.probes import prefill_min_rows, row_multiple
from app.nn import CharRNN, FusedStep, State


class Kernels:
    """`decode` advances every row of a batch by one character; `prefill` runs rows of prompt ids
    through the whole-sequence kernel. Runs on the compute thread (building included).

    A subclass names its Backend member (`class X(Kernels, backend=Backend.X)`) and is then the one
    `make_kernels` builds for it.
    """

    backend: ClassVar[Backend]
    by_backend: ClassVar[dict[Backend, type[Kernels]]] = {}
    row_multiple = 1  # decode batches are padded to a multiple of this many rows
    prefill_rows = 0  # the fewest rows of a prefill call that takes prompts together; 0: one at a time

    def __init_subclass__(cls, backend: Backend, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.backend = backend
        Kernels.by_backend[backend] = cls

    def __init__(self, model: CharRNN, weights: Weights) -> None:
        self.model = model

    def decode(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) from `state` (batch B) -> logits (B, V) and the state after them."""
        raise NotImplementedError

    def prefill(self, rows: list[list[int]], state: State) -> tuple[Tensor, State]:
        """Rows of ids (none empty) from `state` -> the logits after each row's last id (B, V), the state there."""
        raise NotImplementedError


def make_kernels(model: CharRNN, config: EngineConfig) -> Kernels:
    return Kernels.by_backend[config.backend](model, config.weights)


class NaiveKernels(Kernels, backend=Backend.NAIVE):
    """The baseline: one `nn.LSTM`/`nn.GRU`/`nn.RNN` call per character, prompts included."""

    def decode(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        out, state = self.model(ids.view(1, -1), state)
        return out[0], state

    def prefill(self, rows: list[list[int]], state: State) -> tuple[Tensor, State]:
        (ids,) = rows
        for i in ids:
            out, state = self.model(torch.tensor([[i]]), state)
        return out[0], state


class TorchKernels(Kernels, backend=Backend.TORCH):
    """torch's fused step; its whole-sequence kernel, one prompt per call."""

    def __init__(self, model: CharRNN, weights: Weights) -> None:
        super().__init__(model, weights)
        self.step = FusedStep(model)
        self.row_multiple = row_multiple(self.step, model)

    def decode(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        return self.step(ids, state)

    def prefill(self, rows: list[list[int]], state: State) -> tuple[Tensor, State]:
        (ids,) = rows
        logits, state = prefill_logits(self.model, ids, state)
        return logits.unsqueeze(0), state


class OnnxKernels(Kernels, backend=Backend.ONNX):
    """ONNX Runtime's fused step (on either weights); its whole-sequence ops, many prompts per call."""

    def __init__(self, model: CharRNN, weights: Weights) -> None:
        super().__init__(model, weights)
        from app.nn.onnx_step import OnnxPrefill, OnnxStep  # ONNX Runtime loads only where it is used

        threads = torch.get_num_threads()
        self.step = OnnxStep(model, threads=threads, weights=weights.value)
        self.batched_prefill = OnnxPrefill(model, threads=threads)
        self.row_multiple = row_multiple(self.step, model)
        # prompts are prefilled together only where a row's result cannot depend on the others
        self.prefill_rows = prefill_min_rows(self.batched_prefill, model)

    def decode(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        return self.step(ids, state)

    def prefill(self, rows: list[list[int]], state: State) -> tuple[Tensor, State]:
        return self.batched_prefill(rows, state)
