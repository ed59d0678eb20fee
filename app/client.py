"""A terminal client: stream a generation from a running server over its WebSocket."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from websockets.sync.client import connect


def ws_url(base: str) -> str:
    base = base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/ws/generate"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/ws/generate"
    return base + "/ws/generate"


def stream_generation(
    url: str, request: dict[str, Any], api_key: str | None = None, out: TextIO = sys.stdout
) -> dict[str, Any]:
    """Send one generate message, write characters as they arrive; Ctrl-C sends cancel.

    Returns the `done` message (or raises RuntimeError with the server's error).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    with connect(ws_url(url), additional_headers=headers, max_size=None) as ws:
        ws.send(json.dumps({"type": "generate", **request}))
        cancelled = False
        while True:
            try:
                msg = json.loads(ws.recv())
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                ws.send(json.dumps({"type": "cancel"}))
                continue
            if msg["type"] == "token":
                out.write(msg["text"])
                out.flush()
            elif msg["type"] == "done":
                return msg
            elif msg["type"] == "error":
                raise RuntimeError(f"{msg['error']['type']}: {msg['error']['message']}")
