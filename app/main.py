"""The ASGI app: create_app() wires settings, lifespan (registry, store, engine), routers and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI

from app import __version__, logs
from app.api.deps import Services, require_owner
from app.api.errors import register_exception_handlers
from app.api.middleware import BodySizeLimit, RequestContext
from app.api.routes import generate, health, models, openai, score, sessions, ws
from app.config import Settings, get_settings
from app.engine.engine import Engine
from app.registry import Registry
from app.sessions.store import InMemoryStore, MeteredStore, SessionStore

log = logging.getLogger("app")


def make_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        from app.sessions.redis_store import RedisStore

        return MeteredStore(RedisStore(settings.redis_url, cluster=settings.redis_cluster))
    return MeteredStore(InMemoryStore(settings.max_sessions))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        registry = Registry.load(settings.models_dir, settings.default_model)
        store = make_store(settings)
        engine = Engine(settings.max_batch, settings.max_queue, naive=settings.engine == "naive")
        engine.start(registry.models)
        app.state.services = Services(settings, registry, engine, store)
        log.info("serving %d model(s), default %s, sessions %s", len(registry), registry.default, store.kind)
        try:
            yield
        finally:
            await engine.stop()
            await store.close()

    app = FastAPI(
        title="rnnserve",
        version=__version__,
        description="Character-level RNN, LSTM and GRU language models over HTTP.",
        lifespan=lifespan,
    )
    register_exception_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext)
    authed = [Depends(require_owner)]
    for module in (generate, score, sessions, models, openai):
        app.include_router(module.router, dependencies=authed)
    app.include_router(ws.router)  # authenticates at connect
    app.include_router(health.router)
    return app


app = create_app()
