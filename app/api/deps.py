"""Dependency getters: the app-wide services the lifespan created, and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from app.config import Settings
from app.engine.engine import Engine
from app.errors import AuthenticationError
from app.registry import Registry
from app.sessions.store import SessionStore


@dataclass
class Services:
    settings: Settings
    registry: Registry
    engine: Engine
    store: SessionStore


def get_services(conn: HTTPConnection) -> Services:
    return conn.app.state.services


def owner_of(key: str) -> str:
    """A stable, non-secret name for an API key: sessions belong to it."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(conn: HTTPConnection, token: str | None = None) -> str:
    """The caller's owner name ("" with authentication off); AuthenticationError without a valid key.

    `token` is taken from the Authorization header unless given. Keys are compared in constant time.
    """
    keys = get_services(conn).settings.api_key_list
    if not keys:
        return ""
    if token is None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
    matched = ""
    for key in keys:  # every key is compared, so timing does not tell which matched
        if hmac.compare_digest(token.strip().encode(), key.encode()):
            matched = key
    if not matched:
        raise AuthenticationError("missing or invalid API key: send 'Authorization: Bearer <key>'")
    return owner_of(matched)


def require_owner(request: Request) -> str:
    return authenticate(request)


ServicesDep = Annotated[Services, Depends(get_services)]
OwnerDep = Annotated[str, Depends(require_owner)]
