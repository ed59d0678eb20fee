"""Serving: turns a validated API request into an engine request and the result into a response."""

from __future__ import annotations

import math
import secrets

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
from app.config import Settings
from app.engine.engine import Engine
from app.engine.generate import GenerationRequest
from app.engine.sampling import SamplingParams
from app.errors import InvalidRequestError, NotFoundError
from app.registry import Registry


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


async def generate(req: GenerateRequest, registry: Registry, engine: Engine, settings: Settings) -> GenerateResponse:
    ckpt = registry.get(req.model)
    check_limits(req, settings)
    if req.session_id is not None:
        raise NotFoundError(f"session {req.session_id!r} not found", param="session_id")
    vocab = ckpt.vocab
    prompt_ids = vocab.encode(req.prompt, req.unknown_chars, param="prompt")
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    result = await engine.generate(
        ckpt,
        GenerationRequest(
            ids=[vocab.bos, *prompt_ids],
            max_tokens=req.max_tokens,
            params=sampling_params(req),
            seed=seed,
            stop=tuple(req.stop),
            logprobs=req.logprobs,
        ),
    )
    text = vocab.decode(result.ids)
    logprobs = None
    if req.logprobs:
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
        model=ckpt.name,
        text=text,
        finish_reason=result.finish_reason,
        session_id=None,
        seed=seed,
        usage=Usage(
            prompt_chars=len(prompt_ids), completion_chars=len(text), session_chars=len(prompt_ids) + len(text)
        ),
        logprobs=logprobs,
    )


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
