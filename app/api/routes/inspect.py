"""POST /inspect: inside the model, character by character."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import serving
from app.api.deps import ServicesDep
from app.api.schemas import ErrorResponse, InspectRequest, InspectResponse

router = APIRouter(tags=["inspect"])
ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 415, 422)}


@router.post("/inspect", response_model=InspectResponse, responses=ERRORS)
async def inspect(req: InspectRequest, svc: ServicesDep) -> InspectResponse:
    """Per-character activations of hidden units, the units that track text features, next-character predictions."""
    return await serving.inspect(req, svc)
