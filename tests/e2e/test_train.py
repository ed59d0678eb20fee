"""The Train view in Chromium: a pasted text becomes a model, its loss curve drawn live, then a sample from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.test_trainings import TEXT
from tests.e2e.conftest import SHIPPED_DIR, Server, new_page, require_playwright, running

require_playwright()
from playwright.sync_api import Browser, expect  # noqa: E402

JOB_TIMEOUT_MS = 180_000  # seconds of training, but torch's import and a loaded machine come first


@pytest.fixture(scope="module")
def train_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own (its models directory is written to), without Redis: it runs its own queue and worker."""
    models = tmp_path_factory.mktemp("train-models")
    (models / "shakespeare-lstm").symlink_to(SHIPPED_DIR / "shakespeare-lstm", target_is_directory=True)
    settings = {"models_dir": str(models), "models_poll_seconds": "1", "training_threads": "1"}
    with running(tmp_path_factory.mktemp("train-server"), **settings) as srv:
        yield srv


def test_a_pasted_text_trains_a_model_that_then_generates(
    browser: Browser, train_server: Server, artifacts: Path
) -> None:
    with new_page(browser, train_server) as page:
        page.goto("/#train")
        expect(page.locator("#panel-train")).to_be_visible()
        page.fill("#tr-name", "pasted")
        page.select_option("#tr-arch", "gru")
        page.fill("#tr-hidden", "16")
        page.fill("#tr-layers", "1")
        page.fill("#tr-minutes", "0.1")
        page.fill("#tr-text", TEXT)
        page.click("#tr-start")
        expect(page.locator("#tr-cancel")).to_be_enabled()
        status = page.locator("#tr-status")
        expect(status).to_have_attribute("data-status", "running", timeout=JOB_TIMEOUT_MS)
        expect(status).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
        expect(status).to_contain_text("held-out")
        points = page.locator("#tr-train-line").get_attribute("points") or ""
        assert len(points.split()) >= 2, "the training loss is drawn as a line"
        assert page.locator("#tr-val-line").get_attribute("points"), "the validation loss is drawn"
        expect(status).to_have_attribute("data-served", "pasted", timeout=JOB_TIMEOUT_MS)
        page.click("#tr-generate")
        expect(page.locator("#tr-sample")).not_to_be_empty()
        assert len(page.locator("#tr-sample").text_content() or "") == 400
        page.screenshot(path=artifacts / "train.png", full_page=True)
        page.click("#tr-open")
        expect(page.locator("#panel-playground")).to_be_visible()
        expect(page.locator("#model")).to_have_value("pasted")


def test_a_bad_request_shows_the_api_error(browser: Browser, train_server: Server) -> None:
    with new_page(browser, train_server) as page:
        page.goto("/#train")
        page.fill("#tr-name", "../escape")
        page.fill("#tr-text", TEXT)
        page.click("#tr-start")
        expect(page.locator("#tr-error")).to_contain_text("422")
        expect(page.locator("#tr-error")).to_contain_text("name")
        expect(page.locator("#tr-start")).to_be_enabled()
