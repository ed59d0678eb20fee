"""Maps every error to the one JSON shape {"error": {"type", "message", "param"}} and its status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RnnserveError,
    UnavailableError,
)

log = logging.getLogger(__name__)

STATUS: dict[type[RnnserveError], int] = {
    InvalidRequestError: 422,
    AuthenticationError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    ConflictError: 409,
    PayloadTooLargeError: 413,
    OverloadedError: 429,
    UnavailableError: 503,
}
HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              405: "invalid_request_error", 413: "payload_too_large_error", 415: "invalid_request_error"}  # fmt: skip


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param}}


def status_of(exc: RnnserveError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


def rnnserve_error_response(exc: RnnserveError) -> JSONResponse:
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc.type, exc.message, exc.param), status_code=status_of(exc), headers=headers)


def describe_validation_error(err: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) for one pydantic error: the message names the field and the allowed values."""
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    ctx = err.get("ctx") or {}
    param = ctx.get("param") or (".".join(loc) if loc else None)
    msg = err.get("msg", "invalid value")
    return (f"{param}: {msg}" if param and not msg.startswith(param) else msg), param


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def content_type_message(content_type: str | None) -> str:
    # curl's -d without -H sends application/x-www-form-urlencoded: the body is then never read as JSON
    sent = f"not '{content_type.split(';', 1)[0].strip()}'" if content_type else "none was sent"
    return (
        f"request body must be JSON sent with the header 'Content-Type: application/json' ({sent}; "
        "curl: -H 'content-type: application/json')"
    )


def register_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(RnnserveError)
    async def _domain(request: Request, exc: RnnserveError) -> JSONResponse:
        return rnnserve_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        from app.api.deps import authenticate

        try:  # the body is parsed before the auth dependency runs: a caller without a key learns nothing
            authenticate(request)
        except AuthenticationError as e:
            return rnnserve_error_response(e)
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return JSONResponse(error_body("invalid_request_error", "request body is not valid JSON"), 400)
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and "param" not in (errors[0].get("ctx") or {}):
            content_type = request.headers.get("content-type")
            if content_type is None or not is_json(content_type):
                return JSONResponse(error_body("invalid_request_error", content_type_message(content_type)), 415)
            return JSONResponse(error_body("invalid_request_error", "request body must be a JSON object"), 400)
        message, param = describe_validation_error(errors[0]) if errors else ("invalid request", None)
        return JSONResponse(error_body("invalid_request_error", message, param), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error")
        return JSONResponse(error_body(type_, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
