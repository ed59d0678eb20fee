"""The Compare view in Chromium: one prompt and seed through the LSTM, GRU and RNN, side by side."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import SHIPPED, Server, require_playwright

require_playwright()
from playwright.sync_api import Page, expect  # noqa: E402

PROMPT = "JULIET.\n"


def open_compare(page: Page) -> None:
    page.goto("/#compare")  # the URL's fragment opens the view
    expect(page.locator("#panel-compare")).to_be_visible()
    expect(page.locator("#cmp-models input:checked")).to_have_count(len(SHIPPED))
    for name in SHIPPED:
        expect(page.locator(f"#cmp-model-{name}")).to_be_checked()


def test_three_models_stream_side_by_side(page: Page, server: Server, artifacts: Path) -> None:
    open_compare(page)
    page.fill("#cmp-prompt", PROMPT)
    page.fill("#cmp-max-tokens", "300")
    page.fill("#cmp-seed", "11")
    page.click("#cmp-run")
    columns = page.locator("#cmp-columns .cmp-col")
    expect(columns).to_have_count(len(SHIPPED))
    expect(page.locator("#cmp-cancel")).to_be_enabled()
    for name in SHIPPED:
        expect(page.locator(f"#cmp-col-{name}")).to_have_attribute("data-finish", "length")
    expect(page.locator("#cmp-run")).to_be_enabled()
    expect(page.locator("#cmp-status")).to_contain_text("Done")

    texts = {}
    for name in SHIPPED:
        col = page.locator(f"#cmp-col-{name}")
        expect(col.locator("h2")).to_have_text(name)
        expect(col.locator(".cmp-status")).to_contain_text("length: 300 chars at")
        expect(col.locator(".cmp-status")).to_contain_text("chars/s, seed 11")
        text = col.locator(".cmp-output").text_content() or ""
        # the same request over HTTP gives the same text: same prompt, same seed, per model
        body = {"model": name, "prompt": PROMPT, "max_tokens": 300, "seed": 11, "temperature": 0.8}
        assert text == PROMPT + server.post("/generate", body)["text"]
        texts[name] = text
    assert len(set(texts.values())) == len(SHIPPED), "three models, three different texts"
    page.screenshot(path=artifacts / "compare.png", full_page=True)


def test_cancel_stops_every_column(page: Page) -> None:
    open_compare(page)
    page.uncheck("#cmp-model-shakespeare-rnn")
    page.fill("#cmp-max-tokens", "10000")
    page.click("#cmp-run")
    columns = page.locator("#cmp-columns .cmp-col")
    expect(columns).to_have_count(2)
    page.wait_for_function(
        "[...document.querySelectorAll('#cmp-columns .cmp-output')].every(e => e.textContent.length > 30)"
    )
    page.click("#cmp-cancel")
    for name in ("shakespeare-lstm", "shakespeare-gru"):
        expect(page.locator(f"#cmp-col-{name}")).to_have_attribute("data-finish", "cancelled")
        expect(page.locator(f"#cmp-col-{name} .cmp-status")).to_contain_text("cancelled")
    expect(page.locator("#cmp-run")).to_be_enabled()


def test_no_model_ticked_is_an_error(page: Page) -> None:
    open_compare(page)
    for name in SHIPPED:
        page.uncheck(f"#cmp-model-{name}")
    page.click("#cmp-run")
    expect(page.locator("#cmp-error")).to_contain_text("Tick at least one model")
    expect(page.locator("#cmp-columns .cmp-col")).to_have_count(0)


def test_the_views_are_tabs_the_arrow_keys_move_between(page: Page) -> None:
    page.goto("/")
    expect(page.locator("#panel-playground")).to_be_visible()
    page.focus("#tab-playground")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-explorer")).to_be_focused()
    expect(page.locator("#panel-explorer")).to_be_visible()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-compare")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-compare")).to_be_visible()
    expect(page.locator("#panel-playground")).to_be_hidden()
    assert page.evaluate("location.hash") == "#compare"
    page.keyboard.press("ArrowRight")
    expect(page.locator("#panel-train")).to_be_visible()
    page.keyboard.press("ArrowRight")  # wraps round
    expect(page.locator("#panel-playground")).to_be_visible()
