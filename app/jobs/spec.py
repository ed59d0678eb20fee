"""What a training job asks for, and the limits it must keep."""

from __future__ import annotations

from dataclasses import dataclass

from app.checkpoint import check_name
from app.config import Settings
from app.errors import InvalidRequestError, PayloadTooLargeError

ARCHS = ("rnn", "lstm", "gru")
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *FINAL)
ACTIVE = ("queued", "running")
MIN_HIDDEN_SIZE = 8


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int
    max_minutes: float
    max_hidden_size: int
    max_layers: int
    per_key: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_training_text_bytes,
            settings.max_training_minutes,
            settings.max_training_hidden_size,
            settings.max_training_layers,
            settings.max_trainings_per_key,
        )


@dataclass(frozen=True)
class TrainingSpec:
    """One job's request, checked against the limits by `check` (the text itself is kept apart)."""

    name: str
    arch: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    minutes: float = 2.0
    overwrite: bool = False

    def check(self, limits: Limits, text: str) -> None:
        """Raise InvalidRequestError (or PayloadTooLargeError) naming the field and what it may be."""
        try:
            check_name(self.name)  # a directory name: nothing that climbs out of the models directory or hides in it
        except ValueError as e:
            raise InvalidRequestError(str(e), param="name") from None
        if self.arch not in ARCHS:
            raise InvalidRequestError(f"arch: must be one of {', '.join(ARCHS)}, got {self.arch!r}", param="arch")
        if not MIN_HIDDEN_SIZE <= self.hidden_size <= limits.max_hidden_size:
            raise InvalidRequestError(
                f"hidden_size: must be in {MIN_HIDDEN_SIZE}..{limits.max_hidden_size}, got {self.hidden_size}",
                param="hidden_size",
            )
        if not 1 <= self.num_layers <= limits.max_layers:
            raise InvalidRequestError(
                f"num_layers: must be in 1..{limits.max_layers}, got {self.num_layers}", param="num_layers"
            )
        if not 0 < self.minutes <= limits.max_minutes:
            raise InvalidRequestError(
                f"minutes: must be > 0 and at most {limits.max_minutes:g}, got {self.minutes:g}", param="minutes"
            )
        size = len(text.encode("utf-8"))
        if size > limits.max_text_bytes:
            raise PayloadTooLargeError(
                f"text: {size:,} bytes; the limit is {limits.max_text_bytes:,} (RNNSERVE_MAX_TRAINING_TEXT_BYTES)",
                param="text",
            )
        if not text.strip():
            raise InvalidRequestError("text: must hold some text to learn from", param="text")
