"""The page against a server with API keys: the key field opens every view; a wrong key is refused clearly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import SHIPPED, Server, new_page, require_playwright, running

require_playwright()
from playwright.sync_api import Browser, Page, expect  # noqa: E402

KEY = "e2e-secret-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("e2e-keyed"), api_keys=KEY) as srv:
        yield srv


def enter_key(page: Page, key: str) -> None:
    page.goto("/")
    expect(page.locator("#error")).to_contain_text("401")  # GET /models needs the key
    page.fill("#apikey", key)
    page.press("#apikey", "Tab")  # change: the page reloads the models with the key


def test_the_key_opens_generate_explorer_and_compare(browser: Browser, keyed_server: Server) -> None:
    with new_page(browser, keyed_server) as page:
        enter_key(page, KEY)
        expect(page.locator("#model")).to_have_value("shakespeare-lstm")
        expect(page.locator("#error")).to_have_text("")

        page.fill("#max_tokens", "50")
        page.click("#generate")  # the socket authenticates with its first message
        expect(page.locator("#status")).to_have_attribute("data-finish-reason", "length")

        page.click("#tab-explorer")
        page.fill("#ex-text", "ROMEO.\nBut soft")
        page.click("#ex-inspect")  # POST /inspect with Authorization: Bearer
        expect(page.locator("#ex-view .ex-char")).to_have_count(len("ROMEO.\nBut soft"))
        expect(page.locator("#ex-error")).to_have_text("")

        page.click("#tab-compare")
        page.fill("#cmp-max-tokens", "50")
        page.click("#cmp-run")
        for name in SHIPPED:
            expect(page.locator(f"#cmp-col-{name}")).to_have_attribute("data-finish", "length")


def test_a_wrong_key_is_refused_with_a_clear_message(browser: Browser, keyed_server: Server) -> None:
    with new_page(browser, keyed_server) as page:
        enter_key(page, "not-the-key")
        expect(page.locator("#error")).to_contain_text("Set the API key")
        page.click("#generate")
        expect(page.locator("#error")).to_contain_text("API key refused")
        page.click("#tab-compare")
        expect(page.locator("#cmp-models input")).to_have_count(0)  # no models without the key
