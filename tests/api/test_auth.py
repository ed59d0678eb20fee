"""API keys (SPEC 3 and 5): the auth matrix of every route, session ownership, and keys kept out of the logs.

Every route of the app is classified below; a route that is in no class fails
test_every_route_is_classified, so a new route cannot slip in without deciding whether it needs a key.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from app.config import Settings
from app.logs import JsonFormatter
from app.main import create_app
from tests.api.conftest import error_of

KEY_A, KEY_B = "key-a", "key-b"
WRONG = "key-c"

# Open on purpose: probes and scrapers (SPEC 5).
OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
# Public on purpose: the API description and the static playground. They hold no data of a deployment
# (no model names, no sessions, no settings): test_public_pages_expose_no_data checks that.
PUBLIC = {
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/"),
    ("GET", "/static"),  # the mount; its files are fetched below
}
# Admin routes: only admin keys (RNNSERVE_ADMIN_KEYS); with API keys but no admin keys, 403 for every key.
ADMIN_PREFIXES = ("/admin/", "/trainings")
# WebSocket routes authenticate at connect time (Authorization header or a first "auth" message).
WEBSOCKETS = {"/ws/generate"}

# Request bodies that pass validation, so a right key reaches the handler; a new route gets {}.
BODIES: dict[str, object] = {
    "/generate": {"prompt": "Ab", "max_tokens": 2},
    "/score": {"text": "Ab"},
    "/inspect": {"text": "Ab"},
    "/v1/completions": {"model": "tiny-lstm", "prompt": "Ab", "max_tokens": 2},
}
PATH_VALUES = {"name": "tiny-lstm", "session_id": "sess-does-not-exist"}


def http_routes() -> list[tuple[str, str]]:
    """(method, path) of every HTTP route of the app, HEAD aside, with mounts as GET of their root."""
    app = create_app(Settings(models_dir=Path("models")))
    found = set()
    for route in iter_route_contexts(app.routes):
        original = route.original_route
        if isinstance(original, WebSocketRoute) or type(original).__name__ == "APIWebSocketRoute":
            continue
        if isinstance(original, Mount):
            found.add(("GET", route.path))
            continue
        found.update((method, route.path) for method in route.methods or () if method != "HEAD")
    return sorted(found)


def websocket_routes() -> set[str]:
    app = create_app(Settings(models_dir=Path("models")))
    return {
        str(route.path)
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, WebSocketRoute)
        or type(route.original_route).__name__ == "APIWebSocketRoute"
    }


HTTP_ROUTES = http_routes()
ADMIN = [r for r in HTTP_ROUTES if r[1].startswith(ADMIN_PREFIXES)]
PROTECTED = [r for r in HTTP_ROUTES if r not in OPEN and r not in PUBLIC and r not in ADMIN]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


Headers = dict[str, str | bytes]
BAD_HEADERS: dict[str, Headers] = {
    "none": {},
    "wrong-key": bearer(WRONG),
    "empty-bearer": {"Authorization": "Bearer "},
    "bearer-only": {"Authorization": "Bearer"},
    "no-scheme": {"Authorization": KEY_A},
    "no-space": {"Authorization": f"Bearer{KEY_A}"},
    "basic-key-as-user": basic(KEY_A),
    "basic-key-as-password": basic("user", KEY_A),
    "basic-raw-key": {"Authorization": f"Basic {KEY_A}"},
    "token-scheme": {"Authorization": f"Token {KEY_A}"},
    "both-keys": {"Authorization": f"Bearer {KEY_A},{KEY_B}"},
    "key-prefix": bearer(KEY_A[:-1]),
    "key-extended": bearer(KEY_A + "a"),
    "key-twice": {"Authorization": f"Bearer {KEY_A} {KEY_A}"},
    "latin-1": {"Authorization": "Bearer k\xe9y-a".encode("latin-1")},
}


@pytest.fixture(scope="module")
def keyed(tiny_models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        models_dir=tiny_models_dir,
        default_model="tiny-lstm",
        api_keys=f"{KEY_A},{KEY_B}",
        max_tokens_limit=50,
        log_level="debug",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def call(client: TestClient, method: str, path: str, headers: Headers):  # type: ignore[no-untyped-def]
    url = re.sub(r"{(\w+)}", lambda m: PATH_VALUES.get(m.group(1), "x"), path)
    body = BODIES.get(path, {}) if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, url, json=body, headers=headers)


def assert_401(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 401, response.text
    assert error_of(response)["type"] == "authentication_error"
    assert "Bearer" in error_of(response)["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


def new_session(client: TestClient, key: str, model: str = "tiny-lstm") -> str:
    r = client.post("/generate", json={"model": model, "prompt": "Ab", "max_tokens": 3}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


# -- the route list ---------------------------------------------------------------------------------


def test_every_route_is_classified() -> None:
    """Each route is protected, open or public; the open and public ones are exactly those listed."""
    assert set(HTTP_ROUTES) >= OPEN | PUBLIC, (OPEN | PUBLIC) - set(HTTP_ROUTES)
    assert websocket_routes() == WEBSOCKETS
    # the protected routes the SPEC names are among those found (the enumeration sees included routers)
    for route in [("POST", "/generate"), ("POST", "/score"), ("GET", "/sessions/{session_id}"),
                  ("DELETE", "/sessions/{session_id}"), ("POST", "/sessions/{session_id}/fork"),
                  ("GET", "/models"), ("GET", "/models/{name}"), ("POST", "/v1/completions"),
                  ("GET", "/v1/models"), ("POST", "/inspect")]:  # fmt: skip
        assert route in PROTECTED
    assert ("POST", "/admin/models/reload") in ADMIN


# -- protected routes: 401 without a valid key, not 401 with one ------------------------------------


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_protected_route_without_a_valid_key_is_401(keyed: TestClient, method: str, path: str, header: Headers) -> None:
    assert_401(call(keyed, method, path, header))


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_protected_route_with_a_right_key_is_served(keyed: TestClient, method: str, path: str, key: str) -> None:
    response = call(keyed, method, path, bearer(key))
    assert response.status_code != 401, response.text
    assert response.status_code < 500, response.text
    if path == "/v1/chat/completions":  # not served: 404 saying so, after authentication
        assert response.status_code == 404, response.text
    elif "{session_id}" not in path:  # those answer 404 for the placeholder id, after authentication
        assert 200 <= response.status_code < 300, response.text


@pytest.mark.parametrize(
    "header",
    [f"bearer {KEY_A}", f"BEARER {KEY_A}", f"Bearer  {KEY_A}", f"Bearer {KEY_A} "],
    ids=["lowercase-scheme", "uppercase-scheme", "two-spaces", "trailing-space"],
)
def test_the_scheme_is_case_insensitive_and_spaces_are_tolerated(keyed: TestClient, header: str) -> None:
    assert keyed.get("/models", headers={"Authorization": header}).status_code == 200


def test_an_unauthenticated_bad_body_is_not_parsed_before_the_key_is_checked(keyed: TestClient) -> None:
    """Without a key, a body that does not validate still gets the 401 (the key is checked first)."""
    assert_401(keyed.post("/generate", json={"max_tokens": "many"}))
    assert_401(keyed.post("/score", json={}))


def test_an_unauthenticated_invalid_json_body_is_401(keyed: TestClient) -> None:
    response = keyed.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_401(response)


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
@pytest.mark.parametrize(("method", "path"), ADMIN, ids=[f"{m} {p}" for m, p in ADMIN])
def test_admin_route_with_api_keys_but_no_admin_keys_is_403(
    keyed: TestClient, method: str, path: str, key: str
) -> None:
    response = call(keyed, method, path, bearer(key))
    assert response.status_code == 403, response.text
    assert error_of(response)["type"] == "permission_error"
    assert "RNNSERVE_ADMIN_KEYS" in error_of(response)["message"]


@pytest.mark.parametrize(("method", "path"), ADMIN, ids=[f"{m} {p}" for m, p in ADMIN])
def test_admin_route_without_a_valid_key_is_401(keyed: TestClient, method: str, path: str) -> None:
    assert_401(call(keyed, method, path, bearer(WRONG)))
    assert_401(call(keyed, method, path, {}))


# -- open and public routes -------------------------------------------------------------------------


@pytest.mark.parametrize("header", [{}, bearer(WRONG), basic(KEY_A)], ids=["none", "wrong-key", "basic"])
def test_health_and_metrics_are_open(keyed: TestClient, header: dict[str, str]) -> None:
    assert keyed.get("/healthz", headers=header).json() == {"status": "ok"}
    ready = keyed.get("/readyz", headers=header)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = keyed.get("/metrics", headers=header)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(("method", "path"), sorted(OPEN | PUBLIC), ids=[f"{m} {p}" for m, p in sorted(OPEN | PUBLIC)])
def test_open_and_public_routes_need_no_key(keyed: TestClient, method: str, path: str) -> None:
    if path == "/static":
        path = "/static/playground.js"
    response = keyed.request(method, path)
    assert response.status_code == 200, response.text
    assert "WWW-Authenticate" not in response.headers


def test_public_pages_expose_no_data(keyed: TestClient, tiny_models_dir: Path) -> None:
    """The docs, the schema and the playground are the same for every deployment: no models, no sessions."""
    deployment = ("tiny-lstm", "tiny-gru", "tiny-rnn", new_session(keyed, KEY_A), KEY_A, KEY_B, str(tiny_models_dir))
    for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/static/playground.js"):
        text = keyed.get(path).text
        for secret in deployment:
            assert secret not in text, (path, secret)


@pytest.mark.parametrize(
    ("method", "path"),
    [pytest.param(*route, id=f"{route[0]} {route[1]}") for route in PROTECTED],
)
def test_the_schema_documents_the_401(keyed: TestClient, method: str, path: str) -> None:
    """A protected operation can answer 401, so its schema entry must say so."""
    operation = keyed.get("/openapi.json").json()["paths"][path][method.lower()]
    assert "401" in operation["responses"] or operation.get("security"), operation["responses"].keys()


# -- WebSocket ----------------------------------------------------------------------------------------


def test_websocket_needs_a_key(keyed: TestClient) -> None:
    for header in ({}, bearer(WRONG), basic(KEY_A)):
        needs_auth_message = not header  # (websocket_connect adds its own headers to the dict it is given)
        with keyed.websocket_connect("/ws/generate", headers=header) as ws:
            if needs_auth_message:
                ws.send_text(json.dumps({"type": "auth", "api_key": WRONG}))
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1008
    with keyed.websocket_connect("/ws/generate", headers=bearer(KEY_A)) as ws:
        ws.send_text(json.dumps({"type": "generate", "prompt": "Ab", "max_tokens": 3}))
        while (message := json.loads(ws.receive_text()))["type"] == "token":
            pass
        assert message["type"] == "done", message


# -- ownership ----------------------------------------------------------------------------------------

OWNED_CALLS = {
    "get": lambda c, sid, h: c.get(f"/sessions/{sid}", headers=h),
    "delete": lambda c, sid, h: c.delete(f"/sessions/{sid}", headers=h),
    "fork": lambda c, sid, h: c.post(f"/sessions/{sid}/fork", headers=h),
    "generate": lambda c, sid, h: c.post("/generate", json={"session_id": sid, "max_tokens": 2}, headers=h),
    "generate-stream": lambda c, sid, h: c.post(
        "/generate", json={"session_id": sid, "max_tokens": 2, "stream": True}, headers=h
    ),
    "score": lambda c, sid, h: c.post("/score", json={"session_id": sid, "text": "Ab"}, headers=h),
}
OWNER_STATUS = {"get": 200, "delete": 204, "fork": 201, "generate": 200, "generate-stream": 200, "score": 200}


@pytest.mark.parametrize("operation", OWNED_CALLS)
def test_another_keys_session_is_not_found(keyed: TestClient, operation: str) -> None:
    sid = new_session(keyed, KEY_A)
    before = keyed.get(f"/sessions/{sid}", headers=bearer(KEY_A)).json()
    response = OWNED_CALLS[operation](keyed, sid, bearer(KEY_B))
    assert response.status_code == 404, response.text
    # exactly the answer for a session that does not exist: nothing tells key-b that it does
    missing = error_of(OWNED_CALLS[operation](keyed, "sess-does-not-exist", bearer(KEY_B)))
    assert error_of(response) == {**missing, "message": missing["message"].replace("sess-does-not-exist", sid)}
    # and key-b changed nothing
    assert keyed.get(f"/sessions/{sid}", headers=bearer(KEY_A)).json() == before
    # the owner is served
    served = OWNED_CALLS[operation](keyed, sid, bearer(KEY_A))
    assert served.status_code == OWNER_STATUS[operation], served.text


def test_a_fork_and_a_continuation_stay_with_the_owner(keyed: TestClient) -> None:
    sid = new_session(keyed, KEY_A)
    fork = keyed.post(f"/sessions/{sid}/fork", headers=bearer(KEY_A)).json()["session_id"]
    more = keyed.post("/generate", json={"session_id": sid, "max_tokens": 2}, headers=bearer(KEY_A)).json()
    for owned in (fork, more["session_id"]):
        assert keyed.get(f"/sessions/{owned}", headers=bearer(KEY_B)).status_code == 404
        assert keyed.get(f"/sessions/{owned}", headers=bearer(KEY_A)).status_code == 200


def test_a_websocket_continuation_of_another_keys_session_is_not_found(keyed: TestClient) -> None:
    sid = new_session(keyed, KEY_A)
    with keyed.websocket_connect("/ws/generate", headers=bearer(KEY_B)) as ws:
        ws.send_text(json.dumps({"type": "generate", "session_id": sid, "max_tokens": 2}))
        message = json.loads(ws.receive_text())
    assert message["type"] == "error" and message["error"]["type"] == "not_found_error", message


# -- keys never logged --------------------------------------------------------------------------------


def test_keys_never_appear_in_the_logs(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="app")
    sid = new_session(keyed, KEY_A)
    for method, path in PROTECTED:
        for header in (bearer(KEY_A), bearer(KEY_B), *BAD_HEADERS.values()):
            call(keyed, method, path, header)
    for operation in OWNED_CALLS:
        OWNED_CALLS[operation](keyed, sid, bearer(KEY_B))
    keyed.post("/generate", json={"session_id": sid, "max_tokens": 2, "stream": True}, headers=bearer(KEY_A))
    keyed.post("/generate", content=b"{not json", headers={**bearer(KEY_A), "Content-Type": "application/json"})
    with keyed.websocket_connect("/ws/generate") as ws:
        ws.send_text(json.dumps({"type": "auth", "api_key": WRONG}))
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()
    with keyed.websocket_connect("/ws/generate", headers=bearer(KEY_A)) as ws:
        ws.send_text(json.dumps({"type": "generate", "max_tokens": 2, "api_key": KEY_A}))  # a stray field
        ws.receive_text()

    formatter = JsonFormatter()
    logged = [formatter.format(r) + repr(vars(r)) for r in caplog.records]
    statuses = {getattr(r, "fields", {}).get("status") for r in caplog.records}
    assert {200, 401, 404} <= statuses, "the access log was not captured"
    secrets = [KEY_A, KEY_B, WRONG, base64.b64encode(f"{KEY_A}:".encode()).decode()]
    leaks = [(secret, line) for line in logged for secret in secrets if secret in line]
    assert not leaks, leaks[:3]
