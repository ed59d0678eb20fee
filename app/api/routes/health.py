"""GET /healthz (alive) and GET /readyz (models loaded, store reachable)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep
from app.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(registry: RegistryDep) -> JSONResponse:
    """Ready when at least one model is loaded and the session store answers."""
    ready = Readiness(status="ready" if len(registry) else "not_ready", models=len(registry), store="in-process")
    return JSONResponse(ready.model_dump(), status_code=200 if ready.status == "ready" else 503)
