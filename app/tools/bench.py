"""`rnnserve bench`: the batched engine against the naive baseline, and the deployed topologies against one
process, over HTTP, side by side in one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from app.checkpoint import Checkpoint, load_checkpoint
from app.config import Settings
from app.engine.config import Weights
from app.engine.engine import Engine
from app.engine.sampling import SamplingParams
from app.engine.sequence import GenerationRequest, GenerationResult
from app.engine.stream import Stream
from app.metrics import PHASES
from app.nn import CharRNN
from app.procs import stop
from app.tools.cluster import free_ports, start_cluster
from app.tools.readme import replace_section, write_section

CONCURRENCY = (1, 8, 32, 128)
# the servers measured, one after another, and their settings: the naive baseline, then rnnserve on
# the checkpoint's fp32 weights and on 8-bit weights (RNNSERVE_WEIGHTS=int8)
MODES = {
    "naive": {"RNNSERVE_ENGINE": "naive"},
    "batched": {"RNNSERVE_ENGINE": "batched"},
    "int8": {"RNNSERVE_ENGINE": "batched", "RNNSERVE_WEIGHTS": "int8"},
}
SERVED = {"batched": "fp32", "int8": "int8"}  # the modes that are rnnserve's engine, and their weights
HISTORIES = (100, 100_000)
# the deployment section's topologies, at these numbers of concurrent streams
ONE, CLUSTER, BUSY = "one process", "rnnserve cluster --replicas 2", "one process, one core busy"
DEPLOYMENT_STREAMS = (32, 128)
PARTS = ("engine", "deployment")  # what `run` measures: `--only` picks one
PROMPT_CHARS = 100  # of each stream of the single-stream and concurrency runs
FALLBACK_TEXT = (
    "Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day,\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools\n"
    "The way to dusty death. Out, out, brief candle!\n"
)


@dataclass
class Result:
    mode: str
    model: str
    single_chars_per_s: float = 0.0
    aggregate_chars_per_s: dict[int, float] = field(default_factory=dict)
    runs: dict[int, int] = field(default_factory=dict)  # concurrency -> runs measured, whose median is the figure
    ttfc_ms: dict[int, tuple[float, float]] = field(default_factory=dict)  # concurrency -> (p50, p99) over all runs
    continuation_ms: dict[int, float] = field(default_factory=dict)  # history chars -> median latency
    prompt_chars: int = 0  # of each stream of the concurrency runs, which then make `per_stream` characters
    per_stream: int = 0
    # concurrency -> the share of the run's wall time the compute thread spent in each engine phase
    phases: dict[int, dict[str, float]] = field(default_factory=dict)
    # concurrency -> the median over its runs of each run's chars/s over the bound measured right before it
    bound_share: dict[int, float] = field(default_factory=dict)


class Bound:
    """The chars/s a model's decoding step would make if every multiply-add ran at the machine's
    matrix-multiply rate, measured afresh at each call: a shared machine's speed drifts by a third
    within minutes, so each figure is compared with the bound measured seconds before it."""

    def __init__(self, model: CharRNN) -> None:
        cfg = model.config
        # multiply-adds per character: every layer's hidden projection, the input projections of
        # layers 1.., the head (layer 0's input projection is a table lookup)
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.arch] * cfg.hidden_size
        self.macs = cfg.num_layers * cfg.hidden_size * gates + (cfg.num_layers - 1) * cfg.hidden_size * gates
        self.macs += cfg.hidden_size * cfg.vocab_size
        self.rates: list[dict[str, float]] = []  # every measurement's FLOP/s by library

    def __call__(self) -> float:
        self.rates.append(matmul_rate(repeats=10))
        return max(self.rates[-1].values()) / (2 * self.macs)

    def summary(self) -> dict[str, Any]:
        """The medians over every measurement so far."""
        gflops = {name: statistics.median(r[name] for r in self.rates) / 1e9 for name in self.rates[0]}
        best = statistics.median(max(r.values()) for r in self.rates)
        return {"matmul_gflops_by": gflops, "bound_chars_per_s": best / (2 * self.macs), "bounds": len(self.rates)}


class Server:
    """`uvicorn app.main:app` in a child process with the given RNNSERVE_* settings."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env})

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        stop(self.proc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream_once(url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first character, seconds in all, characters) of one streamed generation.

    HTTP/1.1 written and read by hand, on a new connection: the benchmark client shares the
    machine's cores with the server it measures, and httpx's parsing of 128 streams took a tenth of
    a core (this takes a third of that), which the server's two-thread steps paid for about 1.5 times
    over, waiting for their preempted half.
    """
    where = urlsplit(url)
    payload = json.dumps({**body, "stream": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (where.netloc.encode(), len(payload), payload)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 ") or b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"POST /generate answered {(head + await reader.read()).decode()}")
        first, chars, events = None, 0, b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):  # a chunk of the body; 0 ends it
            events += (await reader.readexactly(size + 2))[:-2]
            *complete, events = events.split(b"\n\n")
            for event in complete:
                name, _, data = event.partition(b"\ndata: ")
                if name == b"event: token":
                    chars += len(json.loads(data)["text"])
                    first = first or time.perf_counter() - start
                elif name == b"event: error":
                    raise RuntimeError(f"error event: {data.decode()}")
    finally:
        writer.close()
    return first or 0.0, time.perf_counter() - start, chars


async def measure(urls: dict[str, str], model: str, history: str, cfg: dict[str, Any], bound: Bound) -> list[Result]:
    """Every measurement of `model` on every server (mode -> URL), each taken on the servers one
    right after the other: a shared machine's speed drifts over minutes, and the ratios compare
    figures measured seconds apart, not the length of a whole server's run."""
    prompt = history[:PROMPT_CHARS]
    body = {"model": model, "prompt": prompt, "save_session": False}
    results = {mode: Result(mode, model, prompt_chars=len(prompt), per_stream=cfg["per_stream"]) for mode in urls}
    # a new connection per request: one left idle past the server's keep-alive timeout (while the
    # naive server works through the streams) may be closed just as it is reused
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for url in urls.values():
            await stream_once(url, {**body, "max_tokens": 20})  # warm-up: first-call costs
        # the median of a few runs: one run of a few seconds on a shared 2-core machine is at the
        # mercy of whatever else ran in those seconds
        singles: dict[str, list[float]] = {mode: [] for mode in urls}
        for seed in range(1, cfg["single_runs"] + 1):
            for mode, url in urls.items():
                _, seconds, chars = await stream_once(url, {**body, "max_tokens": cfg["single"], "seed": seed})
                singles[mode].append(chars / seconds)
        for mode, rates in singles.items():
            results[mode].single_chars_per_s = statistics.median(rates)
        for n in cfg["histories"]:
            text = (history * (n // len(history) + 1))[:n]
            for mode, url in urls.items():
                results[mode].continuation_ms[n] = await continuation(client, url, mode, model, text, cfg)
        # the most streams last: the caller measures the layers under them right after
        for c in cfg["concurrency"]:
            for mode, url in urls.items():
                await concurrent(client, url, results[mode], body, c, cfg, bound if mode in SERVED else None)
    return list(results.values())


async def concurrent(
    client: httpx.AsyncClient,
    url: str,
    res: Result,
    body: dict[str, Any],
    c: int,
    cfg: dict[str, Any],
    bound: Bound | None = None,
) -> None:
    """`c` streams at once: aggregate chars/s, first-character percentiles, the compute thread's
    phases, and with `bound`, the share of the bound measured right before each run."""
    spent = await engine_seconds(client, url, res.model)
    # a run of a fraction of a second moves with whatever else the machine does in it: the
    # median of as many runs as fit in `min_seconds` (at least one, at most `max_runs`)
    rates: list[float] = []
    shares: list[float] = []
    ttfc: list[float] = []
    walls = 0.0
    streams = [{**body, "max_tokens": cfg["per_stream"], "seed": i} for i in range(cfg["sequential"] if c == 1 else c)]
    while not rates or (len(rates) < cfg["max_runs"] and walls < cfg["min_seconds"]):
        ceiling = bound() if bound is not None else None  # no streams running: the cores are the product's
        t0 = time.perf_counter()
        if c == 1:  # one stream at a time, several times: a percentile needs more than one sample
            runs = [await stream_once(url, stream) for stream in streams]
        else:
            runs = await asyncio.gather(*(stream_once(url, stream) for stream in streams))
        wall = time.perf_counter() - t0
        walls += wall
        rates.append(sum(r[2] for r in runs) / wall)
        if ceiling is not None:
            shares.append(rates[-1] / ceiling)
        ttfc += [r[0] * 1000 for r in runs]
    after = await engine_seconds(client, url, res.model)
    res.phases[c] = {phase: (after[phase] - spent[phase]) / walls for phase in PHASES}
    res.aggregate_chars_per_s[c], res.runs[c] = statistics.median(rates), len(rates)
    res.ttfc_ms[c] = (percentile(ttfc, 0.5), percentile(ttfc, 0.99))
    if shares:
        res.bound_share[c] = statistics.median(shares)


async def continuation(
    client: httpx.AsyncClient, url: str, mode: str, model: str, history: str, cfg: dict[str, Any]
) -> float:
    """Median milliseconds of a 20-character greedy continuation after `history`."""
    cont = {"model": model, "max_tokens": 20, "strategy": "greedy", "save_session": False}
    if mode == "naive":  # no state cache: the history is read again every time
        cont["prompt"] = history
    else:
        made = await client.post(f"{url}/generate", json={"model": model, "prompt": history, "max_tokens": 1})
        made.raise_for_status()
        cont["session_id"] = made.json()["session_id"]
    times = []
    for _ in range(cfg["repeats"] if len(history) <= 1000 or mode != "naive" else 1):
        t0 = time.perf_counter()
        # no time limit: the naive loop reads 100,000 characters in 5-11 minutes on the machines measured
        r = await client.post(f"{url}/generate", json=cont, timeout=None)
        r.raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def engine_seconds(client: httpx.AsyncClient, url: str, model: str) -> dict[str, float]:
    """The server's rnnserve_engine_seconds_total for `model`, by phase."""
    text = (await client.get(f"{url}/metrics")).text
    found = dict.fromkeys(PHASES, 0.0)
    for line in text.splitlines():
        if line.startswith("rnnserve_engine_seconds_total{") and f'model="{model}"' in line:
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            found[phase] = float(line.rsplit(" ", 1)[1])
    return found


def phase_table(results: list[Result]) -> str:
    """Where the compute thread's time goes, in rnnserve, as shares of each run's wall time."""
    names = {"step": "decoding step", "choose": "choosing characters", "prefill": "reading prompts",
             "bookkeeping": "batch bookkeeping"}  # fmt: skip
    lines = [
        "| model | weights | streams | " + " | ".join(names[p] for p in PHASES) + " | compute thread idle |",
        "|---|---|---:|" + "---:|" * (len(PHASES) + 1),
    ]
    for r in results:
        if r.mode not in SERVED:
            continue
        for c, shares in r.phases.items():
            cells = " | ".join(f"{shares[p]:.0%}" for p in PHASES)
            lines.append(f"| {r.model} | {SERVED[r.mode]} | {c} | {cells} | {max(0.0, 1 - sum(shares.values())):.0%} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the vector unit tells apart machines that share a model name (an EPYC with AVX512 or with AVX2 only)
    simd = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({simd}), {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def ratio(new: float, old: float) -> str:
    return f"{new / old:.1f}x" if old else "-"


def table(results: list[Result]) -> str:
    by = {(r.mode, r.model): r for r in results}
    lines = [
        "| model | metric | naive | rnnserve | rnnserve / naive | rnnserve, int8 weights | int8 / naive |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in dict.fromkeys(r.model for r in results):
        naive, *served = (by[(mode, model)] for mode in MODES)
        first = served[0]
        # (metric, the Result field holding it, its key there, whether higher is better)
        metrics: list[tuple[str, str, Any, bool]] = [("single-stream chars/s", "single_chars_per_s", None, True)]
        metrics += [
            (f"aggregate chars/s, {c} streams", "aggregate_chars_per_s", c, True) for c in first.aggregate_chars_per_s
        ]
        metrics += [(f"first char p50 / p99 ms, {c} streams", "ttfc_ms", c, False) for c in first.ttfc_ms]
        metrics += [(f"continue after {h:,} chars, ms", "continuation_ms", h, False) for h in first.continuation_ms]
        for name, attribute, key, higher_better in metrics:
            old = _value(naive, attribute, key)
            cells = [_cell(old)]
            for r in served:
                new = _value(r, attribute, key)
                if isinstance(old, tuple):  # latency percentiles: the ratio of the p99s
                    cells += [_cell(new), ratio(old[1], new[1])]
                else:
                    cells += [_cell(new), ratio(new, old) if higher_better else ratio(old, new)]
            lines.append(f"| {model} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _value(r: Result, attribute: str, key: Any) -> Any:
    found = getattr(r, attribute)
    return found if key is None else found[key]


def _cell(value: float | tuple[float, float]) -> str:
    return f"{value[0]:,.0f} / {value[1]:,.0f}" if isinstance(value, tuple) else f"{value:,.0f}"


def run(
    models: list[str],
    models_dir: Path,
    out: Path | None,
    readme: Path | None,
    quick: bool,
    concurrency: tuple[int, ...] = CONCURRENCY,
    histories: tuple[int, ...] = HISTORIES,
    parts: tuple[str, ...] = PARTS,
    deployment_streams: tuple[int, ...] = DEPLOYMENT_STREAMS,
) -> str:
    """The engine against the naive baseline for each model (`engine`, the README's bench section)
    and the deployed topologies on the first model (`deployment`, its deployment section)."""
    cfg: dict[str, Any] = (
        {"single": 300, "single_runs": 1, "per_stream": 100, "repeats": 3, "sequential": 5, "max_runs": 2}
        if quick
        else {"single": 1000, "single_runs": 3, "per_stream": 200, "repeats": 5, "sequential": 20, "max_runs": 5}
    )
    cfg.update(concurrency=concurrency, histories=histories, min_seconds=5.0)
    test_split = Path("data/shakespeare/test.txt")
    history = test_split.read_text() if test_split.exists() else FALLBACK_TEXT
    sections = {"engine": "bench", "deployment": "deployment"}
    if readme is not None:  # before measuring for minutes: the sections to replace are there
        for part in parts:
            replace_section(readme.read_text(), sections[part], "")
    reports: list[str] = []
    data: dict[str, Any] = {}
    if "engine" in parts:
        report, data = engine(models, models_dir, history, cfg)
        if readme is not None:
            write_section(readme, sections["engine"], report)
        reports.append(report)
    if "deployment" in parts:
        rows = deployment(models[0], models_dir, history[:PROMPT_CHARS], cfg, deployment_streams)
        data["deployment"] = rows
        report = deployment_table(rows, machine())
        if readme is not None:
            write_section(readme, sections["deployment"], report)
        reports.append(report)
    if out is not None:  # a part run alone keeps the other part's figures
        kept = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps(kept | data, indent=2) + "\n")
    return "\n\n".join(reports)


def engine(models: list[str], models_dir: Path, history: str, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    servers = {
        mode: Server({**settings, "RNNSERVE_MODELS_DIR": str(models_dir), "RNNSERVE_MAX_QUEUE": "512"})
        for mode, settings in MODES.items()
    }  # all up at once: each idles (its threads asleep) while another is measured
    results: list[Result] = []
    refs = []
    try:
        for server in servers.values():
            server.wait_ready()
        for model in models:
            print(f"{model} ...", flush=True)
            bound = Bound(load_checkpoint(models_dir / model).model)
            urls = {mode: s.url for mode, s in servers.items()}
            results += asyncio.run(measure(urls, model, history, cfg, bound))
            # the in-process layers under the served figure, right after the model's streams
            refs.append(reference(models_dir / model, results, history[:PROMPT_CHARS], cfg["max_runs"], bound))
    finally:
        for server in servers.values():
            server.stop()
    report = f"Measured on {machine()}; ratios are rnnserve over the naive baseline (latency: naive over rnnserve).\n\n"
    report += table(results) + "\n\n" + reference_table(refs) + "\n\n" + phase_table(results)
    return report, {"http": [r.__dict__ for r in results], "reference": refs}


# -- the deployment: replicas against one process, and one process beside a busy core ---------------


def deployment(
    model: str, models_dir: Path, prompt: str, cfg: dict[str, Any], streams: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Aggregate chars/s of `streams` concurrent streams on one process with default settings, on the
    compose topology (`rnnserve cluster`: 2 replicas behind nginx, Redis), and on the one process with
    another process spinning on one of its cores; the three take turns run by run, so that each
    ratio compares figures measured seconds apart."""
    settings = {"RNNSERVE_MODELS_DIR": str(models_dir), "RNNSERVE_DEFAULT_MODEL": model, "RNNSERVE_MAX_QUEUE": "512"}
    print("deployment ...", flush=True)
    single = Server(settings)
    try:
        single.wait_ready()
        with start_cluster(port=free_ports(1)[0], env=settings) as cluster:
            shares = "; ".join(share.describe() for share in cluster.shares)
            urls = {ONE: single.url, CLUSTER: cluster.url, BUSY: single.url}
            body = {"model": model, "prompt": prompt, "max_tokens": cfg["per_stream"], "save_session": False}
            rows = asyncio.run(take_turns(urls, body, streams, cfg["max_runs"]))
    finally:
        single.stop()
    for row in rows:
        row.update(model=model, per_stream=cfg["per_stream"], replica_cpus=shares if row["topology"] == CLUSTER else "")
    return rows


async def take_turns(
    urls: dict[str, str], body: dict[str, Any], streams: tuple[int, ...], runs: int
) -> list[dict[str, Any]]:
    for url in dict.fromkeys(urls.values()):  # warm-up: first-call costs, on both replicas
        await asyncio.gather(*(stream_once(url, {**body, "max_tokens": 20, "seed": i}) for i in range(4)))
    rows = []
    for c in streams:
        rates: dict[str, list[float]] = {name: [] for name in urls}
        ttfc: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(runs):
            for name, url in urls.items():
                with busy_core() if name == BUSY else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    done = await asyncio.gather(*(stream_once(url, {**body, "seed": i}) for i in range(c)))
                    rates[name].append(sum(r[2] for r in done) / (time.perf_counter() - t0))
                ttfc[name] += [r[0] * 1000 for r in done]
        one = statistics.median(rates[ONE])
        for name in urls:
            rate = statistics.median(rates[name])
            rows.append({
                "topology": name, "streams": c, "chars_per_s": rate, "vs_one_process": rate / one, "runs": runs,
                "ttfc_ms": (percentile(ttfc[name], 0.5), percentile(ttfc[name], 0.99)),
            })  # fmt: skip
    return rows


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core (the last this one may use) for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(hog.pid, {max(os.sched_getaffinity(0))})
        time.sleep(0.2)  # spinning before the streams start
        yield
    finally:
        hog.kill()
        hog.wait()


def deployment_table(rows: list[dict[str, Any]], where: str) -> str:
    first = rows[0]
    lines = [
        f"Measured on {where}; model {first['model']}, each stream {first['per_stream']} characters after a "
        f"{PROMPT_CHARS}-character prompt; medians of {first['runs']} runs, the topologies taking turns. "
        f"Default settings; the cluster's replicas: {next(r['replica_cpus'] for r in rows if r['replica_cpus'])}.",
        "",
        "| topology | streams | aggregate chars/s | / one process | first char p50 / p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        p50, p99 = r["ttfc_ms"]
        lines.append(
            f"| {r['topology']} | {r['streams']} | {r['chars_per_s']:,.0f} | {r['vs_one_process']:.2f}x "
            f"| {p50:,.0f} / {p99:,.0f} |"
        )
    return "\n".join(lines)


def reference(
    model_dir: Path, results: list[Result], prompt: str, runs: int, bound: Bound, steps: int = 300
) -> dict[str, Any]:
    """In-process reference points for the most streams measured over HTTP, each a layer less than
    the server: the engine alone (the same streams, no HTTP), the ceiling of its kernels (ONNX
    Runtime's bare step loop and prompt reader, nothing else), and the matmul-bound ceiling of the
    step (every row at the machine's matrix-multiply rate), each layer as a share of the bound
    measured right before it; and the bytes of one stored session."""
    ckpt = load_checkpoint(model_dir)
    served = {r.mode: r for r in results if r.mode in SERVED and r.model == ckpt.name}
    first = served["batched"]
    streams, per_stream = max(first.aggregate_chars_per_s), first.per_stream
    ids = [ckpt.vocab.bos, *ckpt.vocab.encode(prompt)]  # as a request's prompt is fed
    reading = read_rate(ckpt.model, streams, len(ids))  # prompts are read in fp32 whatever the step's weights
    loops, kernels, engine = {}, {}, {}
    for weights in SERVED.values():
        ceiling = bound()
        loops[weights] = step_loop(ckpt.model, weights, sorted({1, 32, 128, streams}), steps)
        # the prompt read (its logits give the first character), then a step per further character
        rate = per_stream / (len(ids) / reading + (per_stream - 1) / loops[weights][streams])
        kernels[weights] = {"chars_per_s": rate, "share": rate / ceiling, "read_chars_per_s": reading}
        engine[weights] = asyncio.run(engine_alone(ckpt, weights, ids, streams, per_stream, runs, bound))
    return {
        "model": ckpt.name,
        "ort_chars_per_s": loops,
        **bound.summary(),
        "streams": streams,
        "kernels": kernels,
        "engine": engine,
        "served": {
            w: {"chars_per_s": served[mode].aggregate_chars_per_s[streams], "share": served[mode].bound_share[streams]}
            for mode, w in SERVED.items()
        },
        # every character through the network: each stream's prompt is read as well as its output made
        "prompt_share": first.prompt_chars / (first.prompt_chars + per_stream),
        "session_bytes": session_bytes(ckpt),
    }


@torch.inference_mode()
def step_loop(model: CharRNN, weights: str, batches: list[int], steps: int) -> dict[int, float]:
    """Chars/s of ONNX Runtime's decoding step called in a loop, nothing else, at each batch size."""
    from app.nn.onnx_step import OnnxStep

    step = OnnxStep(model, threads=torch.get_num_threads(), weights=weights)
    rates = {}
    for batch in batches:
        ids, state = torch.zeros(batch, dtype=torch.long), model.zero_state(batch)
        for _ in range(10):  # warm-up: a shape's first runs allocate
            _, state = step(ids, state)
        t0 = time.perf_counter()
        for _ in range(steps):
            _, state = step(ids, state)
        rates[batch] = batch * steps / (time.perf_counter() - t0)
    return rates


@torch.inference_mode()
def read_rate(model: CharRNN, rows: int, length: int, repeats: int = 5) -> float:
    """Chars/s of ONNX Runtime's prompt reader taking `rows` prompts of `length` at once (best of `repeats`)."""
    from app.nn.onnx_step import OnnxPrefill

    reader = OnnxPrefill(model, threads=torch.get_num_threads())
    prompts = [[(i + j) % model.config.vocab_size for j in range(length)] for i in range(rows)]
    reader(prompts, model.zero_state(rows))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        reader(prompts, model.zero_state(rows))
        best = min(best, time.perf_counter() - t0)
    return rows * length / best


async def engine_alone(
    ckpt: Checkpoint, weights: str, ids: list[int], streams: int, per_stream: int, runs: int, bound: Bound
) -> dict[str, float]:
    """Aggregate chars/s of `streams` generations of `per_stream` characters after `ids`, submitted
    together to the server's engine in this process, no HTTP: the medians over `runs` runs of the
    chars/s and of its share of the bound measured right before each run."""
    settings = Settings()
    engine = Engine(replace(settings.engine_config(), weights=Weights(weights)))
    await engine.start({ckpt.name: ckpt})

    async def drain(stream: Stream) -> int:
        while not isinstance(got := await stream.next(), GenerationResult):
            pass
        return len(got.ids)

    async def run(n: int, max_tokens: int) -> float:
        t0 = time.perf_counter()
        params = SamplingParams()
        made = await asyncio.gather(*(
            drain(engine.submit(ckpt, GenerationRequest(list(ids), max_tokens, params, seed)))
            for seed in range(n)
        ))  # fmt: skip
        return sum(made) / (time.perf_counter() - t0)

    try:
        await run(min(streams, 8), 20)  # warm-up: first-call costs
        rates, shares = [], []
        for _ in range(runs):
            ceiling = bound()
            rates.append(await run(streams, per_stream))
            shares.append(rates[-1] / ceiling)
        return {"chars_per_s": statistics.median(rates), "share": statistics.median(shares)}
    finally:
        await engine.stop()


def session_bytes(ckpt: Checkpoint) -> int:
    from app.sessions.record import SessionRecord, encode_state

    record = SessionRecord(
        session_id="sess-" + "x" * 32, owner="", model=ckpt.name, model_sha256=ckpt.sha256,
        state=encode_state(ckpt.model.zero_state(1)), last="\n",
        generator_state=torch.Generator().get_state().numpy().tobytes(), seed=0, chars=0, tail="x" * 200,
        created_at=0.0, updated_at=0.0, expires_at=0.0,
    )  # fmt: skip
    return len(record.to_bytes())


def matmul_rate(n: int = 1024, repeats: int = 20) -> dict[str, float]:
    """The machine's float32 matrix-multiply rate (FLOP/s) by torch and by ONNX Runtime: the best of
    `repeats` n x n x n products each. The kernels differ by CPU (on an AMD EPYC with AVX512, ONNX
    Runtime's ran at twice torch's rate), and the machine's rate is the faster one's."""
    import onnx
    import onnxruntime as ort

    a, b = torch.randn(n, n), torch.randn(n, n)
    spec = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", spec[:2], spec[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(
        onnx.helper.make_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"a": a.numpy(), "b": b.numpy()}
    products = {"torch": lambda: torch.mm(a, b), "onnxruntime": lambda: session.run(None, feed)}
    rates = {}
    for name, product in products.items():
        product()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * n**3 / best
    return rates


def reference_table(refs: list[dict[str, Any]]) -> str:
    """Per model and weights: the step loop, and at the most streams each layer's chars/s and its
    share of the bound measured right before it."""
    lines = [
        "| model | weights | ONNX Runtime step loop, chars/s at 1 / 32 / 128 rows | matmul-bound chars/s "
        "| streams | kernels only (step loop + prompt reader) | engine alone, no HTTP | served over HTTP "
        "| served, prompts included | bytes per stored session |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in refs:
        rates = " / ".join(f"{name} {gflops:.0f}" for name, gflops in r["matmul_gflops_by"].items())
        bound = f"{r['bound_chars_per_s']:,.0f} ({rates} GFLOP/s, medians of {r['bounds']})"
        for weights in SERVED.values():
            loop = r["ort_chars_per_s"][weights]
            cells = [f"{r[layer][weights]['chars_per_s']:,.0f} ({r[layer][weights]['share']:.0%})"
                     for layer in ("kernels", "engine", "served")]  # fmt: skip
            served = r["served"][weights]
            processed = served["chars_per_s"] / (1 - r["prompt_share"])
            lines.append(
                f"| {r['model']} | {weights} | {loop[1]:,.0f} / {loop[32]:,.0f} / {loop[128]:,.0f} | {bound} "
                f"| {r['streams']} | {' | '.join(cells)} "
                f"| {processed:,.0f} ({served['share'] / (1 - r['prompt_share']):.0%}) | {r['session_bytes']:,} |"
            )
    return "\n".join(lines)
