"""The ASGI app: create_app() wires settings, lifespan (registry, store, engine), routers and error handlers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app import __version__, logs, metrics
from app.api.deps import KeyLimiter, Services, require_owner
from app.api.errors import register_exception_handlers
from app.api.middleware import BodySizeLimit, RequestContext
from app.api.ratelimit import RateLimiter
from app.api.reload import Reloader
from app.api.routes import admin, generate, health, inspect, models, openai, playground, score, sessions, trainings, ws
from app.api.schemas import ErrorResponse
from app.config import Settings, get_settings
from app.cpus import cpu_budget
from app.engine.compute import Compute
from app.engine.engine import Engine
from app.jobs.service import Trainings
from app.registry import Registry
from app.sessions.store import InMemoryStore, MeteredStore, SessionStore

log = logging.getLogger("app")


def make_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        from app.sessions.redis_store import RedisStore

        redis = RedisStore(settings.redis_url, cluster=settings.redis_cluster, lease_seconds=settings.lease_seconds)
        return MeteredStore(redis)
    return MeteredStore(InMemoryStore(settings.max_sessions, lease_seconds=settings.lease_seconds))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        budget = cpu_budget()
        threads = settings.torch_threads or budget.count
        torch.set_num_threads(threads)  # and ONNX Runtime's pools, which the engine sizes to torch's
        metrics.CPU_BUDGET.labels(budget.source).set(budget.count)
        log.info("cpu budget %d (%s): %d thread(s) per kernel", budget.count, budget.source, threads)
        compute = Compute()  # every torch call of the process runs on this one thread
        registry = await compute.run(Registry.load, settings.models_dir, settings.default_model)
        store = make_store(settings)
        engine = Engine(settings.engine_config(), compute)
        await engine.start(registry.models)
        rate = None
        if settings.rate_limit_per_minute:
            rate = RateLimiter(settings.rate_limit_per_minute, settings.redis_url, cluster=settings.redis_cluster)
        limiter = KeyLimiter(settings.max_running_per_key)
        reloader = Reloader(registry, engine, settings.models_poll_seconds)
        app.state.services = Services(settings, registry, engine, store, limiter, rate, reloader)
        reloader.start()
        app.state.trainings = Trainings(settings)  # Redis and a local worker are reached at first use
        log.info("serving %d model(s), default %s, sessions %s", len(registry), registry.default, store.kind)
        try:
            yield
        finally:
            await app.state.trainings.close()
            await reloader.stop()
            await engine.stop()
            await store.close()
            if rate is not None:
                await rate.close()

    app = FastAPI(
        title="rnnserve",
        version=__version__,
        description="Character-level RNN, LSTM and GRU language models over HTTP.",
        lifespan=lifespan,
    )
    register_exception_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext)
    if settings.cors_origins:
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    authed = [Depends(require_owner)]
    auth_errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 429)}
    for module in (generate, score, inspect, sessions, models, openai):
        app.include_router(module.router, dependencies=authed, responses=auth_errors)
    app.include_router(ws.router)  # authenticates at connect
    app.include_router(admin.router)  # admin keys only, when keys are set
    app.include_router(trainings.router)  # admin keys only, when keys are set
    app.include_router(health.router)
    app.include_router(playground.router)  # the page is open; what it calls needs a key
    app.mount("/static", StaticFiles(directory=playground.STATIC), name="static")
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains the engine: no new generations, running ones get a grace period.

    uvicorn then waits for the open responses (which the drain ends), runs the lifespan's shutdown
    (sessions saved, Redis closed) and exits 0.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(app.state, "services", None)
        if services is not None and not self.should_exit:
            grace = services.settings.shutdown_grace_seconds
            log.info("signal %d: draining for %.0fs", sig, grace)
            asyncio.get_running_loop().call_soon_threadsafe(services.engine.drain, grace)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises a captured signal after shutting down; a drained SIGTERM exits 0
            self._captured_signals.remove(sig)


def serve(host: str, port: int, log_level: str) -> None:
    settings = get_settings()
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, ws_max_size=settings.max_ws_message_bytes
    )
    GracefulServer(config).run()


app = create_app()
