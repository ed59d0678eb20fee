"""POST /generate (JSON or Server-Sent Events)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api import serving
from app.api.deps import OwnerDep, ServicesDep
from app.api.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from app.api.sse import event_stream, frame

router = APIRouter(tags=["generate"])
RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream=true token/done events"},
    **{code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)},
}


@router.post("/generate", response_model=GenerateResponse, responses=RESPONSES)
async def generate(req: GenerateRequest, svc: ServicesDep, owner: OwnerDep) -> GenerateResponse | StreamingResponse:
    """Generate text with the chosen decoding strategy, as JSON or as a token stream."""
    if not req.stream:
        return await serving.generate(req, svc, owner)
    job, stream = await serving.start_stream(req, svc, owner)
    events = serving.stream_events(job, stream, svc, keepalive=svc.settings.sse_keepalive_seconds)
    return event_stream(frame(events))
