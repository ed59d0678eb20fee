"""POST /score."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import serving
from app.api.deps import EngineDep, RegistryDep, SettingsDep
from app.api.schemas import ErrorResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["score"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 422, 429)}


@router.post("/score", response_model=ScoreResponse, responses=ERRORS)  # type: ignore[arg-type]
async def score(req: ScoreRequest, registry: RegistryDep, engine: EngineDep, settings: SettingsDep) -> ScoreResponse:
    """Nats/char, bits/char and perplexity of a text under a model."""
    return await serving.score(req, registry, engine, settings)
