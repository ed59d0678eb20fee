"""The ASGI app: create_app() wires settings, lifespan (registry, engine), routers and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from app import __version__
from app.api.errors import register_exception_handlers
from app.api.middleware import BodySizeLimit
from app.api.routes import generate, health, models, score, ws
from app.config import Settings, get_settings
from app.engine.engine import Engine
from app.registry import Registry

log = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        app.state.settings = settings
        app.state.registry = Registry.load(settings.models_dir, settings.default_model)
        app.state.engine = engine = Engine(settings.max_batch, settings.max_queue)
        engine.start(app.state.registry.models)
        log.info("serving %d model(s), default %s", len(app.state.registry), app.state.registry.default)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        title="rnnserve",
        version=__version__,
        description="Character-level RNN, LSTM and GRU language models over HTTP.",
        lifespan=lifespan,
    )
    register_exception_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    for module in (generate, ws, score, models, health):
        app.include_router(module.router)
    return app


app = create_app()
