"""Vocab: the character set of a model, mapping text to ids and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from app.errors import InvalidRequestError

UnknownChars = Literal["error", "skip"]


class Vocab:
    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("vocab must be a non-empty string of distinct characters")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @property
    def bos(self) -> int:
        """The id fed before a text that has no history: a newline, as at the start of a work."""
        return self.stoi.get("\n", 0)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self.stoi

    def encode(self, text: str, unknown: UnknownChars = "error", param: str = "prompt") -> list[int]:
        """Ids of `text`; characters outside the vocab raise (naming them) or are dropped."""
        missing = sorted({ch for ch in text if ch not in self.stoi})
        if missing and unknown == "error":
            shown = ", ".join(repr(ch) for ch in missing[:20])
            raise InvalidRequestError(
                f"{param} contains {len(missing)} character(s) outside the model's vocabulary: "
                f"{shown}; remove them or set unknown_chars to 'skip'",
                param=param,
            )
        return [self.stoi[ch] for ch in text if ch in self.stoi]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)
