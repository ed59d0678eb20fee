"""GET /healthz, GET /readyz and GET /metrics: open without a key (probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ServicesDep
from app.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready when at least one model is loaded and the session store answers."""
    store_ok = await svc.store.ping()
    ready = len(svc.registry) > 0 and store_ok
    body = Readiness(
        status="ready" if ready else "not_ready", models=len(svc.registry), store=svc.store.kind, store_ok=store_ok
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
