"""Dependency getters: the app-wide services the lifespan created, and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from app.api.ratelimit import RateLimiter
from app.config import Settings
from app.engine.engine import Engine
from app.errors import AuthenticationError, ForbiddenError, OverloadedError
from app.registry import Registry

if TYPE_CHECKING:
    from app.api.reload import Reloader
from app.sessions.store import SessionStore


class KeyLimiter:
    """Generations running at once per API key (no limit without keys: the engine's queue bound applies)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: dict[str, int] = {}

    def acquire(self, owner: str) -> None:
        if not owner:
            return
        n = self.running.get(owner, 0)
        if n >= self.limit:
            raise OverloadedError(f"this key already runs {n} generations, the limit is {self.limit}; retry shortly")
        self.running[owner] = n + 1

    def release(self, owner: str) -> None:
        if not owner:
            return
        n = self.running.get(owner, 0) - 1
        if n > 0:
            self.running[owner] = n
        else:
            self.running.pop(owner, None)


@dataclass
class Services:
    settings: Settings
    registry: Registry
    engine: Engine
    store: SessionStore
    limiter: KeyLimiter
    rate: RateLimiter | None = None
    reloader: Reloader | None = None  # follows the models directory


def get_services(conn: HTTPConnection) -> Services:
    return conn.app.state.services


async def services(conn: HTTPConnection) -> Services:
    """get_services as a dependency: async, so FastAPI calls it in place, not in a worker thread."""
    return get_services(conn)


def owner_of(key: str) -> str:
    """A stable, non-secret name for an API key: sessions belong to it."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def bearer_token(conn: HTTPConnection) -> str:
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def matching_key(token: str, keys: list[str]) -> str:
    """The key equal to `token`, or ""; every key is compared in constant time, so timing does not tell which."""
    matched = ""
    for key in keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            matched = key
    return matched


def authenticate(conn: HTTPConnection, token: str | None = None) -> str:
    """The caller's owner name ("" with authentication off); AuthenticationError without a valid key.

    `token` is taken from the Authorization header unless given. Admin keys are API keys too.
    """
    settings = get_services(conn).settings
    keys = settings.api_key_list
    if not keys:
        return ""
    matched = matching_key((bearer_token(conn) if token is None else token).strip(), keys + settings.admin_key_list)
    if not matched:
        raise AuthenticationError("missing or invalid API key: send 'Authorization: Bearer <key>'")
    return owner_of(matched)


async def require_admin(request: Request) -> str:
    """Only admin keys (RNNSERVE_ADMIN_KEYS) pass; with API keys but no admin keys nobody does (403); with no
    keys at all everybody does (local use). The caller's owner name ("" when open)."""
    settings = get_services(request).settings
    admin = settings.admin_key_list
    if not admin and not settings.api_key_list:
        return ""
    token = bearer_token(request)
    matched = matching_key(token, admin)
    if matched:
        return owner_of(matched)
    if not matching_key(token, settings.api_key_list):
        raise AuthenticationError("missing or invalid admin key: send 'Authorization: Bearer <key>'")
    if not admin:
        raise ForbiddenError("this route is off: API keys are set but no admin keys (RNNSERVE_ADMIN_KEYS)")
    raise ForbiddenError("this route needs an admin key (RNNSERVE_ADMIN_KEYS); an API key is not enough")


async def require_owner(request: Request) -> str:
    """Authenticate the caller and count the request against the rate limit, if one is set."""
    owner = authenticate(request)
    rate = get_services(request).rate
    if rate is not None:
        await rate.hit(owner or f"ip:{request.client.host if request.client else '-'}")
    return owner


ServicesDep = Annotated[Services, Depends(services)]
OwnerDep = Annotated[str, Depends(require_owner)]
AdminDep = Annotated[str, Depends(require_admin)]
