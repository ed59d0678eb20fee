"""Serving: turns a validated API request into an engine request and the result into a response."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from app.api import sessions
from app.api.errors import error_body
from app.api.job import Job
from app.api.schemas import (
    CharLogprob,
    CharScore,
    GenerateRequest,
    GenerateResponse,
    InspectRequest,
    InspectResponse,
    ScoreRequest,
    ScoreResponse,
    TopChar,
    TopLogprob,
    UnitCorrelation,
    Usage,
)
from app.api.tasks import background
from app.config import Settings
from app.engine.sampling import SamplingParams
from app.engine.sequence import GenerationRequest, GenerationResult
from app.engine.stream import Stream
from app.errors import InvalidRequestError, RnnserveError, UnavailableError
from app.sessions.lease import Lease
from app.sessions.record import generator_tensor

if TYPE_CHECKING:
    from app.api.deps import Services

log = logging.getLogger(__name__)


def check_text_limit(text: str, settings: Settings, param: str) -> None:
    if len(text) > settings.max_prompt_chars:
        raise InvalidRequestError(
            f"{param}: {len(text)} characters is over the limit of {settings.max_prompt_chars}", param=param
        )


def check_limits(req: GenerateRequest, settings: Settings) -> None:
    check_text_limit(req.prompt, settings, "prompt")
    if req.max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens: must be in 1..{settings.max_tokens_limit}, got {req.max_tokens}", param="max_tokens"
        )


def session_ttl(requested: int | None, settings: Settings) -> int:
    if requested is None:
        return settings.session_ttl
    if requested > settings.max_session_ttl:
        raise InvalidRequestError(
            f"session_ttl: must be in 1..{settings.max_session_ttl} seconds, got {requested}", param="session_ttl"
        )
    return requested


def sampling_params(req: GenerateRequest) -> SamplingParams:
    return SamplingParams(
        strategy=req.strategy,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        min_p=req.min_p,
        beam_width=req.beam_width,
    )


@dataclass(frozen=True)
class TokenEvent:
    text: str
    index: int  # position of the first character of `text` in the generated text


@dataclass(frozen=True)
class DoneEvent:
    response: GenerateResponse


@dataclass(frozen=True)
class ErrorEvent:
    error: dict[str, Any]


StreamEvent = TokenEvent | DoneEvent | ErrorEvent


async def prepare(req: GenerateRequest, svc: Services, owner: str) -> Job:
    """Everything that can be refused before the first byte: model, limits, vocabulary, session."""
    check_limits(req, svc.settings)
    ttl = session_ttl(req.session_ttl, svc.settings)
    if req.session_id is None:
        ckpt = svc.registry.get(req.model)
        prompt_ids = ckpt.vocab.encode(req.prompt, req.unknown_chars, param="prompt")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        request = make_request(req, [ckpt.vocab.bos, *prompt_ids], seed)
        return Job(ckpt, request, ckpt.vocab.decode(prompt_ids), req.save_session, owner, ttl)

    record = await sessions.load(svc, req.session_id, owner, req.model)
    ckpt = svc.registry.get(record.model)
    prompt_ids = ckpt.vocab.encode(req.prompt, req.unknown_chars, param="prompt")
    token = secrets.token_hex(16)
    try:
        record = await svc.store.acquire(record.session_id, token)
    except UnavailableError:
        # the store may have granted the lease before the reply was lost: give it back once it answers
        background(sessions.release_when_back(svc, record.session_id, token))
        raise
    lease = Lease(svc.store, record.session_id, token)
    lease.start()
    try:
        sessions.check_model(record, ckpt)
        state = sessions.state_of(record, ckpt)
        # without a seed the sampler goes on where it stopped; with one it is reseeded
        seed = req.seed if req.seed is not None else record.seed
        request = make_request(req, [ckpt.vocab.stoi[record.last], *prompt_ids], seed)
        if req.seed is None:
            request = replace(request, generator_state=generator_tensor(record.generator_state))
    except BaseException:
        lease.stop()
        await svc.store.release(record.session_id, token)
        raise
    return Job(ckpt, request, ckpt.vocab.decode(prompt_ids), req.save_session, owner, ttl, record, lease, state)


def make_request(req: GenerateRequest, ids: list[int], seed: int) -> GenerationRequest:
    return GenerationRequest(
        ids=ids,
        max_tokens=req.max_tokens,
        params=sampling_params(req),
        seed=seed,
        stop=tuple(req.stop),
        logprobs=req.logprobs,
    )


async def finish(job: Job, result: GenerationResult, svc: Services) -> GenerateResponse:
    """Save (or release) the session, then build the response."""
    if job.lost is not None:
        raise job.lost
    vocab = job.ckpt.vocab
    text = vocab.decode(result.ids)
    try:
        session = await sessions.save(job, result, svc)
    finally:
        sessions.stop_renewing(job)
    logprobs = None
    if job.request.logprobs:
        logprobs = [
            CharLogprob(
                text=vocab.chars[lp.id],
                logprob=lp.logprob,
                top_logprobs=[TopLogprob(text=vocab.chars[i], logprob=v) for i, v in lp.top],
            )
            for lp in result.logprobs
        ]
    before = job.session.chars if job.session else 0
    prompt_chars = len(job.prompt)
    return GenerateResponse(
        id=f"gen-{secrets.token_hex(12)}",
        model=job.ckpt.name,
        text=text,
        finish_reason=result.finish_reason,
        session_id=session.session_id if session else None,
        seed=job.request.seed,
        usage=Usage(
            prompt_chars=prompt_chars,
            completion_chars=len(text),
            session_chars=session.chars if session else before + prompt_chars + len(result.consumed),
        ),
        logprobs=logprobs,
    )


async def generate(req: GenerateRequest, svc: Services, owner: str) -> GenerateResponse:
    job, stream = await start_stream(req, svc, owner)
    try:
        while True:
            item = await stream.next()
            if isinstance(item, GenerationResult):
                return await finish(job, item, svc)
    finally:
        if not stream.delivered:
            stream.abort()
            background(sessions.save_abandoned(job, stream, svc, 0))


async def start_stream(req: GenerateRequest, svc: Services, owner: str) -> tuple[Job, Stream]:
    """Validate and admit a streamed generation; raises before anything is sent."""
    job = await prepare(req, svc, owner)
    try:
        svc.limiter.acquire(owner)
    except BaseException:
        await sessions.abandon(job, svc)
        raise
    try:
        stream = svc.engine.submit(job.ckpt, job.request, job.state)
    except BaseException:
        svc.limiter.release(owner)
        await sessions.abandon(job, svc)
        raise
    stream.when_done(lambda: svc.limiter.release(owner))
    if job.lease is not None:
        job.lease.on_lost = stream.abort  # a generation that lost its session stops at the next step
    return job, stream


async def stream_events(
    job: Job, stream: Stream, svc: Services, keepalive: float | None = None
) -> AsyncIterator[StreamEvent | None]:
    """Token events, then one done (or error) event; None every `keepalive` seconds of silence.

    If the consumer stops early (a client that went away) the generation is aborted and its
    session saved at the last character handed out.
    """
    index = 0
    done = False
    try:
        while True:
            item = await stream.next(timeout=keepalive)
            if item is None:
                yield None
            elif isinstance(item, str):
                yield TokenEvent(item, index)
                index += len(item)
            else:
                response = await finish(job, item, svc)
                done = True
                yield DoneEvent(response)
                return
    except RnnserveError as e:
        yield ErrorEvent(error_body(e.type, e.message, e.param))
    except Exception:
        log.exception("stream of model %s failed", job.ckpt.name)
        yield ErrorEvent(error_body("internal_error", "internal server error"))
    finally:
        if not done:
            # `index` counts what the consumer took: it asks for the next event only after sending one
            stream.abort()
            background(sessions.save_abandoned(job, stream, svc, index))


async def score(req: ScoreRequest, svc: Services, owner: str) -> ScoreResponse:
    """Score a text from a fresh state, or as the continuation of a session (which is left unchanged)."""
    check_text_limit(req.text, svc.settings, "text")
    state, record = None, None
    if req.session_id is not None:
        record = await sessions.load(svc, req.session_id, owner, req.model)
    ckpt = svc.registry.get(record.model if record else req.model)
    if record is not None:
        sessions.check_model(record, ckpt)
        state = sessions.state_of(record, ckpt)
    vocab = ckpt.vocab
    ids = vocab.encode(req.text, req.unknown_chars, param="text")
    if not ids:
        raise InvalidRequestError("text: must contain at least one character of the model's vocabulary", "text")
    first = vocab.stoi[record.last] if record else vocab.bos
    logprobs = await svc.engine.score(ckpt, [first, *ids], state)
    nats = -sum(logprobs) / len(logprobs)
    per_char = [CharScore(text=vocab.chars[i], logprob=lp) for i, lp in zip(ids, logprobs, strict=True)]
    return ScoreResponse(
        model=ckpt.name,
        chars=len(ids),
        nats_per_char=nats,
        bits_per_char=nats / math.log(2),
        perplexity=math.exp(nats),
        per_char=per_char if req.per_char else None,
    )


async def inspect(req: InspectRequest, svc: Services) -> InspectResponse:
    """Per-character activations of a layer's units and the model's next-character predictions."""
    ckpt = svc.registry.get(req.model)
    cfg = ckpt.model.config
    layer = cfg.num_layers - 1 if req.layer is None else req.layer
    if layer >= cfg.num_layers:
        raise InvalidRequestError(f"layer: must be in 0..{cfg.num_layers - 1} for model {ckpt.name}", "layer")
    if req.state == "c" and cfg.arch != "lstm":
        raise InvalidRequestError(f"state: 'c' (the cell state) is lstm-only, {ckpt.name} is {cfg.arch}", "state")
    units = req.units
    if units is not None:
        if max(units) >= cfg.hidden_size:
            raise InvalidRequestError(f"units: each must be in 0..{cfg.hidden_size - 1} for {ckpt.name}", "units")
        if len(set(units)) != len(units):
            raise InvalidRequestError("units: each unit at most once", "units")
    ids = ckpt.vocab.encode(req.text, req.unknown_chars, param="text")
    if not ids:
        raise InvalidRequestError("text: must contain at least one character of the model's vocabulary", "text")
    text = ckpt.vocab.decode(ids)
    trace = await svc.engine.inspect(ckpt, [ckpt.vocab.bos, *ids], text, layer, req.state, units, req.top)
    chars = ckpt.vocab.chars
    return InspectResponse(
        model=ckpt.name,
        arch=cfg.arch,
        layer=layer,
        state=req.state,
        hidden_size=cfg.hidden_size,
        text=text,
        units=trace.units,
        activations=trace.activations,
        top=[[TopChar(char=chars[i], prob=p) for i, p in row] for row in trace.top],
        features={f: [UnitCorrelation(unit=u, r=r) for u, r in pairs] for f, pairs in trace.features.items()},
    )
