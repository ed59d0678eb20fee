"""The job records in Redis: status changes are compare-and-set, progress is written only while running."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.errors import InvalidRequestError, PayloadTooLargeError
from app.jobs.spec import Limits, TrainingSpec
from app.jobs.store import CURVE_POINTS, TrainingStore, thin
from tests.conftest import RedisServer

LIMITS = Limits.of(Settings(max_training_text_bytes=100, max_training_minutes=5, max_training_hidden_size=64,
                            max_training_layers=2))  # fmt: skip


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[TrainingStore]:
    s = TrainingStore.from_url(redis_server.url.rsplit("/", 1)[0] + "/7", ttl=60)
    try:
        yield s
    finally:
        s.close()


def new_job(store: TrainingStore, owner: str = "") -> str:
    job_id = "tr-" + secrets.token_hex(6)
    store.create({"id": job_id, "name": "m", "owner": owner, "created_at": time.time()}, "some text")
    return job_id


def test_a_cancelled_job_cannot_start_running_nor_succeed(store: TrainingStore) -> None:
    job = new_job(store)
    assert store.transition(job, "cancelled", ("queued", "running")) == "ok"
    assert store.transition(job, "running", ("queued",)) == "cancelled"
    assert store.transition(job, "succeeded", ("running",)) == "cancelled"
    record = store.get(job)
    assert record is not None and record["status"] == "cancelled" and record["finished_at"] is not None


def test_a_final_status_drops_the_text_and_sets_an_expiry(store: TrainingStore) -> None:
    job = new_job(store)
    assert store.text(job) == "some text"
    assert store.transition(job, "running", ("queued",), started_at=time.time()) == "ok"
    assert store.transition(job, "failed", ("running",), error="no luck") == "ok"
    assert store.text(job) is None
    assert 0 < store.r.ttl("rnnserve:training:" + job) <= 60
    record = store.get(job)
    assert record is not None and record["error"] == "no luck" and record["started_at"] is not None


def test_progress_is_kept_only_while_running_and_tells_the_worker_to_stop(store: TrainingStore) -> None:
    job = new_job(store)
    point = {"step": 1, "chars": 10, "train_loss": 3.0, "val_loss": None, "elapsed_s": 0.1, "chars_per_s": 100}
    assert store.progress(job, point, []) == "queued"
    store.transition(job, "running", ("queued",))
    assert store.progress(job, point, [{"step": 1}]) == "running"
    store.transition(job, "cancelled", ("running",))
    assert store.progress(job, {**point, "step": 2}, []) == "cancelled"
    record = store.get(job)
    assert record is not None and record["progress"]["step"] == 1 and record["curve"] == [{"step": 1}]
    assert store.progress("tr-missing", point, []) == ""


def test_the_list_is_newest_first_and_forgets_expired_jobs(store: TrainingStore) -> None:
    first, second = new_job(store), new_job(store)
    ids = [r["id"] for r in store.recent()]
    assert ids.index(second) < ids.index(first)
    store.r.delete("rnnserve:training:" + first)
    assert first not in [r["id"] for r in store.recent()]
    assert store.r.zscore("rnnserve:trainings", first) is None


def test_a_long_curve_is_thinned_keeping_its_ends() -> None:
    curve = [{"step": i} for i in range(CURVE_POINTS + 1)]
    thinned = thin(curve)
    assert len(thinned) <= CURVE_POINTS // 2 + 2
    assert thinned[0] == {"step": 0} and thinned[-1] == {"step": CURVE_POINTS}


def spec(name: str = "ok", **fields: object) -> TrainingSpec:
    return TrainingSpec(name, **{"hidden_size": 32, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("job", "text", "param"),
    [
        (spec("../up"), "text", "name"),
        (spec(".hidden"), "text", "name"),
        (spec("a/b"), "text", "name"),
        (spec("ok", arch="transformer"), "text", "arch"),
        (spec("ok", hidden_size=65), "text", "hidden_size"),
        (spec("ok", hidden_size=4), "text", "hidden_size"),
        (spec("ok", num_layers=3), "text", "num_layers"),
        (spec("ok", minutes=5.5), "text", "minutes"),
        (spec("ok", minutes=0), "text", "minutes"),
        (spec("ok"), "   \n", "text"),
    ],
)
def test_a_spec_outside_the_limits_names_its_field(job: TrainingSpec, text: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        job.check(LIMITS, text)
    assert e.value.param == param and e.value.message.startswith(param)


def test_a_text_over_the_limit_is_too_large() -> None:
    with pytest.raises(PayloadTooLargeError) as e:
        spec().check(LIMITS, "é" * 51)  # 102 bytes
    assert e.value.param == "text" and "100" in e.value.message
    TrainingSpec("ok", hidden_size=64, num_layers=2, minutes=5).check(LIMITS, "é" * 50)
