"""The README and the docs stay true: every example runs against a live server, generated sections are current."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings
from app.tools import readme
from tests.e2e.conftest import Server, running

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- example: not run \((.+)\) -->")
EXAMPLE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: its language, text, and the reason it is not run, if marked so."""

    page: str
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def live(self) -> bool:
        """A shell or Python example that talks to the server on localhost:8000."""
        if self.not_run is not None or self.lang not in ("sh", "python"):
            return False
        if self.lang == "python":
            return "localhost:8000" in self.code
        lines = [line.split(" #")[0] for line in self.code.splitlines() if not line.startswith("#")]
        return any("localhost:8000" in line for line in lines)


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(before.strip())
        line = text[: m.start()].count("\n") + 1
        rel = str(path.relative_to(ROOT))
        found.append(Block(rel, line, m.group(1), m.group(2), marker.group(1) if marker else None))
    return found


ALL = [b for page in PAGES for b in blocks(page)]
LIVE = [b for b in ALL if b.live]


# -- the README's shape ------------------------------------------------------------------------------


def test_readme_is_at_most_12_kb() -> None:
    assert len(README.read_bytes()) <= 12 * 1024


def test_quickstart_is_two_commands() -> None:
    section = README.read_text().split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in section.strip().splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["make serve", "make test"]


def test_quickstart_then_one_curl_streams() -> None:
    after = README.read_text().split("## Quickstart", 1)[1].split("## ", 1)[0]
    curls = [b for b in blocks(README) if b.code.startswith("curl") and b.code in after]
    assert len(curls) == 1 and '"stream":true' in curls[0].code and "content-type: application/json" in curls[0].code


def test_readme_links_into_the_docs_resolve() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link


def test_every_page_is_in_the_site_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = {next(iter(entry.values())) for entry in config["nav"]}
    assert nav == {p.name for p in PAGES if p != README}


# -- generated sections ------------------------------------------------------------------------------


def test_generated_sections_are_current() -> None:
    assert readme.stale() == [], "run `python -m app.tools.readme`"


def test_settings_table_lists_every_setting() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = re.findall(r"^\| `(RNNSERVE_[A-Z0-9_]+)` \|", page, flags=re.M)
    assert documented == [f"RNNSERVE_{name.upper()}" for name in Settings.model_fields]


def test_a_new_setting_makes_the_table_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    table = readme.settings_table()
    monkeypatch.setattr(readme, "settings_table", lambda: table + "\n| `RNNSERVE_NEW` | `1` | new |")
    assert any("settings" in s for s in readme.stale())


def test_readme_headline_comes_from_the_benchmark_json() -> None:
    body = readme.read_section(README.read_text(), "readme-bench")
    assert re.search(r"\| shakespeare-lstm \| [\d,]+ \(naive [\d,]+, [\d,.]+x\) \|", body)


# -- commands ------------------------------------------------------------------------------------------


def rnnserve_commands() -> list[tuple[str, list[str]]]:
    """Every `rnnserve ...` line of a shell block, continuations joined, comments dropped."""
    found = []
    for b in ALL:
        if b.lang != "sh":
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("rnnserve", ".venv/bin/rnnserve"):
                found.append((b.id, [w for w in words[1:] if w != "..."]))
    return found


def test_docs_show_rnnserve_commands() -> None:
    subcommands = {argv[0] for _, argv in rnnserve_commands()}
    assert {"data", "train", "eval", "generate", "report", "bench", "loadtest", "cluster"} <= subcommands


@pytest.mark.parametrize(("where", "argv"), rnnserve_commands(), ids=[w for w, _ in rnnserve_commands()])
def test_every_rnnserve_command_in_the_docs_parses(where: str, argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


# -- the examples, run against a live server ----------------------------------------------------------


def test_examples_are_found_and_marked() -> None:
    assert sum(b.page == "README.md" for b in LIVE) >= 4
    assert any(b.lang == "python" and "openai" in b.code for b in LIVE)
    assert any(b.lang == "python" and "websockets" in b.code for b in LIVE)
    for b in ALL:  # a shell block that talks to the server and is not run says why
        if b.lang == "sh" and "localhost:8000" in b.code and not b.live:
            assert b.not_run is not None or all(
                "localhost:8000" not in line.split(" #")[0] for line in b.code.splitlines()
            ), b.id


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("docs-server")) as srv:
        yield srv


def run_example(block: Block, server: Server) -> subprocess.CompletedProcess[str]:
    code = block.code.replace("localhost:8000", f"127.0.0.1:{server.port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable}
    if block.lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        prelude = (
            "set -euo pipefail\n"
            'curl() { command curl --fail-with-body --max-time 120 "$@"; }\n'
            'rnnserve() { "$PY" -m app.cli "$@"; }\n'
        )
        cmd = ["bash", "-c", prelude + code.replace(".venv/bin/rnnserve", "rnnserve")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)


@pytest.mark.parametrize("block", LIVE, ids=[b.id for b in LIVE])
def test_example_runs_as_written(block: Block, server: Server) -> None:
    done = run_example(block, server)
    output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, f"{block.id} failed:\n{block.code}\n{output}"
    assert done.stdout.strip(), block.id
    assert '"error"' not in done.stdout, done.stdout
