"""Job: a validated generation, ready for the engine, and what its session needs afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from app.checkpoint import Checkpoint
from app.engine.sequence import GenerationRequest
from app.errors import RnnserveError
from app.nn import State
from app.sessions.lease import Lease
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
    lease: Lease | None = None  # our lease on it, renewed until it is committed or released
    state: State | None = None  # the continued session's state

    @property
    def lost(self) -> RnnserveError | None:
        """Why the continued session is no longer ours (its lease ran out and was taken), if it is not."""
        return self.lease.lost if self.lease is not None else None
