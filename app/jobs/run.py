"""One training job, as the worker runs it: corpus from the text, the trainer under a time budget, an atomic publish."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import get_settings
from app.cpus import cpu_budget
from app.jobs.spec import ACTIVE
from app.jobs.store import TrainingStore, empty_progress, thin

if TYPE_CHECKING:
    from app.training.trainer import Trainer

log = logging.getLogger(__name__)

REPORT_SECONDS = 0.5  # progress (and the cancel check) at most this often
EVAL_EVERY = 50  # steps between validation losses on the curve
WARMUP_STEPS = 10  # a short job may run only a few hundred steps


class Cancelled(Exception):
    """The job's record left 'running' (a DELETE): stop training, publish nothing."""


def batch_shape(train_chars: int) -> tuple[int, int]:
    """(batch_size, seq_len) for a training split: at least 16 windows per epoch, so a small text still trains;
    small windows, because a job of minutes on a few cores gains more from many updates than from big batches."""
    seq_len = 64
    return max(1, min(32, train_chars // (seq_len * 16))), seq_len


@dataclass
class Reporter:
    """Writes the trainer's progress into the job's record; raises Cancelled once the job is no longer running."""

    store: TrainingStore
    job_id: str
    trainer: Trainer
    val: float | None = None
    last: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, val: float | None) -> None:
        now = time.monotonic()
        if val is not None:
            self.val = val
        elif now - self.last < REPORT_SECONDS:
            return
        self.last = now
        t = self.trainer
        chars = t.step * t.cfg.batch_size * t.cfg.seq_len
        progress = {
            "step": t.step,
            "chars": chars,
            "train_loss": round(t.smoothed, 4) if t.smoothed is not None else None,
            "val_loss": round(self.val, 4) if self.val is not None else None,
            "elapsed_s": round(t.elapsed, 1),
            "chars_per_s": round(chars / t.elapsed) if t.elapsed > 0 else None,
        }
        point = {k: progress[k] for k in ("step", "elapsed_s", "train_loss")}
        self.curve = thin([*self.curve, {**point, "val_loss": round(val, 4) if val is not None else None}])
        if val is not None:
            log.info("job %s: step %d train %s val %.4f nats/char, %s chars/s", self.job_id, t.step,
                     progress["train_loss"], val, progress["chars_per_s"])  # fmt: skip
        if self.store.progress(self.job_id, progress, self.curve) != "running":
            raise Cancelled


def workspace_of(models_dir: Path, job_id: str) -> Path:
    """Where a job prepares its corpus and checkpoint: hidden from the registry, on the models' filesystem."""
    return models_dir / f".training-{job_id}"


def train_job(job_id: str) -> str:
    """The function the worker runs for a job; its record says how it ended."""
    settings = get_settings()
    assert settings.redis_url, "the worker runs with RNNSERVE_REDIS_URL"
    store = TrainingStore.from_url(settings.redis_url, settings.training_ttl)
    try:
        if store.transition(job_id, "running", ("queued",), started_at=time.time()) != "ok":
            return "skipped"  # cancelled while queued, or already taken
        workspace = workspace_of(settings.models_dir, job_id)
        try:
            metrics = train(store, job_id, workspace)
        except Cancelled:
            log.info("job %s cancelled", job_id)
            return "cancelled"
        except Exception as e:
            log.exception("job %s failed", job_id)
            message = str(e) if isinstance(e, ValueError | RuntimeError) else f"{type(e).__name__}: {e}"
            store.transition(job_id, "failed", (*ACTIVE, "succeeded"), error=message)  # a failed publish too
            return "failed"
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        return "succeeded" if metrics else "cancelled"
    finally:
        store.close()


def train(store: TrainingStore, job_id: str, workspace: Path) -> dict[str, Any] | None:
    """Prepare, train, evaluate and publish; the metrics, or None when cancelled right before publishing."""
    import torch

    from app.checkpoint import publish, update_meta
    from app.training.corpus import prepare_text
    from app.training.evaluate import evaluate_splits
    from app.training.trainer import TrainConfig, Trainer
    from app.vocab import Vocab

    settings = get_settings()
    record = store.get(job_id)
    text = store.text(job_id)
    if record is None or text is None:
        raise RuntimeError("the job's record or text is gone from Redis")
    torch.set_num_threads(settings.training_threads or cpu_budget().count)
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    data = prepare_text(text, record["name"], workspace / "data")
    m = data.manifest
    batch_size, seq_len = batch_shape(m["chars"]["train"])
    cfg = TrainConfig(
        arch=record["arch"], hidden_size=record["hidden_size"], num_layers=record["num_layers"],
        batch_size=batch_size, seq_len=seq_len, warmup_steps=WARMUP_STEPS, max_steps=10**9, eval_every=EVAL_EVERY,
        time_budget_s=record["minutes"] * 60, threads=0,
    )  # fmt: skip
    corpus = {"name": m["name"], "source": m["source"], "works": m["works"], "chars": m["chars"]}
    out = workspace / record["name"]
    trainer = Trainer(cfg, Vocab(m["vocab"]), data.text("train"), data.text("val"), out, workspace / "run", corpus)
    log.info("job %s: %s %s %dx%d, %d parameters, batch %d x %d, %.1f min on %d threads", job_id, record["name"],
             cfg.arch, cfg.num_layers, cfg.hidden_size, trainer.model.num_parameters, batch_size, seq_len,
             record["minutes"], torch.get_num_threads())  # fmt: skip
    reporter = Reporter(store, job_id, trainer)
    store.progress(job_id, empty_progress(), [])
    trainer.train(progress=False, on_step=reporter)
    metrics = evaluate_splits(out, data)
    update_meta(out, metrics=metrics, owner=record["owner"], training_job=job_id)
    dest = get_settings().models_dir / record["name"]
    if dest.exists() and not record["overwrite"]:
        raise RuntimeError(f"model {record['name']!r} appeared while training; ask again with overwrite: true")
    if store.transition(job_id, "succeeded", ("running",), metrics=metrics) != "ok":
        return None
    publish(out, dest)
    log.info("job %s: published %s (%s)", job_id, dest, metrics)
    return metrics
