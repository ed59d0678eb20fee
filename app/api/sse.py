"""Server-Sent Events framing of stream events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from app.api.serving import DoneEvent, ErrorEvent, StreamEvent, TokenEvent

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def frame(events: AsyncIterator[StreamEvent | None]) -> AsyncIterator[str]:
    async for ev in events:
        if ev is None:
            yield ": keep-alive\n\n"
        elif isinstance(ev, TokenEvent):
            yield sse("token", {"text": ev.text, "index": ev.index})
        elif isinstance(ev, DoneEvent):
            yield sse("done", ev.response.model_dump())
        elif isinstance(ev, ErrorEvent):
            yield sse("error", ev.error)


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=HEADERS)
