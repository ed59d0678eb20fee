"""ASGI middleware: request ids, access logs and metrics; the request body size limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.errors import error_body
from app.logs import request_id

log = logging.getLogger("app.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answers 413 when a request body (declared or as received) exceeds `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self.reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self.reject(send)

    async def reject(self, send: Send) -> None:
        body = json.dumps(
            error_body("payload_too_large_error", f"request body is over the limit of {self.limit} bytes")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Gives each request an id (a valid X-Request-ID is kept), returns it, logs and counts the request.

    The access log holds method, route, status and duration: never a prompt.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
                route = scope.get("route")
                metrics.REQUEST_SECONDS.labels(getattr(route, "path", "unmatched")).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # a response never started means the error middleware outside answers 500 (a socket: 101)
            status = status or (101 if scope["type"] == "websocket" else 500)
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "WS")
            metrics.REQUESTS.labels(method, route, str(status)).inc()
            ms = round((time.perf_counter() - start) * 1000, 1)
            fields = {"request_id": rid, "method": method, "route": route, "status": status, "duration_ms": ms}
            log.info("%s %s %s", method, route, status, extra={"fields": fields})
            request_id.reset(token)
