""".env.example documents every setting, with its default, and nothing that isn't one."""

from __future__ import annotations

import re

from pydantic import TypeAdapter

from app.config import Settings
from tests.deploy.conftest import ROOT

LINE = re.compile(r"^#?\s*(RNNSERVE_[A-Z0-9_]+)=(.*)$")


def documented() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if m := LINE.match(line.strip()):
            assert m[1] not in found, f"{m[1]} documented twice"
            found[m[1]] = m[2].strip()
    return found


def test_every_setting_is_documented_and_every_variable_is_a_setting() -> None:
    fields = {f"RNNSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(documented()) == fields


def test_documented_values_are_the_defaults() -> None:
    for variable, value in documented().items():
        field = Settings.model_fields[variable.removeprefix("RNNSERVE_").lower()]
        if value == "":
            assert field.default in (None, ""), variable  # empty: unset
        else:
            assert TypeAdapter(field.annotation).validate_strings(value) == field.default, variable


def test_every_variable_is_commented_out_and_explained() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if "RNNSERVE_" in line and LINE.match(line.strip()):
            assert line.startswith("# RNNSERVE_"), f"{line!r}: a default stays commented out"
            assert lines[i - 1].startswith("# ") and not LINE.match(lines[i - 1]), f"{line!r}: explain it above"
