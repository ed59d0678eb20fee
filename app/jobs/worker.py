"""`rnnserve worker`: an RQ worker that runs training jobs, each in a forked process of its own.

RQ because each job runs in a forked work horse: cancelling a running job is killing that
process (the training loop need not cooperate), and a crashed job never takes the worker down.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from app.config import Settings
from app.jobs.run import workspace_of
from app.jobs.store import TrainingStore

log = logging.getLogger(__name__)

QUEUE = "rnnserve-trainings"
JOB_FUNCTION = "app.jobs.run.train_job"


def queue(connection: redis.Redis) -> Queue:
    return Queue(QUEUE, connection=connection, serializer=JSONSerializer)


class TrainingWorker(Worker):
    """A worker whose SIGTERM stops the running job at once (RQ's default waits for it: minutes of training),
    and which removes a job's workspace however its process ended (a cancel kills it)."""

    models_dir: Path = Path("models")
    stopping = False  # a SIGTERM or SIGINT came: the job's end is the worker's doing

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            super().execute_job(job, queue)
        finally:
            shutil.rmtree(workspace_of(self.models_dir, job.id), ignore_errors=True)

    def subscribe(self) -> None:
        # RQ's own subscribe, but its listener wakes every second (RQ's waits up to 60 s in one read, and its
        # unsubscribe at shutdown can wait that long for it)
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        # RQ's warm shutdown, then the job's process killed (a syscall: no Redis call that could deadlock
        # in a signal handler); the work loop sees the process end and the shutdown request, and returns
        self.stopping = True
        super().request_stop(signum, frame)
        if self.horse_pid:
            self.kill_horse()


def run(settings: Settings) -> None:
    """Take jobs from the queue until SIGTERM or SIGINT."""
    if not settings.redis_url:
        raise SystemExit("rnnserve worker: set RNNSERVE_REDIS_URL to the Redis that holds the training queue")
    connection = redis.Redis.from_url(settings.redis_url)
    store = TrainingStore.from_url(settings.redis_url, settings.training_ttl)

    def horse_died(job: Any, pid: int, status: int, rusage: Any) -> None:
        if worker.stopping:
            error = "the worker stopped during training"
        else:
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {status}"
            error = f"the training process ended unexpectedly ({how})"
        log.error("job %s: %s", job.id, error)
        store.transition(job.id, "failed", ("running",), error=error)

    worker = TrainingWorker(
        [queue(connection)], connection=connection, serializer=JSONSerializer, work_horse_killed_handler=horse_died
    )
    worker.models_dir = settings.models_dir
    log.info("worker %s: models to %s, queue %s", worker.name, settings.models_dir, QUEUE)
    try:
        worker.work(with_scheduler=False, logging_level=settings.log_level.upper())
    finally:
        job_id = worker.get_current_job_id()
        if job_id:  # taken down with the worker
            store.transition(job_id, "failed", ("running",), error="the worker stopped during training")
        store.close()
        connection.close()


def terminate_on_parent_exit() -> None:
    """preexec_fn of a child process: SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
