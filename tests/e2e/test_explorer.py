"""The Explorer view in Chromium: POST /inspect drawn as coloured characters, features, predictions, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.e2e.conftest import Server, require_playwright

require_playwright()
from playwright.sync_api import Page, expect  # noqa: E402

TEXT = (
    "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    "JULIET.\nAy me! (she sighs)\n"
)
LSTM_HIDDEN = json.loads((Path(__file__).parents[2] / "models/shakespeare-lstm/config.json").read_text())["hidden_size"]
BACKGROUNDS = """els => els.map(e => getComputedStyle(e).backgroundColor)"""


def rgb(colour: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", colour)[:3])
    return r, g, b


def open_explorer(page: Page) -> None:
    page.goto("/")
    page.click("#tab-explorer")
    expect(page.locator("#panel-explorer")).to_be_visible()
    expect(page.locator("#panel-playground")).to_be_hidden()
    expect(page.locator("#ex-model")).to_have_value("shakespeare-lstm")
    expect(page.locator("#ex-layer")).to_have_value("1")  # the last of two layers


def inspect(page: Page) -> None:
    page.click("#ex-inspect")
    expect(page.locator("#ex-view .ex-char")).to_have_count(len(TEXT))
    expect(page.locator("#ex-shown")).to_have_attribute("data-unit", re.compile(r"^\d+$"))


def shown_unit(page: Page) -> int:
    return int(page.locator("#ex-shown").get_attribute("data-unit") or "-1")


def test_inspect_colours_each_character_by_the_units_activation(page: Page, server: Server, artifacts: Path) -> None:
    open_explorer(page)
    expect(page.locator("#ex-text")).to_have_value(TEXT)
    inspect(page)
    unit = shown_unit(page)
    shown = page.locator("#ex-shown")
    expect(shown).to_contain_text("layer 1")
    expect(shown).to_contain_text("state h")
    expect(shown).to_contain_text(f"unit {unit}")
    expect(page.locator("#ex-unit")).to_have_value(str(unit))

    chars = page.locator("#ex-view .ex-char")
    backgrounds = chars.evaluate_all(BACKGROUNDS)
    assert all(b not in ("rgba(0, 0, 0, 0)", "transparent") for b in backgrounds), backgrounds
    assert len(set(backgrounds)) > 10, "the activation should vary along the text"
    # newlines: a visible mark, then a line break
    assert chars.nth(TEXT.index("\n")).text_content() == "\u21b5\n"

    # the colours follow the API's values: red for positive, blue for negative, strongest at max |value|
    want = server.post("/inspect", {"text": TEXT, "units": [unit]})["activations"]
    values = [float(v) for v in chars.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert all(abs(a - row[0]) < 1e-3 for a, row in zip(values, want, strict=True)), (values, want)
    for value, background in zip(values, backgrounds, strict=True):
        r, _, b = rgb(background)
        if value > 0.01:
            assert r > b, (value, background)
        elif value < -0.01:
            assert b > r, (value, background)
    strongest = max(range(len(values)), key=lambda i: abs(values[i]))
    assert rgb(backgrounds[strongest]) == ((214, 48, 49) if values[strongest] > 0 else (38, 110, 210))

    # hovering a character shows the top-5 next characters: after "yonder windo" the model expects "w"
    i = TEXT.index("windo") + 4
    chars.nth(i).hover()
    rows = page.locator("#ex-predictions .ex-pred")
    expect(rows).to_have_count(5)
    expect(page.locator("#ex-pred-context")).to_contain_text(f"character {i + 1} of {len(TEXT)}")
    assert (rows.first.locator("td").first.text_content() or "") == "w"
    probs = [float((t or "").rstrip("%")) for t in rows.locator("td:nth-child(2)").all_text_contents()]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.05
    page.screenshot(path=artifacts / "explorer.png", full_page=True)


def test_the_keyboard_moves_between_characters(page: Page) -> None:
    open_explorer(page)
    inspect(page)
    first = page.locator("#ex-view .ex-char").first
    expect(first).to_have_attribute("tabindex", "0")
    first.focus()
    expect(page.locator("#ex-pred-context")).to_contain_text(f"character 1 of {len(TEXT)}")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#ex-pred-context")).to_contain_text(f"character 2 of {len(TEXT)}")
    page.keyboard.press("ArrowDown")  # same column, next line: "u" of "But"
    expect(page.locator("#ex-pred-context")).to_contain_text('After "u"')
    page.keyboard.press("End")
    expect(page.locator("#ex-pred-context")).to_contain_text(f"character {len(TEXT)} of {len(TEXT)}")
    expect(page.locator("#ex-predictions .ex-pred")).to_have_count(5)


def test_a_features_unit_button_shows_that_unit(page: Page) -> None:
    open_explorer(page)
    inspect(page)
    features = page.locator("#ex-features .ex-feature")
    expect(features).to_have_count(5)
    expect(page.locator('#ex-features [data-feature="column"] button').first).to_contain_text("r=")
    before = page.locator("#ex-view .ex-char").evaluate_all(BACKGROUNDS)
    read = set(page.locator("#ex-units button").evaluate_all("els => els.map(e => Number(e.dataset.unit))"))
    assert read, "the units read are listed"
    units = page.locator("#ex-features button").evaluate_all("els => els.map(e => Number(e.dataset.unit))")
    # a unit that the first request did not read: the page asks /inspect for it
    other = next((u for u in units if u not in read), None) or next(u for u in units if u != shown_unit(page))
    page.locator(f'#ex-features button[data-unit="{other}"]').first.click()
    expect(page.locator("#ex-shown")).to_have_attribute("data-unit", str(other))
    expect(page.locator(f'#ex-features button[data-unit="{other}"]').first).to_have_attribute("aria-pressed", "true")
    after = page.locator("#ex-view .ex-char").evaluate_all(BACKGROUNDS)
    assert after != before


def test_the_cell_state_is_for_lstm_models_only(page: Page) -> None:
    open_explorer(page)
    page.select_option("#ex-state", "c")
    page.fill("#ex-unit", "7")
    inspect(page)
    expect(page.locator("#ex-shown")).to_contain_text("state c")
    expect(page.locator("#ex-shown")).to_have_attribute("data-unit", "7")
    page.select_option("#ex-model", "shakespeare-gru")
    expect(page.locator('#ex-state option[value="c"]')).to_be_disabled()
    expect(page.locator("#ex-state")).to_have_value("h")


def test_api_errors_are_shown_with_the_field_and_range(page: Page) -> None:
    open_explorer(page)
    page.fill("#ex-unit", str(LSTM_HIDDEN))
    page.click("#ex-inspect")
    error = page.locator("#ex-error")
    expect(error).to_contain_text("422")
    expect(error).to_contain_text("units")
    expect(error).to_contain_text(f"0..{LSTM_HIDDEN - 1}")
    page.fill("#ex-unit", "")
    page.fill("#ex-text", "")
    page.click("#ex-inspect")
    expect(error).to_contain_text("text")
    page.fill("#ex-text", "ROMEO. \u00e9t\u00e9")
    page.uncheck("#ex-skip")
    page.click("#ex-inspect")
    expect(error).to_contain_text("vocabulary")
    page.check("#ex-skip")
    page.click("#ex-inspect")
    expect(error).to_have_text("")
    expect(page.locator("#ex-status")).to_contain_text("skipped")
    expect(page.locator("#ex-view .ex-char")).to_have_count(len("ROMEO. t"))
