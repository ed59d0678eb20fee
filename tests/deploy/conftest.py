"""Deployment fixtures: the repository's deployment files, read and parsed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.tools.cluster import find_nginx

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line.strip())
        current = ""
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.strip().partition(" ")
        pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


@pytest.fixture(scope="session")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def require_nginx() -> str:
    """nginx's path; without one, skip, or fail where CI=true (.ci/run installs it: no nginx test may skip)."""
    try:
        return find_nginx()
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI=true: the nginx tests may not be skipped)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def nginx() -> str:
    return require_nginx()
