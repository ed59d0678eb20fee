"""Session operations of the serving layer: load and check, save after a generation, fork, describe."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

from app.api.tasks import background
from app.checkpoint import Checkpoint
from app.engine.sequence import GenerationResult
from app.engine.stream import Stream
from app.errors import ConflictError, RnnserveError, UnavailableError
from app.nn import State
from app.sessions.record import TAIL_CHARS, SessionRecord, decode_state, encode_state, generator_bytes
from app.sessions.store import gone

if TYPE_CHECKING:
    from app.api.deps import Services
    from app.api.job import Job

log = logging.getLogger(__name__)


def new_id() -> str:
    return "sess-" + secrets.token_urlsafe(24)  # 192 random bits


async def load(svc: Services, session_id: str, owner: str, model: str | None = None) -> SessionRecord:
    """The session, if it exists and belongs to `owner` (another owner's session is 'not found')."""
    record = await svc.store.get(session_id)
    if record is None or not secrets.compare_digest(record.owner, owner):
        raise gone(session_id)
    if model is not None and model != record.model:
        raise ConflictError(
            f"session {session_id} belongs to model {record.model!r}, not {model!r}; omit model or use "
            f"{record.model!r}",
            param="model",
        )
    return record


def check_model(record: SessionRecord, ckpt: Checkpoint) -> None:
    if record.model_sha256 != ckpt.sha256:
        raise ConflictError(
            f"session {record.session_id} was made with another checkpoint of {record.model} "
            f"(sha256 {record.model_sha256[:12]}, now {ckpt.sha256[:12]}); its state no longer applies",
            param="session_id",
        )


def state_of(record: SessionRecord, ckpt: Checkpoint) -> State:
    c = ckpt.model.config
    try:
        return decode_state(record.state, c.arch, c.num_layers, c.hidden_size)
    except ValueError as e:
        raise ConflictError(f"session {record.session_id} holds an unusable state ({e})", "session_id") from None


async def save(job: Job, result: GenerationResult, svc: Services) -> SessionRecord | None:
    """Store the state after this generation (a new session, or the next version of the continued one)."""
    if not job.save or result.state is None:
        await abandon(job, svc)
        return None
    vocab = job.ckpt.vocab
    consumed = job.prompt + vocab.decode(result.consumed)
    now = time.time()
    prev = job.session
    record = SessionRecord(
        session_id=prev.session_id if prev else new_id(),
        owner=job.owner,
        model=job.ckpt.name,
        model_sha256=job.ckpt.sha256,
        state=encode_state(result.state),
        last=vocab.chars[result.pending],
        generator_state=generator_bytes(result.generator_state),
        seed=job.request.seed,
        chars=(prev.chars if prev else 0) + len(consumed),
        tail=((prev.tail if prev else "") + consumed)[-TAIL_CHARS:],
        created_at=prev.created_at if prev else now,
        updated_at=now,
        expires_at=now + job.ttl,
        version=prev.version + 1 if prev else 1,
    )
    if job.lease is None:  # a new session
        await svc.store.create(record)
        return record
    job.lease.stop()
    try:
        await svc.store.commit(record, job.lease.token)
    except UnavailableError:
        background(release_when_back(svc, job.lease.session_id, job.lease.token))
        raise
    return record


async def abandon(job: Job, svc: Services) -> None:
    """Give up the lease of a continued session, leaving it as it was.

    If the store is down, the release is retried in the background until it answers, so the
    session is not left locked for the rest of its lease when the store comes back.
    """
    if job.lease is not None:
        job.lease.stop()
        try:
            await svc.store.release(job.lease.session_id, job.lease.token)
        except UnavailableError:
            background(release_when_back(svc, job.lease.session_id, job.lease.token))
        except RnnserveError as e:
            log.warning("could not release session %s: %s", job.lease.session_id, e.message)


def stop_renewing(job: Job) -> None:
    """However the job ended: a lease that is no longer renewed runs out by itself."""
    if job.lease is not None:
        job.lease.stop()


async def release_when_back(svc: Services, session_id: str, token: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + svc.store.lease_seconds  # after that the lease has run out anyway
    while time.monotonic() < deadline:
        await asyncio.sleep(every)
        try:
            await svc.store.release(session_id, token)
            return
        except UnavailableError:
            continue


async def save_abandoned(job: Job, stream: Stream, svc: Services, handed_out: int) -> None:
    """After the client went away: save the session as of the last of the `handed_out` characters."""
    try:
        await stream.ended()
        result = await stream.result_after(handed_out) if job.save and job.lost is None else None
        if result is None:
            await abandon(job, svc)
            return
        await save(job, result, svc)
    except RnnserveError as e:
        log.warning("could not save the session of an abandoned stream: %s", e.message)
    finally:
        stop_renewing(job)
