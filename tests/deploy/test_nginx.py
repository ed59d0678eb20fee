"""deploy/nginx.conf: valid nginx, round robin over the replicas, retries only of what no replica received,
SSE and WebSocket unbuffered, the body limit."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import crossplane
import httpx
import pytest

from app.config import Settings
from app.tools.cluster import NGINX_CONF, accepts, free_ports, nginx_child, render_nginx_conf, wait_until
from tests.deploy.conftest import require_nginx

Directive = dict[str, Any]


def parse(path: Path) -> list[Directive]:
    """The parsed file; fails on unknown directives, a directive out of its context or with bad arguments."""
    loose = crossplane.parse(str(path), single=True)
    strict = crossplane.parse(str(path), single=True, strict=True)
    assert loose["status"] == "ok", loose["errors"]
    # crossplane reads a map's entries as directives: those lines are exempt from strict checks
    map_lines = set()
    for d in walk(loose["config"][0]["parsed"]):
        if d["directive"] == "map":
            entries = list(walk(d["block"]))
            map_lines |= set(range(d["line"], max((e["line"] for e in entries), default=d["line"]) + 1))
    errors = [e["error"] for e in strict["errors"] if e["line"] not in map_lines]
    assert errors == []
    return loose["config"][0]["parsed"]  # type: ignore[no-any-return]


def walk(block: list[Directive]) -> list[Directive]:
    out = []
    for d in block:
        out.append(d)
        out.extend(walk(d.get("block", [])))
    return out


def find(block: list[Directive], name: str, *args: str) -> Directive:
    found = [d for d in block if d["directive"] == name and d["args"][: len(args)] == list(args)]
    assert len(found) == 1, f"{name} {args}: {len(found)} found"
    return found[0]


def values(block: list[Directive], name: str) -> list[list[str]]:
    return [d["args"] for d in block if d["directive"] == name]


@pytest.fixture(scope="module")
def http() -> list[Directive]:
    return find(parse(NGINX_CONF), "http")["block"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(http: list[Directive]) -> list[Directive]:
    return find(http, "server")["block"]  # type: ignore[no-any-return]


def seconds(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "ms": 0}[unit]


def test_parser_catches_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "nginx.conf"
    bad.write_text("events {}\nhttp { server { proxy_bufering off; } }\n")
    with pytest.raises(AssertionError, match="proxy_bufering"):
        parse(bad)


def test_upstream_is_the_api_service_on_8000(
    http: list[Directive], server: list[Directive], compose: dict[str, Any]
) -> None:
    upstream = find(http, "upstream", "api")["block"]
    [server_args] = values(upstream, "server")
    assert server_args[:2] == ["api:8000", "resolve"]
    assert values(upstream, "zone")  # `resolve` needs the shared zone
    assert values(http, "resolver")[0][0] == "127.0.0.11"  # Docker's embedded DNS
    assert values(server, "listen") == [["8000"]]
    assert "8000:8000" in compose["services"]["lb"]["ports"]  # published as it listens


def test_a_failed_replica_is_marked_down_briefly(http: list[Directive]) -> None:
    [server_args] = values(find(http, "upstream", "api")["block"], "server")
    params = dict(arg.split("=", 1) for arg in server_args[2:])
    assert int(params["max_fails"]) >= 1
    assert 1 <= seconds(params["fail_timeout"]) <= 30  # long enough to skip a dead one, short for one restarted


def test_undelivered_requests_go_to_the_next_replica_and_nothing_is_resent(server: list[Directive]) -> None:
    for path in ("/", "/ws/"):
        location = find(server, "location", path)["block"]
        [retry] = values(location, "proxy_next_upstream")
        # connect errors and timeouts move on; a POST already sent never does (no non_idempotent), and
        # no http_5xx: a replica's own answer is the client's answer
        assert set(retry) == {"error", "timeout"}, path
        assert seconds(values(location, "proxy_connect_timeout")[0][0]) <= 10, path


def test_every_location_streams_unbuffered_with_long_timeouts(server: list[Directive]) -> None:
    for path in ("/", "/ws/"):
        location = find(server, "location", path)["block"]
        assert values(location, "proxy_pass") == [["http://api"]], path
        assert values(location, "proxy_http_version") == [["1.1"]], path
        assert values(location, "proxy_buffering") == [["off"]], path
        assert seconds(values(location, "proxy_read_timeout")[0][0]) >= 3600, path
        headers = {args[0].lower(): args[1] for args in values(location, "proxy_set_header")}
        # a location's proxy_set_header replaces all inherited ones: each states its own
        assert headers["host"] == "$host" and "x-forwarded-for" in headers, path


def test_websocket_location_passes_the_upgrade(http: list[Directive], server: list[Directive]) -> None:
    ws = find(server, "location", "/ws/")["block"]
    headers = {args[0].lower(): args[1] for args in values(ws, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    upgrade_map = find(http, "map", "$http_upgrade", "$connection_upgrade")["block"]
    assert {(d["directive"], tuple(d["args"])) for d in upgrade_map} == {("default", ("upgrade",)), ("", ("close",))}
    # plain HTTP keeps upstream connections alive: no Connection header passed through
    root = find(server, "location", "/")["block"]
    assert {args[0].lower(): args[1] for args in values(root, "proxy_set_header")}["connection"] == ""


def test_body_limit_matches_the_api_and_answers_in_its_error_shape(
    http: list[Directive], server: list[Directive]
) -> None:
    limit = values(http, "client_max_body_size")[0][0]
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", limit).groups()  # type: ignore[union-attr]
    max_body = int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]
    assert max_body == Settings.model_fields["max_body_bytes"].default == 2 * 1024 * 1024
    assert values(server, "error_page") == [["413", "@too_large"]]
    status, body = values(find(server, "location", "@too_large")["block"], "return")[0]
    error = json.loads(body)["error"]
    assert status == "413" and set(error) == {"type", "message", "param"}
    assert error["type"] == "payload_too_large_error" and str(max_body) in error["message"]


def test_rendered_for_local_processes(tmp_path: Path) -> None:
    backends = [("127.0.0.1", 5001), ("127.0.0.1", 5002)]
    text = render_nginx_conf(NGINX_CONF.read_text(), "127.0.0.1:9000", backends, tmp_path / "logs", tmp_path / "tmp")
    rendered = tmp_path / "nginx.conf"
    rendered.write_text(text)
    http = find(parse(rendered), "http")["block"]
    upstream = find(http, "upstream", "api")["block"]
    assert [args[0] for args in values(upstream, "server")] == ["127.0.0.1:5001", "127.0.0.1:5002"]
    # the file's failure marking is kept; `resolve` (fixed addresses here) is not
    original = find(find(parse(NGINX_CONF), "http")["block"], "upstream", "api")["block"]
    marking = [a for a in values(original, "server")[0][1:] if a != "resolve"]
    assert all(args[1:] == marking for args in values(upstream, "server")) and marking
    server = find(http, "server")["block"]
    assert values(server, "listen") == [["127.0.0.1:9000"]]
    assert values(http, "access_log") == [[str(tmp_path / "logs" / "access.log"), "upstream"]]
    assert values(http, "proxy_temp_path") == [[str(tmp_path / "tmp" / "proxy")]]
    # everything else is the same configuration
    original = NGINX_CONF.read_text()
    for line in ("proxy_buffering off;", "proxy_set_header Upgrade $http_upgrade;", "client_max_body_size 2m;"):
        assert text.count(line) == original.count(line) >= 1


def test_render_refuses_a_changed_file(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text().replace("server api:8000 ", "server backend:8000 ")
    with pytest.raises(ValueError, match="api:8000"):
        render_nginx_conf(text, "127.0.0.1:9000", [("127.0.0.1", 5001)], tmp_path, tmp_path)


def test_nginx_accepts_the_rendered_file(tmp_path: Path, nginx: str) -> None:
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / kind).mkdir(parents=True)
    text = render_nginx_conf(
        NGINX_CONF.read_text(), "127.0.0.1:9000", [("127.0.0.1", 5001)], tmp_path, tmp_path / "tmp"
    )
    (tmp_path / "nginx.conf").write_text(text)
    args = [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
            "-g", f"pid {tmp_path / 'nginx.pid'};"]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


class Counting(BaseHTTPRequestHandler):
    """Answers every POST with 200 and counts them; `swallow` servers read the request and hang up instead."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        server: Any = self.server
        server.received += 1
        if server.swallow:
            self.close_connection = True  # a replica that died after the request reached it
            return
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def backend(swallow: bool = False) -> Iterator[Any]:
    with ThreadingHTTPServer(("127.0.0.1", 0), Counting) as server:
        server.received, server.swallow = 0, swallow  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server
        finally:
            server.shutdown()


@contextlib.contextmanager
def running_nginx(backends: list[tuple[str, int]], tmp_path: Path) -> Iterator[str]:
    port = free_ports(1)[0]
    temp = Path(tempfile.mkdtemp(prefix="rnnserve-nginx-test-"))
    child = nginx_child("127.0.0.1", port, backends, tmp_path / "nginx", temp)
    try:
        wait_until(lambda: accepts("127.0.0.1", port), child, "nginx", 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_nginx_sends_a_refused_request_to_the_next_replica(tmp_path: Path, nginx: str) -> None:
    dead = free_ports(1)[0]
    with (
        backend() as live,
        running_nginx([("127.0.0.1", dead), ("127.0.0.1", live.server_address[1])], tmp_path) as url,
    ):
        statuses = [httpx.post(f"{url}/generate", json={"n": i}, trust_env=False).status_code for i in range(6)]
    assert statuses == [200] * 6 and live.received == 6


def test_nginx_never_resends_a_request_a_replica_received(tmp_path: Path, nginx: str) -> None:
    with backend(swallow=True) as dying, backend() as live:
        backends = [("127.0.0.1", dying.server_address[1]), ("127.0.0.1", live.server_address[1])]
        with running_nginx(backends, tmp_path) as url:
            statuses = [httpx.post(f"{url}/generate", json={"n": i}, trust_env=False).status_code for i in range(6)]
    # the hung-up request is the client's 502, and it reached one replica only
    assert statuses.count(502) == dying.received >= 1
    assert statuses.count(200) == live.received and dying.received + live.received == 6


def test_missing_nginx_skips_with_the_install_command_except_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nginx"):
        require_nginx()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install nginx"):
        require_nginx()
