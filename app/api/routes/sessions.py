"""GET/DELETE /sessions/{id} and POST /sessions/{id}/fork."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from app.api import sessions
from app.api.deps import OwnerDep, ServicesDep
from app.api.schemas import ErrorResponse, SessionInfo
from app.sessions.record import SessionRecord
from app.sessions.store import gone

router = APIRouter(prefix="/sessions", tags=["sessions"])
ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (401, 404, 503)}


def info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        session_id=record.session_id,
        model=record.model,
        model_sha256=record.model_sha256,
        chars=record.chars,
        tail=record.tail,
        created_at=record.created_at,
        updated_at=record.updated_at,
        expires_at=record.expires_at,
    )


@router.get("/{session_id}", response_model=SessionInfo, responses=ERRORS)
async def get_session(session_id: str, svc: ServicesDep, owner: OwnerDep) -> SessionInfo:
    """Describe a session (no tensors)."""
    return info(await sessions.load(svc, session_id, owner))


@router.delete("/{session_id}", status_code=204, responses=ERRORS)
async def delete_session(session_id: str, svc: ServicesDep, owner: OwnerDep) -> Response:
    """Delete a session."""
    await sessions.load(svc, session_id, owner)
    if not await svc.store.delete(session_id):
        raise gone(session_id)
    return Response(status_code=204)


@router.post("/{session_id}/fork", status_code=201, response_model=SessionInfo, responses=ERRORS)
async def fork_session(session_id: str, svc: ServicesDep, owner: OwnerDep) -> SessionInfo:
    """Copy a session under a new id: the same state, continued independently."""
    record = await sessions.load(svc, session_id, owner)
    now = time.time()
    fork = record.evolve(
        session_id=sessions.new_id(),
        created_at=now,
        updated_at=now,
        expires_at=now + (record.expires_at - record.updated_at),
        version=1,
    )
    await svc.store.create(fork)
    return info(fork)
