"""Browser fixtures: the shipped models served by `rnnserve serve` in a subprocess, and Debian's headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from app.procs import stop
from tests.conftest import unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = ROOT / "models"
SHIPPED = ("shakespeare-lstm", "shakespeare-gru", "shakespeare-rnn")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
TIMEOUT_MS = 30_000  # every wait in the browser: generous for a loaded two-core machine
START_TIMEOUT_S = 120.0


class Server:
    """`rnnserve serve` over the shipped checkpoints, on a free port, in a subprocess."""

    def __init__(self, workdir: Path, **settings: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        # only the settings given here: none from the caller's RNNSERVE_* variables or a .env (cwd is workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
        env.update(
            PYTHONPATH=str(ROOT),
            RNNSERVE_MODELS_DIR=str(SHIPPED_DIR),
            RNNSERVE_DEFAULT_MODEL="shakespeare-lstm",
            RNNSERVE_SHUTDOWN_GRACE_SECONDS="1",
        )
        env.update({"RNNSERVE_" + k.upper(): v for k, v in settings.items()})
        cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", "warning"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def post(self, path: str, body: dict[str, Any], key: str = "") -> dict[str, Any]:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer

    def stop(self) -> None:
        stop(self.proc)


def require_playwright() -> None:
    """Called by each test module before it imports playwright."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is missing: pip install -e '.[dev]' (and `apt-get install chromium`)")


@contextlib.contextmanager
def running(workdir: Path, **settings: str) -> Iterator[Server]:
    missing = [n for n in SHIPPED if not (SHIPPED_DIR / n / "meta.json").exists()]
    if missing:
        pytest.fail(f"shipped checkpoints missing from {SHIPPED_DIR}: {missing}")
    srv = Server(workdir, **settings)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("e2e-server")) as srv:
        yield srv


def require_chromium(path: Path | None = None) -> None:
    path = path or CHROMIUM
    if not path.exists():
        unavailable(f"{path} not found: install Debian's browser with `apt-get install chromium`")


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Playwright's sync API runs an event loop in this thread while it is started, so it lives
    only as long as the browser tests: the rest of the suite needs `asyncio.run`."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def new_page(browser: Browser, server: Server) -> Iterator[Page]:
    """A page in a fresh context (no stored key) on the server; uncaught script errors fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    with new_page(browser, server) as pg:
        yield pg


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $RNNSERVE_ARTIFACTS, else tests/e2e/artifacts/ (git-ignored)."""
    directory = Path(os.environ.get("RNNSERVE_ARTIFACTS") or ROOT / "tests" / "e2e" / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory
