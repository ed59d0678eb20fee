"""OpenAI-compatible POST /v1/completions and GET /v1/models (chat completions answered with a pointer to them)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from app.api import serving
from app.api.deps import OwnerDep, ServicesDep
from app.api.schemas import MAX_SEED, ErrorResponse, GenerateRequest, GenerateResponse, StopString
from app.api.serving import DoneEvent, ErrorEvent, TokenEvent
from app.api.sse import event_stream, sse
from app.errors import NotFoundError

router = APIRouter(prefix="/v1", tags=["openai"])


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completions request that a character model can honour."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., max_length=128)
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2, description="0: greedy (argmax).")
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=1, description="Only 1.")
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=8)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = Field(False, description="Only false.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1.")
    presence_penalty: float | None = Field(0.0, ge=0, le=0, description="Only 0.")
    frequency_penalty: float | None = Field(0.0, ge=0, le=0, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise PydanticCustomError("one_prompt", "prompt: exactly one prompt is supported", {"param": "prompt"})
        if self.echo:
            raise PydanticCustomError("no_echo", "echo: only false is supported", {"param": "echo"})
        return self

    def to_generate(self) -> GenerateRequest:
        fields: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt[0] if isinstance(self.prompt, list) else self.prompt,
            "max_tokens": self.max_tokens or 16,
            "seed": self.seed,
            "logprobs": self.logprobs or 0,
            "stop": [self.stop] if isinstance(self.stop, str) else (self.stop or []),
            "save_session": False,
        }
        if self.temperature == 0:
            fields["strategy"] = "greedy"
        else:
            fields.update(strategy="sample", temperature=self.temperature or 1.0, top_p=self.top_p or 1.0)
        return GenerateRequest(**fields)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: Literal["length", "stop"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rnnserve"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def usage_of(r: GenerateResponse) -> CompletionUsage:
    u = r.usage
    return CompletionUsage(
        prompt_tokens=u.prompt_chars,
        completion_tokens=u.completion_chars,
        total_tokens=u.prompt_chars + u.completion_chars,
    )


def openai_logprobs(r: GenerateResponse) -> dict[str, Any] | None:
    if r.logprobs is None:
        return None
    offset = r.usage.prompt_chars
    return {
        "tokens": [lp.text for lp in r.logprobs],
        "token_logprobs": [lp.logprob for lp in r.logprobs],
        "top_logprobs": [{t.text: t.logprob for t in lp.top_logprobs} for lp in r.logprobs],
        "text_offset": [offset + i for i in range(len(r.logprobs))],
    }


def finish_reason(r: GenerateResponse) -> Literal["length", "stop"]:
    return "stop" if r.finish_reason == "stop" else "length"


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with stream=true"},
        **{code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 429, 503)},
    },
)
async def completions(req: CompletionRequest, svc: ServicesDep, owner: OwnerDep) -> Completion | StreamingResponse:
    """OpenAI-compatible text completion (temperature 0 is greedy)."""
    greq = req.to_generate()
    cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if not req.stream:
        r = await serving.generate(greq, svc, owner)
        choice = CompletionChoice(text=r.text, index=0, logprobs=openai_logprobs(r), finish_reason=finish_reason(r))
        return Completion(id=cid, created=created, model=r.model, choices=[choice], usage=usage_of(r))
    job, stream = await serving.start_stream(greq, svc, owner)
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def chunks() -> AsyncIterator[str]:
        def chunk(text: str, reason: str | None, usage: CompletionUsage | None = None) -> str:
            choices = [] if usage else [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]
            body = {"id": cid, "object": "text_completion", "created": created, "model": job.ckpt.name}
            return sse(None, {**body, "choices": choices, **({"usage": usage.model_dump()} if usage else {})})

        async for ev in serving.stream_events(job, stream, svc):
            if isinstance(ev, TokenEvent):
                yield chunk(ev.text, None)
            elif isinstance(ev, DoneEvent):
                yield chunk("", finish_reason(ev.response))
                if include_usage:
                    yield chunk("", None, usage_of(ev.response))
            elif isinstance(ev, ErrorEvent):
                yield sse(None, json.dumps(ev.error))
        yield sse(None, "[DONE]")

    return event_stream(chunks())


CHAT_UNSUPPORTED = (
    "/v1/chat/completions is not supported: the models continue raw text one character at a time and know no "
    "roles or chat template; use /v1/completions (client.completions.create) with the text to continue as the prompt"
)


@router.post("/chat/completions", responses={code: {"model": ErrorResponse} for code in (401, 404)})
async def chat_completions() -> None:
    """Not supported (always 404): a character model has no chat template; use /v1/completions."""
    raise NotFoundError(CHAT_UNSUPPORTED)


@router.get("/models", response_model=OpenAIModelList)
async def list_models(svc: ServicesDep) -> OpenAIModelList:
    """OpenAI-compatible model list."""
    return OpenAIModelList(data=[OpenAIModel(id=name, created=0) for name in svc.registry.models])
