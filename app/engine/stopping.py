"""Stop strings: end generation at the first occurrence, never emitting any part of it."""

from __future__ import annotations


class StopChecker:
    """Feeds generated text through, holding back the last len(longest stop) - 1 characters."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; returns (text safe to emit, whether a stop string was reached).

        Text is read character by character, as it is generated: the first stop string to be
        completed wins (of several completed by the same character, the one starting earliest).
        """
        if not self.stops:
            return text, False
        out = []
        for ch in text:
            self.buffer += ch
            starts = [len(self.buffer) - len(s) for s in self.stops if self.buffer.endswith(s)]
            if starts:
                out.append(self.buffer[: min(starts)])
                self.buffer = ""
                return "".join(out), True
            if len(self.buffer) > self.hold:
                cut = len(self.buffer) - self.hold
                out.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
        return "".join(out), False

    def flush(self) -> str:
        """What is still held back, once generation has ended without a stop."""
        out, self.buffer = self.buffer, ""
        return out
