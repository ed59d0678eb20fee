"""Serving: turns a validated API request into an engine request and the result into a response."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from app.api.errors import error_body
from app.api.schemas import (
    CharLogprob,
    CharScore,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    TopLogprob,
    Usage,
)
from app.checkpoint import Checkpoint
from app.config import Settings
from app.engine.engine import Engine, Stream
from app.engine.sampling import SamplingParams
from app.engine.sequence import GenerationRequest, GenerationResult
from app.errors import InvalidRequestError, NotFoundError, RnnserveError
from app.registry import Registry

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


def sampling_params(req: GenerateRequest) -> SamplingParams:
    return SamplingParams(
        strategy=req.strategy,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        min_p=req.min_p,
        beam_width=req.beam_width,
    )


@dataclass
class Job:
    """A validated generation, ready for the engine."""

    ckpt: Checkpoint
    request: GenerationRequest
    prompt_chars: int


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


def prepare(req: GenerateRequest, registry: Registry, settings: Settings) -> Job:
    """Everything that can be refused before the first byte: model, limits, vocabulary, session."""
    ckpt = registry.get(req.model)
    check_limits(req, settings)
    if req.session_id is not None:
        raise NotFoundError(f"session {req.session_id!r} not found", param="session_id")
    vocab = ckpt.vocab
    prompt_ids = vocab.encode(req.prompt, req.unknown_chars, param="prompt")
    request = GenerationRequest(
        ids=[vocab.bos, *prompt_ids],
        max_tokens=req.max_tokens,
        params=sampling_params(req),
        seed=req.seed if req.seed is not None else secrets.randbits(63),
        stop=tuple(req.stop),
        logprobs=req.logprobs,
    )
    return Job(ckpt, request, len(prompt_ids))


async def finish(job: Job, result: GenerationResult) -> GenerateResponse:
    vocab = job.ckpt.vocab
    text = vocab.decode(result.ids)
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
    return GenerateResponse(
        id=f"gen-{secrets.token_hex(12)}",
        model=job.ckpt.name,
        text=text,
        finish_reason=result.finish_reason,
        session_id=None,
        seed=job.request.seed,
        usage=Usage(
            prompt_chars=job.prompt_chars,
            completion_chars=len(text),
            session_chars=job.prompt_chars + len(text),
        ),
        logprobs=logprobs,
    )


async def generate(req: GenerateRequest, registry: Registry, engine: Engine, settings: Settings) -> GenerateResponse:
    job = prepare(req, registry, settings)
    return await finish(job, await engine.generate(job.ckpt, job.request))


def start_stream(req: GenerateRequest, registry: Registry, engine: Engine, settings: Settings) -> tuple[Job, Stream]:
    """Validate and admit a streamed generation; raises before anything is sent."""
    job = prepare(req, registry, settings)
    return job, engine[job.ckpt].submit(job.request)


async def stream_events(job: Job, stream: Stream, keepalive: float | None = None) -> AsyncIterator[StreamEvent | None]:
    """Token events, then one done (or error) event; None every `keepalive` seconds of silence.

    The generation is aborted if the consumer stops early (a client that went away).
    """
    index = 0
    try:
        while True:
            item = await stream.next(timeout=keepalive)
            if item is None:
                yield None
            elif isinstance(item, str):
                yield TokenEvent(item, index)
                index += len(item)
            else:
                yield DoneEvent(await finish(job, item))
                return
    except StopAsyncIteration:
        return
    except RnnserveError as e:
        yield ErrorEvent(error_body(e.type, e.message, e.param))
    except Exception:
        log.exception("stream of model %s failed", job.ckpt.name)
        yield ErrorEvent(error_body("internal_error", "internal server error"))
    finally:
        stream.abort()


async def score(req: ScoreRequest, registry: Registry, engine: Engine, settings: Settings) -> ScoreResponse:
    ckpt = registry.get(req.model)
    check_text_limit(req.text, settings, "text")
    if req.session_id is not None:
        raise NotFoundError(f"session {req.session_id!r} not found", param="session_id")
    vocab = ckpt.vocab
    ids = vocab.encode(req.text, req.unknown_chars, param="text")
    if not ids:
        raise InvalidRequestError("text: must contain at least one character of the model's vocabulary", "text")
    logprobs = await engine.score(ckpt, [vocab.bos, *ids])
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
