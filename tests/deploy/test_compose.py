"""docker-compose.yml: valid under the Compose Specification, and the topology the spec asks for."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from app.config import Settings
from tests.deploy.conftest import ROOT

SCHEMA = Path(__file__).with_name("compose-spec.json")  # origin and license: compose-spec.NOTICE


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_is_valid_under_the_compose_spec(compose: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(compose)]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("services", "api", "deploy"), {"replica": 2}),  # a typo: unknown key
        (("services", "api", "depends_on", "redis"), {"condition": "service_ready"}),
        (("services", "redis", "healthcheck"), {"test": ["CMD", "redis-cli", "ping"], "intervall": "5s"}),
    ],
)
def test_schema_rejects_broken_variants(compose: dict[str, Any], path: tuple[str, ...], bad: object) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    assert list(validator().iter_errors(broken)), f"{path} = {bad!r} passed the schema"


def test_redis_persists_to_a_named_volume_and_is_health_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, target = redis["volumes"][0].split(":")
    assert target == "/data" and volume in compose["volumes"]  # named, not a bind mount
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_two_api_replicas_wait_for_a_healthy_redis(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["build"] == "."
    assert api["deploy"]["replicas"] == 2
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in api  # replicas can't share a host port: only the balancer publishes one
    assert "8000" in [str(p) for p in api["expose"]]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])


def test_api_settings_come_from_env_file_with_the_compose_redis(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert [e["path"] for e in api["env_file"]] == [".env"]
    assert api["env_file"][0]["required"] is False  # `docker compose up` works before `cp .env.example .env`
    url = api["environment"]["RNNSERVE_REDIS_URL"]
    default = re.fullmatch(r"\$\{RNNSERVE_REDIS_URL:-(.+)\}", url)
    assert default and default[1] == "redis://redis:6379/0"


def test_every_rnnserve_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"RNNSERVE_{name.upper()}" for name in Settings.model_fields}
    for service in compose["services"].values():
        for name in service.get("environment", {}):
            assert not name.startswith("RNNSERVE_") or name in fields, name


def test_load_balancer_publishes_8000_with_the_nginx_conf(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    assert lb["image"].startswith("nginx:")
    assert "8000:8000" in lb["ports"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert (ROOT / "deploy" / "nginx.conf").is_file()
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in lb


def test_every_service_restarts_and_is_health_checked(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_replicas_get_time_to_drain_on_stop(compose: dict[str, Any]) -> None:
    grace = compose["services"]["api"]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace)[1])  # type: ignore[index]
    assert seconds > Settings.model_fields["shutdown_grace_seconds"].default


def test_each_replica_has_a_cpu_quota_that_can_be_changed(compose: dict[str, Any]) -> None:
    cpus = compose["services"]["api"]["deploy"]["resources"]["limits"]["cpus"]
    default = re.fullmatch(r"\$\{API_CPUS:-([\d.]+)\}", cpus)
    assert default and float(default[1]) > 0  # the server sizes its thread pools from this quota
    assert "API_CPUS" in (ROOT / "docker-compose.yml").read_text().split("cpus:")[0]  # the comment says how
