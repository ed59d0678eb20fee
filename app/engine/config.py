"""The engine's configuration: which kernels and weights it runs, and how it batches; validated once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Characters of a prompt or a scored text per whole-sequence call, where the work is done in slices
# that share the compute thread.
CHUNK = 256
# One trip to the compute thread decodes steps until this much time has passed (or something needs
# the event loop): a trip's cost and a stream event's are then paid once per burst of characters.
STEP_BUDGET_S = 0.02


class Backend(StrEnum):
    """The kernels a model's engine runs (app/engine/kernels.py has one class per member)."""

    NAIVE = "naive"  # the baseline: one request at a time, one recurrent call per character
    TORCH = "torch"  # torch's fused step; prompts prefilled one at a time
    ONNX = "onnx"  # ONNX Runtime's fused step; prompts prefilled together


class Weights(StrEnum):
    """The decoding step's weights: the checkpoint's, or 8-bit integers in blocks with a scale each."""

    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class EngineConfig:
    """How every model's engine runs; `__post_init__` is the one place the combinations are checked."""

    max_batch: int = 128  # rows advanced together in one step
    max_queue: int = 256  # generations waiting for a row; beyond: overloaded
    backend: Backend = Backend.ONNX
    weights: Weights = Weights.FP32
    step_budget: float = STEP_BUDGET_S  # seconds of steps per trip to the compute thread; 0: one step
    prefill_chunk: int = CHUNK  # prompt characters a row prefills per call, at most

    def __post_init__(self) -> None:
        # accept the plain strings of a setting or a command line
        object.__setattr__(self, "backend", Backend(self.backend))
        object.__setattr__(self, "weights", Weights(self.weights))
        if self.weights is Weights.INT8 and self.backend is not Backend.ONNX:
            raise ValueError("int8 weights need the onnx backend (the quantized step is ONNX Runtime's)")
        if self.max_batch < 1 or self.max_queue < 0 or self.prefill_chunk < 1 or self.step_budget < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue and step_budget >= 0")

    @property
    def naive(self) -> bool:
        return self.backend is Backend.NAIVE

    @property
    def rows(self) -> int:
        """Rows of the batch: the baseline runs one request at a time."""
        return 1 if self.naive else self.max_batch

    @property
    def trip_budget(self) -> float:
        """The step budget; the baseline runs one step per trip."""
        return 0.0 if self.naive else self.step_budget
