"""Without Chromium the browser tests skip, naming the install command, except under CI=true where they fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import require_chromium


def test_missing_chromium_skips_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_chromium(tmp_path / "chromium")


def test_missing_chromium_fails_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        require_chromium(tmp_path / "chromium")


def test_present_chromium_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    (tmp_path / "chromium").touch()
    require_chromium(tmp_path / "chromium")
