"""Job: a validated generation, ready for the engine, and what its session needs afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from app.checkpoint import Checkpoint
from app.engine.sequence import GenerationRequest
from app.nn import State
from app.sessions.record import SessionRecord


@dataclass
class Job:
    """A validated generation, ready for the engine, and what its session needs afterwards."""

    ckpt: Checkpoint
    request: GenerationRequest
    prompt: str  # as read by the model (unknown characters skipped)
    save: bool
    owner: str
    ttl: int
    session: SessionRecord | None = None  # the session being continued
    lease: str = ""  # our lease on it
    state: State | None = None  # the continued session's state
