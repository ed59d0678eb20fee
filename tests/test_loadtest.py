"""`rnnserve loadtest`, briefly, over tiny models: every scenario meets its expectations, the faults included."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from app.cli import build_parser, main
from app.config import Settings
from app.tools.loadtest import SCENARIOS, Booked
from tests.api.conftest import write_tiny_models
from tests.conftest import require_redis_server
from tests.deploy.conftest import require_nginx

LEASE = 2  # seconds: a dead replica's sessions are free again soon
README = "# x\n\n## Operations\n\n### Fault and load\n\n<!-- loadtest:start -->\nold\n<!-- loadtest:end -->\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short `rnnserve loadtest` (3 s per scenario, few clients): its exit code, output, JSON and README."""
    require_redis_server()
    require_nginx()  # the replica scenario runs `rnnserve cluster`
    tmp = tmp_path_factory.mktemp("loadtest")
    write_tiny_models(tmp / "models")
    (tmp / "README.md").write_text(README)
    argv = ["loadtest", "--models-dir", str(tmp / "models"), "--model", "tiny-lstm", "--seconds", "3",
            "--clients", "4", "--storm-streams", "60", "--storm-wave", "20", "--contention-clients", "8",
            "--contention-sessions", "2", "--deadline", "20", "--sessions-deadline", "20",
            "--out", str(tmp / "out.json"), "--docs", str(tmp / "README.md")]  # fmt: skip
    out = io.StringIO()
    code: int | str | None = 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("RNNSERVE_TORCH_THREADS", "1")  # a small machine, shared
        mp.setenv("RNNSERVE_LEASE_SECONDS", str(LEASE))
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    return {
        "code": code,
        "stdout": out.getvalue(),
        "json": json.loads((tmp / "out.json").read_text()),
        "readme": (tmp / "README.md").read_text(),
    }


def scenario(run: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in run["json"]["scenarios"] if s["name"] == name)
    return found


def test_report_has_one_row_per_scenario(run: dict[str, Any]) -> None:
    rows = [line for line in run["stdout"].splitlines() if line.startswith("| ") and not line.startswith("| scenario")]
    assert [r.split("|")[1].strip() for r in rows] == list(SCENARIOS)
    assert [s["name"] for s in run["json"]["scenarios"]] == list(SCENARIOS)
    section = run["readme"].split("<!-- loadtest:start -->")[1].split("<!-- loadtest:end -->")[0]
    assert "old" not in section and all(f"| {name} |" in section for name in SCENARIOS)
    # the exit code says whether every expectation held
    assert (run["code"] in (0, None)) == run["json"]["passed"]


def test_steady_load_has_no_errors_and_loses_nothing(run: dict[str, Any]) -> None:
    s = scenario(run, "steady")
    assert s["failures"] == [], (s["failures"], s["notes"])
    assert set(s["statuses"]) == {"200"} and s["hung"] == 0 and s["transport_errors"] == {}
    assert s["requests"] > 20 and s["chars"] > 0 and s["ttfc_ms"] is not None
    assert s["sessions_checked"] == 4 and s["lost"] == []


def test_disconnect_storm_frees_every_slot_and_the_memory(run: dict[str, Any]) -> None:
    s = scenario(run, "storm")
    assert s["failures"] == [], (s["failures"], s["notes"])
    n = s["notes"]
    assert n["streams"] == 60 and n["active_after"] == 0
    assert n["rss_after_mb"] <= n["rss_before_mb"] + n["rss_allowance_mb"]


def test_redis_outage_answers_503_then_recovers(run: dict[str, Any]) -> None:
    s = scenario(run, "redis")
    assert s["failures"] == [], (s["failures"], s["notes"])
    assert set(s["statuses"]) <= {"200", "409", "503"} and s["hung"] == 0
    assert s["statuses"].get("503", 0) > 0, "the outage was not noticed"
    assert s["notes"]["stateless_503"] == 0 and s["notes"]["recovered_s"] is not None
    assert s["lost"] == []


def test_contended_sessions_add_up_exactly(run: dict[str, Any]) -> None:
    s = scenario(run, "contention")
    assert s["failures"] == [], (s["failures"], s["notes"])
    assert set(s["statuses"]) <= {"200", "409"}
    assert s["notes"]["accepted"] > 0 and s["notes"]["conflicts"] > 0
    assert s["sessions_checked"] == 2 and s["lost"] == []


def test_a_killed_replica_comes_back_while_nginx_answers_nearly_everything(run: dict[str, Any]) -> None:
    s = scenario(run, "replica")
    n = s["notes"]
    assert [f for f in s["failures"] if "sessions could not be continued" not in f] == [], (s["failures"], n)
    assert n["restarts"] == 1 and n["replica_back_s"] is not None and n["replica_back_s"] < 60
    assert n["window_requests"] >= 10 and n["window_answered"] >= 0.99, n
    assert sum(n["failed_in_window"].values()) <= n["window_requests"] * 0.01
    assert sum(n["in_flight_failed"].values()) <= min(n["in_flight_at_fault"], 4)  # at most one per client
    assert n["sessions_held"] >= 1  # the kill broke continuations that were running on the replica
    assert s["lost"] == [] and s["sessions_checked"] >= 4 + n["sessions_held"]


@pytest.mark.xfail(
    "lease_seconds" not in Settings.model_fields,
    reason="a continuation's lease is renewed, and expires within seconds, only with RNNSERVE_LEASE_SECONDS",
    strict=True,
)
def test_sessions_of_a_killed_replica_are_continued_again_within_three_leases(run: dict[str, Any]) -> None:
    s = scenario(run, "replica")
    assert s["failures"] == [], (s["failures"], s["notes"])
    assert s["notes"]["sessions_freed_s"] <= 3 * LEASE + 5


def test_a_redis_cluster_master_killed_under_load_fails_over(run: dict[str, Any]) -> None:
    s = scenario(run, "redis-cluster")
    n = s["notes"]
    assert s["failures"] == [], (s["failures"], n)
    assert set(s["statuses"]) <= {"200", "409", "503"} and s["hung"] == 0
    assert n["failover_s"] is not None and n["sessions_served_s"] is not None and n["stateless_failed"] == 0
    assert n["probed_sessions"] == 8 and s["sessions_checked"] >= 8


def test_booked_session_allows_only_the_unsure_deltas() -> None:
    b = Booked(100)
    assert b.allows(100) and not b.allows(99) and not b.allows(101)
    b.unsure += [(24, 24), (24, 24)]  # two 503s whose commit may have landed
    assert all(b.allows(c) for c in (100, 124, 148)) and not b.allows(125) and not b.allows(172)
    b.unsure.append((0, 5))  # a stream that broke after up to 5 characters
    assert b.allows(129) and b.allows(105) and not b.allows(130)


def test_cli_options_reach_the_config() -> None:
    args = build_parser().parse_args(["loadtest"])
    assert (args.seconds, args.clients, args.storm_streams, args.model) == (20.0, 16, 300, "shakespeare-lstm")
    assert args.scenarios.split(",") == list(SCENARIOS)
