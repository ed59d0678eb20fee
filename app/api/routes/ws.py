"""WebSocket /ws/generate: generate, cancel, and generate again on one socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from app.api import serving
from app.api.deps import Services, authenticate, get_services
from app.api.errors import describe_validation_error, error_body
from app.api.job import Job
from app.api.schemas import GenerateRequest
from app.api.serving import DoneEvent, ErrorEvent, TokenEvent
from app.engine.stream import Stream
from app.errors import RnnserveError

router = APIRouter(tags=["generate"])
log = logging.getLogger(__name__)
AUTH_TIMEOUT = 10.0  # seconds a socket without an Authorization header has to send its auth message
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009


class Connection:
    """One socket: at most one generation at a time; sends are serialised."""

    def __init__(self, ws: WebSocket, svc: Services, owner: str) -> None:
        self.ws = ws
        self.svc = svc
        self.owner = owner
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.stream: Stream | None = None

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def error(self, type_: str, message: str, param: str | None = None) -> None:
        await self.send({"type": "error", **error_body(type_, message, param)})

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, fields: dict[str, Any]) -> None:
        try:
            req = GenerateRequest(**fields)
            job, stream = await serving.start_stream(req, self.svc, self.owner)
        except ValidationError as e:
            message, param = describe_validation_error(dict(e.errors()[0]))
            await self.error("invalid_request_error", message, param)
            return
        except RnnserveError as e:
            await self.error(e.type, e.message, e.param)
            return
        self.stream = stream
        self.task = asyncio.create_task(self.pump(job, stream))

    async def pump(self, job: Job, stream: Stream) -> None:
        async for ev in serving.stream_events(job, stream, self.svc):
            if isinstance(ev, TokenEvent):
                await self.send({"type": "token", "text": ev.text, "index": ev.index})
            elif isinstance(ev, DoneEvent):
                await self.send({"type": "done", **ev.response.model_dump()})
            elif isinstance(ev, ErrorEvent):
                await self.send({"type": "error", **ev.error})

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.abort()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket) -> None:
    """Stream generations over a WebSocket; see the README for the message protocol."""
    await ws.accept()
    svc = get_services(ws)
    owner = await authenticate_socket(ws)
    if owner is None:
        return
    conn = Connection(ws, svc, owner)
    limit = svc.settings.max_ws_message_bytes
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                await conn.error("invalid_request_error", "binary frames are not accepted; send JSON text")
                continue
            if len(text.encode()) > limit:
                await ws.close(MESSAGE_TOO_BIG, f"message over {limit} bytes")
                break
            await handle(conn, text)
    except WebSocketDisconnect:
        pass
    finally:
        await conn.close()


async def authenticate_socket(ws: WebSocket) -> str | None:
    """The owner, from the Authorization header or else a first message {"type": "auth", "api_key": ...}.

    Closes the socket with 1008 (policy violation) and returns None when the key is missing or wrong.
    """
    try:
        if not get_services(ws).settings.api_key_list or "authorization" in ws.headers:
            return authenticate(ws)
        raw = await asyncio.wait_for(ws.receive_text(), timeout=AUTH_TIMEOUT)
        if len(raw.encode()) > get_services(ws).settings.max_ws_message_bytes:
            raise ValueError("auth message too large")
        first = json.loads(raw)
        token = first.get("api_key") if isinstance(first, dict) and first.get("type") == "auth" else None
        return authenticate(ws, str(token or ""))
    except (RnnserveError, ValueError, KeyError, WebSocketDisconnect, TimeoutError) as e:
        reason = e.message if isinstance(e, RnnserveError) else "first message must be {'type': 'auth', 'api_key': ...}"
        with contextlib.suppress(RuntimeError):
            await ws.close(POLICY_VIOLATION, reason[:120])
        return None


async def handle(conn: Connection, text: str) -> None:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError:
        await conn.error("invalid_request_error", "message is not valid JSON")
        return
    if not isinstance(msg, dict):
        await conn.error("invalid_request_error", "message must be a JSON object with a 'type'", "type")
        return
    kind = msg.pop("type", None)
    if kind == "cancel":
        if conn.busy and conn.stream is not None:
            conn.stream.abort()
        else:
            await conn.error("invalid_request_error", "nothing to cancel: no generation is running", "type")
    elif kind == "generate":
        if conn.busy:
            await conn.error("conflict_error", "a generation is already running on this socket; cancel it first")
        else:
            msg.pop("stream", None)  # a socket always streams
            await conn.start(msg)
    else:
        await conn.error("invalid_request_error", "type must be one of 'generate', 'cancel'", "type")
