"""The README stays true: its settings table, its quickstart and its curl examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_settings_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(RNNSERVE_[A-Z_]+)` \|", README, flags=re.M))
    actual = {f"RNNSERVE_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_quickstart_is_two_commands() -> None:
    section = README.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in section.strip().splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["make serve", "make test"]


def test_curl_examples_work(shipped_client: TestClient) -> None:
    examples = re.findall(
        r"curl -s[N]? localhost:8000(/[a-z]+) -H 'content-type: application/json' \\?\s*-d '([^']+)'", README
    )
    assert len(examples) >= 6
    for path, body in examples:
        r = shipped_client.post(path, json=json.loads(body))
        assert r.status_code == 200, (path, body, r.text)
