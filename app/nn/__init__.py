"""Torch modules: the character-level recurrent language model and its state helpers."""

from app.nn.fused import FusedStep
from app.nn.model import (
    ARCHS,
    CharRNN,
    ModelConfig,
    State,
    Step,
    select_state,
    split_state,
    stack_states,
    state_from_parts,
    state_parts,
)

__all__ = [
    "ARCHS",
    "CharRNN",
    "FusedStep",
    "ModelConfig",
    "State",
    "Step",
    "select_state",
    "split_state",
    "stack_states",
    "state_from_parts",
    "state_parts",
]
