"""GET / serves the playground page and its script, without a key."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_page_and_script_are_served_open(tiny_models_dir: Path) -> None:
    with TestClient(create_app(Settings(models_dir=tiny_models_dir, api_keys="k"))) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/static/playground.js">' in page.text
        script = c.get("/static/playground.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        # the script speaks the WebSocket protocol of /ws/generate, with the browser auth message
        for needle in ('"/ws/generate"', 'type: "generate"', 'type: "cancel"', 'type: "auth"'):
            assert needle in script.text
        assert c.get("/models").status_code == 401  # what the page calls still needs the key
