"""POST /admin/models/reload: rescan the models directory now (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from app.api.deps import ServicesDep, require_admin
from app.api.schemas import ErrorResponse
from app.errors import UnavailableError

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (401, 403, 503)}


class RefusedModel(BaseModel):
    name: str
    reason: str = Field(description="Why the checkpoint was not loaded; a version already served stays.")


class ReloadResponse(BaseModel):
    added: list[str] = Field(description="Models now served that were not before.")
    replaced: list[str] = Field(description="Models whose new weights (a new sha256) now serve new requests.")
    removed: list[str] = Field(description="Models gone from the directory: new requests get 404.")
    refused: list[RefusedModel] = Field(description="Checkpoints that failed to load, with the reason.")
    models: list[str] = Field(description="The models served after the reload.")
    default: str | None


@router.post("/models/reload", response_model=ReloadResponse, responses=ERRORS)
async def reload_models(svc: ServicesDep) -> ReloadResponse:
    """Rescan the models directory: load new checkpoints, swap replaced ones, drain removed ones."""
    if svc.reloader is None:
        raise UnavailableError("the models directory is not followed by this server")
    report = await svc.reloader.reload(retry_refused=True)
    return ReloadResponse(
        added=report.added,
        replaced=report.replaced,
        removed=report.removed,
        refused=[RefusedModel(name=n, reason=r) for n, r in report.refused.items()],
        models=list(svc.registry.models),
        default=svc.registry.default,
    )
