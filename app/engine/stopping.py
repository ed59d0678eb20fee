"""Stop strings: end generation at the first occurrence, never emitting any part of it."""

from __future__ import annotations


class StopChecker:
    """Feeds generated text through; holds back only what could still begin a stop string."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; returns (text safe to emit, whether a stop string was reached)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        cut = len(self.buffer) - self.hold
        out, self.buffer = self.buffer[: max(cut, 0)], self.buffer[max(cut, 0) :]
        return out, False

    def flush(self) -> str:
        """What is still held back, once generation has ended without a stop."""
        out, self.buffer = self.buffer, ""
        return out
