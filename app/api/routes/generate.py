"""POST /generate."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import serving
from app.api.deps import EngineDep, RegistryDep, SettingsDep
from app.api.schemas import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 422, 429)}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)  # type: ignore[arg-type]
async def generate(
    req: GenerateRequest, registry: RegistryDep, engine: EngineDep, settings: SettingsDep
) -> GenerateResponse:
    """Generate text from a model with the chosen decoding strategy."""
    return await serving.generate(req, registry, engine, settings)
