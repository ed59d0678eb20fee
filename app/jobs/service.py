"""The API's side of training jobs: submit, look up, list, cancel and follow, over the records and queue in Redis.

Without RNNSERVE_REDIS_URL the first use starts a private redis-server (no persistence) and one
worker child process: jobs then live as long as the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import redis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from app.config import Settings
from app.errors import ConflictError, NotFoundError, OverloadedError, UnavailableError
from app.jobs.spec import ACTIVE, FINAL, Limits, TrainingSpec
from app.jobs.store import TrainingStore
from app.jobs.worker import JOB_FUNCTION, queue, terminate_on_parent_exit
from app.procs import stop

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often an event stream reads its job's record
JOB_OVERHEAD_S = 600  # a job's time limit beyond its training minutes: corpus, evaluations, publishing


class LocalBackend:
    """A private redis-server on a free port and one `rnnserve worker` child, for a server without Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = Path(tempfile.mkdtemp(prefix="rnnserve-trainings-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise UnavailableError("training jobs need RNNSERVE_REDIS_URL, or redis-server installed for a local queue")
        args = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--loglevel", "warning"]  # fmt: skip
        self.redis = self._spawn(args, "redis.log")
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise UnavailableError("the local redis-server for training jobs did not start") from None
                time.sleep(0.05)
            finally:
                client.close()
        env = {**os.environ, "RNNSERVE_REDIS_URL": self.url, "RNNSERVE_MODELS_DIR": str(settings.models_dir.resolve()),
               "RNNSERVE_TRAINING_TTL": str(settings.training_ttl),
               "RNNSERVE_TRAINING_THREADS": str(settings.training_threads)}  # fmt: skip
        root = str(Path(__file__).resolve().parents[2])  # where `app` is, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.env = env
        self.worker = self._spawn([sys.executable, "-m", "app.cli", "worker"], "worker.log", env)
        log.info("training jobs: local redis %s, worker pid %d (log %s)", self.url, self.worker.pid, self.dir)

    def revive(self) -> None:
        """Start the worker again if it died (its job, if any, was reported failed)."""
        if self.worker.poll() is not None:
            log.warning("the training worker exited with %s; starting another", self.worker.returncode)
            self.worker = self._spawn([sys.executable, "-m", "app.cli", "worker"], "worker.log", self.env)

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.dir / log_name).open("ab") as out:
            return subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=terminate_on_parent_exit
            )

    def close(self) -> None:
        for proc in (getattr(self, "worker", None), self.redis):
            if proc is not None:
                stop(proc, timeout=10)  # the worker stops its running job at once
        shutil.rmtree(self.dir, ignore_errors=True)


def model_owner(models_dir: Path, name: str) -> str | None:
    """Who may overwrite models/NAME: the key that trained it ("" for a model made without keys, or
    shipped); None when there is no such model."""
    directory = models_dir / name
    if not directory.exists():
        return None
    try:
        meta = json.loads((directory / "meta.json").read_text())
        return str(meta.get("owner", "")) if isinstance(meta, dict) else ""
    except (OSError, ValueError):
        return ""


class Trainings:
    """Training jobs as the API sees them; each caller sees only the jobs of its own key."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits.of(settings)
        self.local: LocalBackend | None = None
        self.store: TrainingStore | None = None
        self.connection: redis.Redis | None = None
        self.lock = asyncio.Lock()

    async def _ready(self) -> TrainingStore:
        if self.store is not None:
            return self.store
        async with self.lock:
            if self.store is None:
                url = self.settings.redis_url
                if url is None:
                    self.local = await asyncio.to_thread(LocalBackend, self.settings)
                    url = self.local.url
                self.connection = redis.Redis.from_url(url, socket_timeout=10)
                self.store = TrainingStore.from_url(url, self.settings.training_ttl)
        return self.store

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except redis.RedisError as e:
            raise UnavailableError(f"the training queue's Redis is unreachable ({type(e).__name__}); retry") from None

    async def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.connection is not None:
            self.connection.close()
        if self.local is not None:
            await asyncio.to_thread(self.local.close)

    async def submit(self, spec: TrainingSpec, text: str, owner: str) -> dict[str, Any]:
        spec.check(self.limits, text)
        store = await self._ready()
        if self.local is not None:
            self.local.revive()
        active = [r for r in await self._call(store.recent) if r["status"] in ACTIVE]
        mine = [r for r in active if r["owner"] == owner]
        if any(r["name"] == spec.name for r in active):
            raise ConflictError(f"name: a job training {spec.name!r} is already queued or running", param="name")
        if len(mine) >= self.limits.per_key:
            raise OverloadedError(
                f"this key has {len(mine)} training jobs queued or running; the limit is {self.limits.per_key} "
                "(RNNSERVE_MAX_TRAININGS_PER_KEY)",
                retry_after=30,
            )
        current = model_owner(self.settings.models_dir, spec.name)
        if current is not None and not spec.overwrite:
            raise ConflictError(
                f"name: model {spec.name!r} exists; choose another name or send overwrite: true", param="name"
            )
        if current is not None and current != owner:
            raise ConflictError(
                f"name: model {spec.name!r} belongs to another key or ships with the service; choose another name",
                param="name",
            )
        job_id = "tr-" + secrets.token_hex(12)
        request = {
            "id": job_id, "name": spec.name, "owner": owner, "arch": spec.arch,
            "hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "minutes": spec.minutes,
            "overwrite": spec.overwrite, "text_chars": len(text), "created_at": time.time(),
        }  # fmt: skip
        record = await self._call(store.create, request, text)
        assert self.connection is not None
        timeout = int(spec.minutes * 60 * 2) + JOB_OVERHEAD_S
        try:
            await self._call(
                queue(self.connection).enqueue, JOB_FUNCTION, job_id, job_id=job_id,
                job_timeout=timeout, result_ttl=3600, failure_ttl=self.settings.training_ttl,
            )  # fmt: skip
        except UnavailableError:
            with contextlib.suppress(redis.RedisError):  # a record never queued must not stay 'queued'
                store.transition(job_id, "failed", ("queued",), error="the job could not be queued")
            raise
        log.info("training job %s queued: %s %s %dx%d, %g min", job_id, spec.name, spec.arch,
                 spec.num_layers, spec.hidden_size, spec.minutes)  # fmt: skip
        return record

    async def get(self, job_id: str, owner: str) -> dict[str, Any]:
        store = await self._ready()
        record = await self._call(store.get, job_id)
        if record is None or record["owner"] != owner:
            raise NotFoundError(f"training job {job_id!r} not found", param="id")
        return record

    async def list(self, owner: str) -> list[dict[str, Any]]:
        store = await self._ready()
        return [r for r in await self._call(store.recent) if r["owner"] == owner]

    async def cancel(self, job_id: str, owner: str) -> dict[str, Any]:
        """Cancel a queued or running job: a running one's process is stopped within a second or two."""
        record = await self.get(job_id, owner)
        store = self.store
        assert store is not None and self.connection is not None
        outcome = await self._call(store.transition, job_id, "cancelled", ACTIVE)
        if outcome != "ok":
            raise ConflictError(f"training job {job_id!r} has already {outcome}; nothing to cancel", param="id")
        await self._call(self._stop, job_id, record["status"])
        return await self.get(job_id, owner)

    def _stop(self, job_id: str, status: str) -> None:
        assert self.connection is not None
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            job = Job.fetch(job_id, connection=self.connection, serializer=queue(self.connection).serializer)
            if job.get_status() in ("queued", "scheduled", "deferred"):
                job.cancel()
            else:
                # the work horse is killed; it also stops by itself at its next progress write
                send_stop_job_command(self.connection, job_id, serializer=queue(self.connection).serializer)

    async def events(self, job_id: str, owner: str) -> AsyncGenerator[tuple[str, dict[str, Any]] | None]:
        """('progress', record) whenever the record changes, then ('done', record) at a final status;
        None every keep-alive interval without a change."""
        record = await self.get(job_id, owner)
        last, quiet = None, 0.0
        while True:
            if record["status"] in FINAL:
                yield "done", record
                return
            if record != last:
                yield "progress", record
                last, quiet = record, 0.0
            elif quiet >= self.settings.sse_keepalive_seconds:
                yield None
                quiet = 0.0
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            record = await self.get(job_id, owner)
