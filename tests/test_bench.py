"""`rnnserve bench` end to end on a tiny model: both servers, every measurement, the README section."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from app.checkpoint import save_checkpoint
from app.config import Settings
from app.nn import CharRNN, ModelConfig
from app.tools import bench
from app.vocab import Vocab
from tests.api.conftest import LiveServer, write_tiny_models
from tests.deploy.conftest import require_nginx


def test_stream_once_counts_the_streamed_characters_and_raises_on_an_error(tmp_path: Path) -> None:
    write_tiny_models(tmp_path)
    with LiveServer(Settings(models_dir=tmp_path, default_model="tiny-lstm", step_budget_ms=1)) as server:
        body = {"prompt": "ab", "max_tokens": 300, "seed": 3, "stop": ["ba"], "save_session": False}
        first, seconds, chars = asyncio.run(bench.stream_once(server.url, body))
        text = httpx.post(f"{server.url}/generate", json=body).json()["text"]
        assert chars == len(text) > 0  # over several events (a 1 ms step budget), the stop string held back
        assert 0 < first <= seconds
        with pytest.raises(RuntimeError, match=r"(?s)422 .*max_tokens"):
            asyncio.run(bench.stream_once(server.url, {**body, "max_tokens": 0}))


def test_bench_measures_both_engines_and_writes_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no data/ here: the benchmark's prompts come from its fallback text
    vocab = Vocab("".join(sorted(set(bench.FALLBACK_TEXT))))
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch="lstm", vocab_size=len(vocab), embedding_size=8, hidden_size=32))
    save_checkpoint(tmp_path / "models" / "tiny-lstm", model, vocab, {"corpus": {"name": "tiny"}})
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    out = tmp_path / "bench.json"

    bench.run(
        ["tiny-lstm"], tmp_path / "models", out, readme, quick=True, concurrency=(1, 4), histories=(10, 1000),
        parts=("engine",),
    )  # fmt: skip

    data = json.loads(out.read_text())
    results = {r["mode"]: r for r in data["http"]}
    assert set(results) == {"naive", "batched", "int8"}
    for r in results.values():
        assert r["single_chars_per_s"] > 0
        assert set(r["aggregate_chars_per_s"]) == {"1", "4"} and all(r["aggregate_chars_per_s"].values())
        # as many runs as fit in 5 s, at least one and at most the 2 allowed: how many depends on the machine's speed
        assert set(r["runs"]) == {"1", "4"} and all(1 <= n <= 2 for n in r["runs"].values())
        assert set(r["continuation_ms"]) == {"10", "1000"}
    for mode in ("batched", "int8"):
        phases = results[mode]["phases"]["4"]
        assert phases["step"] > 0 and phases["choose"] > 0 and phases["prefill"] > 0
        assert sum(phases.values()) <= 1.05  # shares of one thread's wall time
    ref = data["reference"][0]
    assert ref["bound_chars_per_s"] > 0 and ref["streams"] == 4
    # a bound before each served run (both served modes, both concurrencies), each kernel run and each engine run
    served_runs = sum(n for mode in ("batched", "int8") for n in results[mode]["runs"].values())
    assert ref["bounds"] == served_runs + 2 + 2 * 2
    assert set(ref["matmul_gflops_by"]) == {"torch", "onnxruntime"} and min(ref["matmul_gflops_by"].values()) > 0
    for weights in ("fp32", "int8"):
        assert set(ref["ort_chars_per_s"][weights]) == {"1", "4", "32", "128"}
        assert ref["kernels"][weights]["read_chars_per_s"] > 0
        for layer in ("kernels", "engine", "served"):
            assert ref[layer][weights]["chars_per_s"] > 0 and 0 < ref[layer][weights]["share"] < 10
        # the server's figure and share are its HTTP runs'
        mode = {"fp32": "batched", "int8": "int8"}[weights]
        assert ref["served"][weights]["chars_per_s"] == results[mode]["aggregate_chars_per_s"]["4"]
        assert ref["served"][weights]["share"] == results[mode]["bound_share"]["4"]
        assert set(results[mode]["bound_share"]) == {"1", "4"}
    assert results["naive"]["bound_share"] == {}
    # quick: 100 characters after a 100-character prompt, so half the characters through the network are prompts
    assert ref["prompt_share"] == pytest.approx(0.5)
    text = readme.read_text()
    assert "old" not in text
    assert "| tiny-lstm | aggregate chars/s, 4 streams |" in text and "| tiny-lstm | continue after 1,000 chars" in text
    assert "| tiny-lstm | fp32 | 4 |" in text and "| tiny-lstm | int8 | 4 |" in text and "compute thread idle" in text
    assert "rnnserve, int8 weights" in text
    assert "onnxruntime " in text and " GFLOP/s, medians of " in text and "| engine alone, no HTTP |" in text
    layers = [line for line in text.splitlines() if " GFLOP/s, medians of " in line]  # a row per weights
    assert [line.split(" | ")[1] for line in layers] == ["fp32", "int8"]
    assert all(" | 4 | " in line for line in layers)  # at the most streams


def test_deployment_section_runs_the_cluster_beside_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_nginx()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNNSERVE_TORCH_THREADS", "1")  # a small machine, shared
    write_tiny_models(tmp_path / "models")
    readme = tmp_path / "README.md"
    sections = "<!-- bench:start -->\nkept\n<!-- bench:end -->\n<!-- deployment:start -->\nold\n<!-- deployment:end -->"
    readme.write_text(f"# x\n\n{sections}\n")
    out = tmp_path / "bench.json"

    report = bench.run(
        ["tiny-lstm"], tmp_path / "models", out, readme, quick=True, parts=("deployment",), deployment_streams=(2, 4)
    )

    rows = json.loads(out.read_text())["deployment"]
    assert [(r["topology"], r["streams"]) for r in rows] == [
        (topology, c) for c in (2, 4) for topology in (bench.ONE, bench.CLUSTER, bench.BUSY)
    ]
    for r in rows:
        assert r["chars_per_s"] > 0 and r["runs"] == 2 and 0 < r["ttfc_ms"][0] <= r["ttfc_ms"][1]
        assert r["vs_one_process"] == pytest.approx(r["chars_per_s"] / rows[(r["streams"] != 2) * 3]["chars_per_s"])
    assert rows[1]["replica_cpus"]  # each replica's share of the cores is stated
    text = readme.read_text()
    assert "kept" in text and "old" not in text  # only the deployment section is replaced
    assert f"| {bench.CLUSTER} | 4 |" in text and f"| {bench.BUSY} | 2 |" in text and report in text


def test_busy_core_spins_a_process_only_inside_the_block() -> None:
    with bench.busy_core():
        hogs = [p for p in child_commands() if "while True: pass" in p]
        assert len(hogs) == 1
    assert [p for p in child_commands() if "while True: pass" in p] == []


def child_commands() -> list[str]:
    """The command lines of this process' children, from /proc."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                found.append((stat.parent / "cmdline").read_text().replace("\0", " "))
        except (OSError, IndexError):
            pass
    return found
