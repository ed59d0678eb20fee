"""The Generate view in Chromium: streaming into #output, cancel, continue and fork over the WebSocket."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Server, require_playwright

require_playwright()
from playwright.sync_api import Page, expect  # noqa: E402

PROMPT = "ROMEO.\n"
# the page's sample defaults, sent by playground.js with every sampled request
SAMPLE = {"strategy": "sample", "temperature": 0.8, "top_p": 1.0, "top_k": 0}

# Records the length of #output's text at every change, to see it arrive in pieces.
WATCH_OUTPUT = """() => {
  window.lengths = [];
  const out = document.getElementById("output");
  new MutationObserver(() => window.lengths.push(out.textContent.length))
    .observe(out, { childList: true, characterData: true, subtree: true });
}"""


def open_page(
    page: Page, prompt: str = PROMPT, max_tokens: int = 400, seed: str = "", strategy: str = "sample"
) -> None:
    page.goto("/")
    expect(page.locator("#model")).to_have_value("shakespeare-lstm")  # GET /models has answered
    page.select_option("#strategy", strategy)
    page.fill("#prompt", prompt)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#seed", seed)


def output_text(page: Page) -> str:
    return page.locator("#output").text_content() or ""


def test_generate_streams_the_text_into_the_output(page: Page, server: Server, artifacts: Path) -> None:
    open_page(page, max_tokens=1500, seed="7")
    page.evaluate(WATCH_OUTPUT)
    page.click("#generate")
    expect(page.locator("#cancel")).to_be_enabled()
    expect(page.locator("#status")).to_have_attribute("data-finish-reason", "length")

    text = output_text(page)
    want = server.post("/generate", {"prompt": PROMPT, "max_tokens": 1500, "seed": 7, **SAMPLE})
    assert text == PROMPT + want["text"]  # the tokens, in order, nothing lost or doubled
    lengths = page.evaluate("window.lengths")
    assert lengths == sorted(lengths), "the output only grows while streaming"
    partial = {n for n in lengths if len(PROMPT) < n < len(text)}
    assert len(partial) >= 2, f"the text arrived in one piece, not streamed: {lengths}"
    status = page.locator("#status")
    expect(status).to_contain_text("Done: length")
    expect(status).to_contain_text("chars/s")
    session = status.get_attribute("data-session-id")
    assert session and session.startswith("sess-")
    expect(status).to_contain_text(session)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()
    page.screenshot(path=artifacts / "playground.png", full_page=True)


def test_cancel_ends_a_long_generation_cancelled(page: Page) -> None:
    open_page(page, max_tokens=10_000)
    page.click("#generate")
    page.wait_for_function(f"document.getElementById('output').textContent.length > {len(PROMPT) + 20}")
    page.click("#cancel")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-finish-reason", "cancelled")
    expect(status).to_contain_text("cancelled")
    assert len(output_text(page)) < len(PROMPT) + 10_000
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#error")).to_have_text("")


def test_escape_cancels_too(page: Page) -> None:
    open_page(page, max_tokens=10_000)
    page.click("#generate")
    page.wait_for_function(f"document.getElementById('output').textContent.length > {len(PROMPT) + 20}")
    page.keyboard.press("Escape")
    expect(page.locator("#status")).to_have_attribute("data-finish-reason", "cancelled")


def test_continue_grows_the_same_session_exactly(page: Page, server: Server) -> None:
    open_page(page, max_tokens=100, strategy="greedy")
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-finish-reason", "length")
    session = status.get_attribute("data-session-id")
    assert session
    first = output_text(page)
    assert len(first) == len(PROMPT) + 100

    expect(page.locator("#continue")).to_be_enabled()
    page.click("#continue")
    page.wait_for_function(
        f"document.getElementById('output').textContent.length === {len(first) + 100}"
        " && document.getElementById('status').dataset.finishReason === 'length'"
    )
    both = output_text(page)
    assert both.startswith(first)
    expect(status).to_have_attribute("data-session-id", session)
    expect(status).to_contain_text(session)
    # greedy 100 then 100 more equals greedy 200 in one request
    assert (
        both == PROMPT + server.post("/generate", {"prompt": PROMPT, "max_tokens": 200, "strategy": "greedy"})["text"]
    )

    page.click("#fork")
    expect(status).to_contain_text("Forked")
    forked = status.text_content() or ""
    assert session not in forked and "sess-" in forked


def test_a_seed_past_2_to_the_53_goes_and_comes_back_exact(page: Page, server: Server) -> None:
    seed = 2**53 + 1  # a JS number would round it to 2**53
    open_page(page, max_tokens=60, seed=str(seed))
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-finish-reason", "length")
    expect(status).to_contain_text(f"seed {seed}.")
    want = server.post("/generate", {"prompt": PROMPT, "max_tokens": 60, "seed": seed, **SAMPLE})
    assert output_text(page) == PROMPT + want["text"]


def test_reset_forgets_the_session(page: Page) -> None:
    open_page(page, max_tokens=20, strategy="greedy")
    page.click("#generate")
    expect(page.locator("#continue")).to_be_enabled()
    page.click("#reset")
    expect(page.locator("#output")).to_have_text("")
    expect(page.locator("#status")).to_have_text("Ready.")
    expect(page.locator("#continue")).to_be_disabled()
    expect(page.locator("#fork")).to_be_disabled()
