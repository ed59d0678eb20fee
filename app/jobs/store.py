"""The training jobs' records in Redis: one hash per job (its request, status, progress and text), and an index.

Every replica answers GET from these records; the worker writes progress into them; status
changes are compare-and-set, so a cancel and the worker's own transitions never overwrite each other.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from app.jobs.spec import FINAL

PREFIX = "rnnserve:training:"
INDEX = "rnnserve:trainings"  # job ids scored by creation time
INDEX_SIZE = 1000  # records kept in the index (a job's hash expires on its own once finished)
CURVE_POINTS = 200  # loss-curve points kept per job (thinned by half when full)

# KEYS[1] job; ARGV: new status, allowed current statuses (comma-separated), ttl (0: keep), field/value pairs.
# Returns 'ok' when the status changed, else the current status ('' for no such job).
TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return '' end
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if cur == allowed then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 4))
    if ARGV[3] ~= '0' then
      redis.call('HDEL', KEYS[1], 'text')
      redis.call('EXPIRE', KEYS[1], ARGV[3])
    end
    return 'ok'
  end
end
return cur
"""
# KEYS[1] job; ARGV: progress JSON, curve JSON. Written only while running; returns the status.
PROGRESS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if cur ~= 'running' then return cur or '' end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'curve', ARGV[2])
return cur
"""
FIELDS = ("request", "status", "progress", "curve", "error", "started_at", "finished_at", "metrics")


def key(job_id: str) -> str:
    return PREFIX + job_id


def empty_progress() -> dict[str, Any]:
    return {"step": 0, "chars": 0, "train_loss": None, "val_loss": None, "elapsed_s": 0.0, "chars_per_s": None}


def thin(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every other point once the curve is full, keeping the last: a long run stays a bounded record."""
    if len(curve) <= CURVE_POINTS:
        return curve
    return [*curve[:-1:2], curve[-1]]


class TrainingStore:
    """Synchronous (the worker is); the API calls it from a thread."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.r = client
        self.ttl = ttl
        self._transition = client.register_script(TRANSITION)
        self._progress = client.register_script(PROGRESS)

    @classmethod
    def from_url(cls, url: str, ttl: int) -> TrainingStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=10), ttl)

    def close(self) -> None:
        self.r.close()

    def create(self, request: dict[str, Any], text: str) -> dict[str, Any]:
        """Store a queued job; `request` holds its id, owner, name and settings."""
        fields: dict[Any, Any] = {
            "request": json.dumps(request),
            "status": "queued",
            "progress": json.dumps(empty_progress()),
            "curve": "[]",
            "text": text,
        }
        pipe = self.r.pipeline()
        pipe.hset(key(request["id"]), mapping=fields)
        pipe.zadd(INDEX, {request["id"]: request["created_at"]})
        pipe.zremrangebyrank(INDEX, 0, -INDEX_SIZE - 1)
        pipe.execute()
        record = self.get(request["id"])
        assert record is not None
        return record

    def get(self, job_id: str) -> dict[str, Any] | None:
        values = self.r.hmget(key(job_id), FIELDS)
        return decode(dict(zip(FIELDS, values, strict=True)))

    def text(self, job_id: str) -> str | None:
        value = self.r.hget(key(job_id), "text")
        return value if isinstance(value, str) else None

    def recent(self, limit: int = INDEX_SIZE) -> list[dict[str, Any]]:
        """The jobs, newest first; ids whose record expired are dropped from the index."""
        ids = [str(i) for i in self.r.zrevrange(INDEX, 0, limit - 1)]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hmget(key(job_id), FIELDS)
        records: list[dict[str, Any]] = []
        gone: list[str] = []
        for job_id, values in zip(ids, pipe.execute(), strict=True):
            record = decode(dict(zip(FIELDS, values, strict=True)))
            if record is None:
                gone.append(job_id)
            else:
                records.append(record)
        if gone:
            self.r.zrem(INDEX, *gone)
        return records

    def transition(self, job_id: str, status: str, allowed: tuple[str, ...], **fields: Any) -> str:
        """Set `status` (and fields) if the current status is one of `allowed`: 'ok', else the current status.

        A final status drops the text and starts the record's expiry.
        """
        if status in FINAL:
            fields.setdefault("finished_at", time.time())
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, value if isinstance(value, str) else json.dumps(value)]
        ttl = self.ttl if status in FINAL else 0
        result = self._transition(keys=[key(job_id)], args=[status, ",".join(allowed), ttl, *pairs])
        return str(result)

    def progress(self, job_id: str, progress: dict[str, Any], curve: list[dict[str, Any]]) -> str:
        """Record progress while the job runs; returns its status (anything but 'running': stop)."""
        return str(self._progress(keys=[key(job_id)], args=[json.dumps(progress), json.dumps(curve)]))


def decode(values: dict[str, Any]) -> dict[str, Any] | None:
    """A job's record as the API shows it (no text, no owner-free copy: the caller filters by owner)."""
    if values.get("request") is None:
        return None
    record: dict[str, Any] = json.loads(values["request"])
    record["status"] = values["status"]
    record["progress"] = json.loads(values["progress"] or "null") or empty_progress()
    record["curve"] = json.loads(values["curve"] or "[]")
    record["error"] = values["error"]
    record["metrics"] = json.loads(values["metrics"]) if values["metrics"] else None
    for name in ("started_at", "finished_at"):
        record[name] = float(values[name]) if values[name] else None
    return record
