"""Generated sections of the README, between `<!-- name:start -->` and `<!-- name:end -->` markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"README has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def write_section(path: Path, name: str, body: str) -> None:
    path.write_text(replace_section(path.read_text(), name, body))
