"""GET /models and GET /models/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServicesDep
from app.api.schemas import ErrorResponse, ModelDetail, ModelInfo, ModelList
from app.checkpoint import Checkpoint

router = APIRouter(tags=["models"])


def model_info(ckpt: Checkpoint) -> dict[str, object]:
    c = ckpt.model.config
    metrics = ckpt.meta.get("metrics", {})
    return {
        "name": ckpt.name,
        "arch": c.arch,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "parameters": ckpt.model.num_parameters,
        "corpus": ckpt.meta.get("corpus", {}).get("name"),
        "val_nats_per_char": metrics.get("val_nats_per_char"),
        "test_nats_per_char": metrics.get("test_nats_per_char"),
        "sha256": ckpt.sha256,
    }


@router.get("/models", response_model=ModelList)
async def list_models(svc: ServicesDep) -> ModelList:
    """List the loaded models and the default."""
    registry = svc.registry
    return ModelList(default=registry.default, models=[ModelInfo(**model_info(c)) for c in registry.models.values()])


@router.get("/models/{name}", response_model=ModelDetail, responses={404: {"model": ErrorResponse}})
async def get_model(name: str, svc: ServicesDep) -> ModelDetail:
    """Describe one model, with its vocabulary."""
    ckpt = svc.registry.get(name)
    return ModelDetail(**model_info(ckpt), vocab=ckpt.vocab.chars)
