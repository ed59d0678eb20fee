"""POST /score."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import serving
from app.api.deps import OwnerDep, ServicesDep
from app.api.schemas import ErrorResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["score"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 415, 422, 503)
}


@router.post("/score", response_model=ScoreResponse, responses=ERRORS)
async def score(req: ScoreRequest, svc: ServicesDep, owner: OwnerDep) -> ScoreResponse:
    """Nats/char, bits/char and perplexity of a text under a model (or as a session's continuation)."""
    return await serving.score(req, svc, owner)
