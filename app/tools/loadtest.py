"""`rnnserve loadtest`: fault and load scenarios against a real server and its own Redis, with a report.

One server (bench's `Server`) and one redis-server of its own (append-only, fsync on every write, so
that killing it loses no acknowledged write) serve the first four scenarios in turn:

- steady: clients loop over JSON and SSE generations (greedy, sample, beam), /score, session
  continuations and GET /models;
- storm: hundreds of SSE streams, in waves, each dropped after its first token; afterwards the
  active generations return to 0 and the server's memory to near its baseline;
- redis: steady load with sessions while redis-server is killed after a third of the time and
  restarted on the same port after another third;
- contention: many clients continuing the same few sessions at once: one continuation wins, the
  others get 409, and the accepted ones add up exactly;

and two more their own deployments:

- replica: `rnnserve cluster --replicas 2` under steady load with sessions, through nginx; a replica
  is killed -9 while it streams continuations of a few sessions. Counted: the requests sent while it
  was down that failed, by kind (at least 99% must be answered), those it had received when it died
  (they fail: nginx never sends a request twice), the seconds until the sessions it was continuing
  can be continued again (their lease ran out), and until it answers again on its address;
- redis-cluster: one server on a local Redis Cluster (3 masters, 3 replicas) under load with
  sessions; a master is killed -9. Counted: the seconds until its replica took over and until every
  session is served again; requests without a session never fail. An update the dead master
  acknowledged but had not yet passed to its replica is lost (Redis replicates asynchronously): such
  losses are reported, not failed.

Each session the load touches is booked: its characters after creation plus those of every accepted
(200) continuation must equal GET /sessions/{id} `chars` afterwards, so an update that was lost, or
a rejected request that changed a session, shows. A request whose outcome is unknown (503, a broken
connection) may or may not have landed; the check allows exactly the deltas of those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.tools.bench import Server, machine, percentile
from app.tools.cluster import Child, Cluster, free_ports, redis_pong, spawn, start_cluster, wait_until
from app.tools.readme import write_section
from app.tools.redis_cluster import RedisCluster, start_redis_cluster

UNAVAILABLE_EVENT = "service_unavailable_error"
SCENARIOS = ("steady", "storm", "redis", "contention", "replica", "redis-cluster")
ONE_SERVER = ("steady", "storm", "redis", "contention")  # the scenarios of one server and its own Redis
PROMPTS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "HAMLET:\nTo be, or not to be: that is the question.\n",
)
STATELESS_OPS = {"generate_greedy", "generate_beam", "stream_sample", "stream_beam", "score", "models"}
MB = 1024 * 1024
# a storm stream asks for this many characters; if dropping it did not abort it, the server would
# generate them all: more than STORM_LEAK of them on average fails the storm
STORM_TOKENS = 2000
STORM_LEAK = 0.1
# the replica scenario's continuations on the replica it kills: long enough to be running at the kill
HELD_SESSIONS = 2
HELD_TOKENS = 10_000


@dataclass
class Config:
    models_dir: Path = Path("models")
    model: str = "shakespeare-lstm"
    seconds: float = 20.0  # per scenario (the storm is sized by its stream count instead)
    clients: int = 16
    storm_streams: int = 300
    storm_wave: int = 50
    contention_clients: int = 32
    contention_sessions: int = 4
    max_tokens: int = 24
    deadline: float = 30.0  # a request still unanswered (a stream neither done nor failed) after this is hung
    sessions_deadline: float = 60.0  # after a replica's kill, by when the sessions it was continuing must be free
    scenarios: tuple[str, ...] = SCENARIOS
    env: dict[str, str] = field(default_factory=dict)  # more RNNSERVE_* settings for the server


@dataclass
class Booked:
    """What one session must hold: `expected` characters, plus any subset of the `unsure` deltas."""

    expected: int
    unsure: list[tuple[int, int]] = field(default_factory=list)  # (least, most) characters, outcome unknown

    def allows(self, chars: int) -> bool:
        extra = chars - self.expected
        if extra < 0:
            return False
        if not self.unsure:
            return extra == 0
        if len(self.unsure) > 200:  # too many to enumerate: bounds only
            return extra <= sum(hi for _, hi in self.unsure)
        reachable = {0}
        for lo, hi in self.unsure:
            reachable |= {r + d for r in reachable for d in range(lo, hi + 1) if r + d <= extra}
        return extra in reachable


@dataclass
class Tally:
    """One scenario's figures and the expectations it failed."""

    name: str
    allowed: set[int]  # the HTTP statuses that are not a failure here
    seconds: float = 0.0
    requests: int = 0
    chars: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_op: dict[str, Counter[int]] = field(default_factory=dict)
    transport: Counter[str] = field(default_factory=Counter)  # exception type -> count
    stream_errors: Counter[str] = field(default_factory=Counter)  # error event type -> count
    hung: int = 0
    ttfc: list[float] = field(default_factory=list)  # seconds, streamed requests
    sessions: dict[str, Booked] = field(default_factory=dict)
    sessions_checked: int = 0
    lost: list[str] = field(default_factory=list)  # "id: expected N (+unsure), found M"
    notes: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def record(self, op: str, status: int) -> None:
        self.statuses[status] += 1
        self.by_op.setdefault(op, Counter())[status] += 1

    def sample_error(self, op: str, status: int, body: Any) -> None:
        """Keeps the first few error messages of each op and status, for the JSON report."""
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        samples = self.notes.setdefault("error_samples", {}).setdefault(f"{op} {status}", [])
        if len(samples) < 3 and message not in samples:
            samples.append(message)

    def errors(self) -> str:
        bad = sorted((s, n) for s, n in self.statuses.items() if s >= 300)
        return ", ".join(f"{s} x{n}" for s, n in bad) or "none"

    def ttfc_ms(self) -> str:
        if not self.ttfc:
            return "-"
        ms = [t * 1000 for t in self.ttfc]
        return f"{percentile(ms, 0.5):,.0f} / {percentile(ms, 0.99):,.0f}"

    def judge(self, breaks_allowed: bool = False, losses_allowed: bool = False) -> None:
        """The expectations every scenario shares; scenario-specific ones are added by the scenario.

        `breaks_allowed`: broken connections and streams are the fault itself, counted by the scenario;
        `losses_allowed`: sessions that lost an update are reported, not failed.
        """
        unexpected = {s: n for s, n in self.statuses.items() if s not in self.allowed}
        if unexpected:
            self.failures.insert(
                0, "unexpected statuses " + ", ".join(f"{s} x{n}" for s, n in sorted(unexpected.items()))
            )
        if self.transport and not breaks_allowed:
            self.failures.append("transport errors " + ", ".join(f"{k} x{n}" for k, n in self.transport.items()))
        # a scenario that allows a 503 allows it as an event too: the store went away mid-stream
        events = {k: n for k, n in self.stream_errors.items() if not (503 in self.allowed and k == UNAVAILABLE_EVENT)}
        if events and not breaks_allowed:
            self.failures.append("error events " + ", ".join(f"{k} x{n}" for k, n in events.items()))
        if self.hung:
            self.failures.append(f"{self.hung} hung")
        if self.lost and not losses_allowed:
            self.failures.append(f"{len(self.lost)} sessions lost or gained an update")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "chars": self.chars,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "by_op": {op: {str(k): v for k, v in sorted(c.items())} for op, c in sorted(self.by_op.items())},
            "transport_errors": dict(self.transport),
            "stream_errors": dict(self.stream_errors),
            "hung": self.hung,
            "ttfc_ms": {"p50": percentile(self.ttfc, 0.5) * 1000, "p99": percentile(self.ttfc, 0.99) * 1000}
            if self.ttfc
            else None,
            "sessions_checked": self.sessions_checked,
            "lost": self.lost,
            "notes": self.notes,
            "failures": self.failures,
            "passed": not self.failures,
        }


@dataclass
class Reply:
    """One request's outcome: status None when it broke or hung; `body` the JSON (or the done event's data)."""

    status: int | None
    body: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None


def json_of(r: httpx.Response) -> Any:
    """The body as JSON; None when there is none or it is not JSON (the error itself is counted by status)."""
    try:
        return r.json() if r.content else None
    except ValueError:
        return None


class Load:
    """A client over one shared connection pool that books every outcome into the current Tally."""

    def __init__(self, client: httpx.AsyncClient, url: str, model: str, deadline: float) -> None:
        self.client, self.url, self.model, self.deadline = client, url, model, deadline
        self.tally = Tally("", set())
        self.redis_restarted: float | None = None  # monotonic time of the last Redis restart

    async def call(self, op: str, method: str, path: str, body: dict[str, Any] | None = None) -> Reply:
        return await self._bounded(op, self._plain(op, method, path, body))

    async def stream(self, op: str, body: dict[str, Any], drop_after_first: bool = False) -> Reply:
        return await self._bounded(op, self._sse(op, {**body, "stream": True}, drop_after_first))

    async def _bounded(self, op: str, request: Awaitable[Reply]) -> Reply:
        self.tally.requests += 1
        try:
            return await asyncio.wait_for(request, self.deadline)
        except TimeoutError:
            self.tally.hung += 1
            self.tally.notes.setdefault("hung_ops", Counter())[op] += 1
        except httpx.HTTPError as e:
            self.tally.transport[type(e).__name__] += 1
        except (ValueError, KeyError) as e:  # not the JSON or the events the API promises
            self.tally.transport[f"bad response ({type(e).__name__})"] += 1
        return Reply(None)

    async def _plain(self, op: str, method: str, path: str, body: dict[str, Any] | None) -> Reply:
        r = await self.client.request(method, self.url + path, json=body)
        self.tally.record(op, r.status_code)
        data = json_of(r)
        if r.status_code >= 300:
            self.note_error(op, r.status_code, data)
        if r.status_code == 200 and isinstance(data, dict) and "usage" in data:
            self.tally.chars += data["usage"]["completion_chars"]
        return Reply(r.status_code, data if isinstance(data, dict) else None)

    async def _sse(self, op: str, body: dict[str, Any], drop_after_first: bool) -> Reply:
        start = time.perf_counter()
        async with self.client.stream("POST", self.url + "/generate", json=body) as r:
            self.tally.record(op, r.status_code)
            if r.status_code != 200:
                await r.aread()
                data = json_of(r)
                self.note_error(op, r.status_code, data)
                return Reply(r.status_code, data)
            event, first = "", True
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif not line.startswith("data: "):
                    continue
                elif event == "token":
                    self.tally.chars += len(json.loads(line[6:])["text"])
                    if first:
                        self.tally.ttfc.append(time.perf_counter() - start)
                        first = False
                    if drop_after_first:
                        return Reply(200, {})  # leaving the block closes the connection mid-stream
                elif event == "done":
                    return Reply(200, json.loads(line[6:]))
                elif event == "error":
                    error = json.loads(line[6:])
                    self.tally.stream_errors[error["error"]["type"]] += 1
                    self.note_error(op, 200, error)
                    return Reply(200)
            self.tally.stream_errors["stream ended without done"] += 1
            return Reply(200)

    def note_error(self, op: str, status: int, body: Any) -> None:
        self.tally.sample_error(op, status, body)
        if status == 503 and self.redis_restarted is not None:
            since = time.monotonic() - self.redis_restarted
            if since > 0:  # a 503 while Redis is back up: when, after its restart
                self.tally.notes.setdefault("503_after_restart_s", []).append(round(since, 2))

    # -- the requests the scenarios make ---------------------------------------------------------

    def generate(self, prompt: str, max_tokens: int, strategy: str, **extra: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "strategy": strategy, **extra}
        if strategy == "sample":
            body.setdefault("temperature", 0.8)
            body.setdefault("top_k", 20)
        if strategy == "beam":
            body.setdefault("beam_width", 3)
        return body

    async def create_session(self, prompt: str, max_tokens: int) -> tuple[Reply, str | None]:
        """A new session, booked with the characters it starts with (its id None if it was refused)."""
        reply = await self.call("session_create", "POST", "/generate", self.generate(prompt, max_tokens, "greedy"))
        if not reply.ok or reply.body is None:
            return reply, None
        sid: str = reply.body["session_id"]
        usage = reply.body["usage"]
        self.tally.sessions[sid] = Booked(usage["prompt_chars"] + usage["completion_chars"])
        return reply, sid

    async def one_off(self, kind: int, prompt: str, max_tokens: int, seed: int, sid: str) -> tuple[str, Reply]:
        """Kinds 1, 2, 4 and 5 of the fault scenarios' mix (0 and 3 continue `sid`): a greedy generation,
        a sampled stream, a score from `sid`'s state, a score alone; returns the op's name and its reply."""
        if kind == 1:
            op = "generate_greedy"
            return op, await self.call(
                op, "POST", "/generate", self.generate(prompt, max_tokens, "greedy", save_session=False)
            )
        if kind == 2:
            op = "stream_sample"
            return op, await self.stream(op, self.generate(prompt, max_tokens, "sample", seed=seed, save_session=False))
        if kind == 4:
            op = "score_session"
            return op, await self.call(op, "POST", "/score", {"model": self.model, "text": prompt, "session_id": sid})
        return "score", await self.call("score", "POST", "/score", {"model": self.model, "text": prompt})

    async def continue_session(self, sid: str, prompt: str, max_tokens: int, streamed: bool = False) -> Reply:
        """Continue `sid`, booking the outcome: accepted, refused, or unknown."""
        body = self.generate(prompt, max_tokens, "sample" if streamed else "greedy", session_id=sid)
        if streamed:
            body.pop("top_k")  # no seed: it goes on with the session's own generator
        reply = await (
            self.stream("continue_stream", body) if streamed else self.call("continue", "POST", "/generate", body)
        )
        booked = self.tally.sessions[sid]
        if reply.ok and reply.body is not None:
            usage = reply.body["usage"]
            booked.expected += usage["prompt_chars"] + usage["completion_chars"]
        elif reply.status in (None, 200, 502):
            # broke mid-way, or its replica died under nginx (502): saved up to some character, or not
            booked.unsure.append((0, len(prompt) + max_tokens))
        elif reply.status == 503:
            booked.unsure.append((len(prompt) + max_tokens, len(prompt) + max_tokens))  # Redis died after commit?
        return reply

    async def check_sessions(self) -> None:
        """Every booked session holds exactly what its accepted updates add up to."""
        t = self.tally
        for sid, booked in t.sessions.items():
            reply = await self.call("session_get", "GET", f"/sessions/{sid}")
            t.sessions_checked += 1
            if not reply.ok or reply.body is None:
                t.lost.append(f"{sid}: GET /sessions answered {reply.status}")
            elif not booked.allows(reply.body["chars"]):
                unsure = f" (+ any of {len(booked.unsure)} unsure)" if booked.unsure else ""
                t.lost.append(f"{sid}: expected {booked.expected}{unsure} chars, found {reply.body['chars']}")
        t.notes["unsure_outcomes"] = sum(len(b.unsure) for b in t.sessions.values())


# -- Redis of our own ------------------------------------------------------------------------------


class Redis:
    """A throwaway redis-server on a free port that fsyncs every write, so that a kill loses nothing acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.child: Child | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("no redis-server on PATH")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--loglevel", "warning"]  # fmt: skip
        child = spawn("redis", args, self.directory / "redis.log")
        self.child = child
        wait_until(lambda: redis_pong(self.port), child, "redis-server", 10)

    def kill(self) -> None:
        if self.child is not None:
            self.child.proc.kill()
            self.child.proc.wait(10)
            self.child = None


# -- server observations ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def metric(load: Load, name: str) -> float | None:
    """The server's value of a Prometheus series `name{model="<the model>"}`."""
    r = await load.client.get(load.url + "/metrics")
    m = re.search(rf'^{name}\{{model="{re.escape(load.model)}"\}} (\S+)$', r.text, re.MULTILINE)
    return float(m[1]) if m else None


# -- the scenarios ---------------------------------------------------------------------------------


async def until(end: float, body: Callable[[int], Awaitable[None]]) -> None:
    i = 0
    while time.monotonic() < end:
        await body(i)
        i += 1


async def steady(load: Load, cfg: Config) -> None:
    t, mt = load.tally, cfg.max_tokens
    end = time.monotonic() + cfg.seconds

    async def client(c: int) -> None:
        _, sid = await load.create_session(PROMPTS[c % len(PROMPTS)], mt)

        async def one(i: int) -> None:
            prompt = PROMPTS[(c + i) % len(PROMPTS)]
            kind = (c + i) % 9
            if kind == 0:
                await load.call(
                    "generate_greedy", "POST", "/generate", load.generate(prompt, mt, "greedy", save_session=False)
                )
            elif kind == 1:
                await load.stream("stream_sample", load.generate(prompt, mt, "sample", seed=i, save_session=False))
            elif kind == 2 and sid:
                await load.continue_session(sid, "" if i % 2 else " ", mt)
            elif kind == 3:
                await load.call("score", "POST", "/score", {"model": load.model, "text": prompt})
            elif kind == 4:
                await load.stream("stream_beam", load.generate(prompt, mt, "beam", save_session=False))
            elif kind == 5:
                await load.call("models", "GET", "/models")
            elif kind == 6 and sid:
                await load.continue_session(sid, "", mt, streamed=True)
            elif kind == 7:
                await load.call(
                    "generate_beam", "POST", "/generate", load.generate(prompt, mt, "beam", save_session=False)
                )
            elif sid:
                await load.call(
                    "score_session", "POST", "/score", {"model": load.model, "text": prompt, "session_id": sid}
                )

        await until(end, one)

    await asyncio.gather(*(client(c) for c in range(cfg.clients)))
    await load.check_sessions()
    if not t.sessions:
        t.failures.append("no session could be created")


async def storm(load: Load, cfg: Config, pid: int) -> None:
    t = load.tally
    await asyncio.sleep(0.5)
    before = rss_bytes(pid)
    peak = before
    sampling = True

    async def sample_rss() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.1)

    generated_before = await metric(load, "rnnserve_generated_chars_total") or 0.0
    sampler = asyncio.create_task(sample_rss())
    opened = 0
    while opened < cfg.storm_streams:
        wave = min(cfg.storm_wave, cfg.storm_streams - opened)
        bodies = [
            load.generate(PROMPTS[i % len(PROMPTS)], STORM_TOKENS, "sample", seed=i, save_session=i % 2 == 0)
            for i in range(opened, opened + wave)
        ]
        await asyncio.gather(*(load.stream("storm", b, drop_after_first=True) for b in bodies))
        opened += wave
    sampling = False
    await sampler

    # every dropped stream must free its slot: the gauge goes back to 0
    deadline = time.monotonic() + cfg.deadline
    active = await metric(load, "rnnserve_active_generations")
    while active != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        active = await metric(load, "rnnserve_active_generations")
    drained = cfg.deadline - (deadline - time.monotonic())
    generated = (await metric(load, "rnnserve_generated_chars_total") or 0.0) - generated_before
    await asyncio.sleep(1.0)
    after = rss_bytes(pid)
    allowance = max(50 * MB, before // 5)
    after_ok = await load.call(
        "generate_greedy", "POST", "/generate", load.generate(PROMPTS[0], 8, "greedy", save_session=False)
    )
    t.notes.update(
        streams=opened,
        active_after=active,
        drained_s=round(drained, 2),
        generated_chars=int(generated),
        generated_chars_allowed=int(opened * STORM_TOKENS * STORM_LEAK),
        rss_before_mb=round(before / MB, 1),
        rss_peak_mb=round(peak / MB, 1),
        rss_after_mb=round(after / MB, 1),
        rss_allowance_mb=round(allowance / MB, 1),
    )
    if active != 0:
        t.failures.append(f"active generations {active} (not 0) {cfg.deadline:.0f}s after the storm")
    if generated > opened * STORM_TOKENS * STORM_LEAK:
        t.failures.append(f"{generated:.0f} characters generated for {opened} dropped streams: not aborted")
    if after > before + allowance:
        t.failures.append(f"memory {after / MB:.0f} MB, over baseline {before / MB:.0f} MB + {allowance / MB:.0f} MB")
    if not after_ok.ok:
        t.failures.append(f"a generation after the storm answered {after_ok.status}")


async def outage(load: Load, cfg: Config, redis: Redis) -> None:
    t, mt = load.tally, cfg.max_tokens
    start = time.monotonic()
    end = start + cfg.seconds
    restarted = asyncio.Event()
    locked: set[str] = set()  # sessions that answered 409 after the restart: a lease outlived the outage
    last: dict[int, tuple[str, int | None]] = {}

    async def fault() -> None:
        await asyncio.sleep(cfg.seconds / 3)
        await asyncio.to_thread(redis.kill)
        t.notes["killed_at_s"] = round(time.monotonic() - start, 2)
        await asyncio.sleep(cfg.seconds / 3)
        await asyncio.to_thread(redis.start)
        load.redis_restarted = time.monotonic()
        t.notes["restarted_at_s"] = round(load.redis_restarted - start, 2)
        restarted.set()

    async def client(c: int) -> None:
        _, sid = await load.create_session(PROMPTS[c % len(PROMPTS)], mt)

        async def one(i: int) -> None:
            nonlocal sid
            prompt = PROMPTS[(c + i) % len(PROMPTS)]
            kind = (c + i) % 6
            reply: Reply
            if sid is None or sid in locked:  # a client whose session is stuck starts another
                op = "session_create"
                reply, made = await load.create_session(prompt, mt)
                sid = made or sid
            elif kind in (0, 3):
                op, reply = "continue", await load.continue_session(sid, "" if i % 2 else " ", mt)
                # leases a replica could not give back while Redis was down are given back as soon as
                # it answers: a 409 after that grace means a session stayed locked
                if reply.status == 409 and restarted.is_set() and time.monotonic() - (load.redis_restarted or 0) > 2:
                    locked.add(sid)
            else:
                op, reply = await load.one_off(kind, prompt, mt, i, sid)
            last[c] = (op, reply.status)
            if restarted.is_set() and reply.ok and op not in STATELESS_OPS and "recovered_s" not in t.notes:
                t.notes["recovered_s"] = round(time.monotonic() - (load.redis_restarted or 0), 2)
            if reply.status == 503:
                await asyncio.sleep(0.05)  # as a client would back off from an unavailable dependency

        await until(end, one)

    await asyncio.gather(fault(), *(client(c) for c in range(cfg.clients)))

    # at the end, sessions work as before: a new one is made and continued (retried for a while)
    probe_deadline = time.monotonic() + cfg.deadline
    working = False
    while not working and time.monotonic() < probe_deadline:
        _, sid = await load.create_session(PROMPTS[0], mt)
        working = sid is not None and (await load.continue_session(sid, "", mt)).ok
        if not working:
            await asyncio.sleep(0.2)
    stateless_503 = sum(c[503] for op, c in t.by_op.items() if op in STATELESS_OPS)
    failed_last = {c: v for c, v in last.items() if v[1] != 200}
    t.notes.setdefault("recovered_s", None)
    t.notes.update(
        stateless_503=stateless_503,
        sessions_locked_after_restart=len(locked),
        last_requests_ok=f"{len(last) - len(failed_last)}/{len(last)}",
    )
    await load.check_sessions()
    if t.notes["recovered_s"] is None:
        t.failures.append("no session request succeeded between the restart and the end")
    if not working:
        t.failures.append(f"sessions not working {cfg.deadline:.0f}s after the end")
    if stateless_503:
        t.failures.append(f"{stateless_503} requests without a session answered 503")
    if failed_last:
        t.failures.append("last requests failed: " + ", ".join(f"{op} {s}" for op, s in failed_last.values()))
    if locked:
        t.failures.append(f"{len(locked)} sessions still leased (409) after the restart")


async def contention(load: Load, cfg: Config) -> None:
    t, mt = load.tally, cfg.max_tokens
    sids = [(await load.create_session(PROMPTS[i % len(PROMPTS)], mt))[1] for i in range(cfg.contention_sessions)]
    if None in sids:
        t.failures.append("could not create the contended sessions")
        return
    won: Counter[str] = Counter()
    lost_race: Counter[str] = Counter()
    end = time.monotonic() + cfg.seconds

    async def client(c: int) -> None:
        sid = sids[c % len(sids)]
        assert sid is not None

        async def one(i: int) -> None:
            kind = (c + i) % 8
            if kind == 7:
                await load.call(
                    "score_session", "POST", "/score", {"model": load.model, "text": PROMPTS[1], "session_id": sid}
                )
                return
            reply = await load.continue_session(sid, "" if i % 2 else " ", mt, streamed=kind == 3)
            if reply.ok:
                won[sid] += 1
            elif reply.status == 409:
                lost_race[sid] += 1
                await asyncio.sleep(0.01)  # a loser backs off a little before it tries again

        await until(end, one)

    await asyncio.gather(*(client(c) for c in range(cfg.contention_clients)))
    await load.check_sessions()
    t.notes.update(accepted=sum(won.values()), conflicts=sum(lost_race.values()))
    if any(won[s] == 0 for s in sids if s is not None):
        t.failures.append("a contended session was never continued")


@dataclass
class Timed:
    """One request of a fault scenario: when it was sent and answered, and how."""

    op: str
    sent: float
    answered: float
    reply: Reply


def window_figures(t: Tally, done: list[Timed], start: float, end: float) -> float:
    """Notes the requests sent in [start, end] and those of them that failed, by kind, and apart from
    them the requests already in flight at `start` (the fault) that failed; returns the share of the
    former answered."""
    sent = [r for r in done if start <= r.sent <= end]
    in_flight = [r for r in done if r.sent < start <= r.answered]
    share = sum(r.reply.ok for r in sent) / len(sent) if sent else 1.0
    t.notes.update(
        window_requests=len(sent),
        window_answered=round(share, 4),
        failed_in_window=dict(Counter(f"{r.op} {r.reply.status or 'broken'}" for r in sent if not r.reply.ok)),
        in_flight_at_fault=len(in_flight),
        in_flight_failed=dict(Counter(f"{r.op} {r.reply.status or 'broken'}" for r in in_flight if not r.reply.ok)),
    )
    return share


async def session_client(load: Load, cfg: Config, c: int, done: list[Timed], running: Callable[[], bool]) -> None:
    """A client of the fault scenarios: sessions created and continued (JSON and SSE), generations and
    scores without a session. A session whose continuation failed may stay leased by a replica that
    died: the client starts another; after a 503 it backs off a little, as a client of a dependency
    that is down would."""
    mt = cfg.max_tokens
    sid: str | None = None
    i = 0
    while running():
        prompt = PROMPTS[(c + i) % len(PROMPTS)]
        kind = (c + i) % 6
        sent = time.monotonic()
        reply: Reply
        if sid is None:
            op = "session_create"
            reply, sid = await load.create_session(prompt, mt)
        elif kind in (0, 3):
            op = "continue_stream" if kind == 3 else "continue"
            reply = await load.continue_session(sid, "" if i % 2 else " ", mt, streamed=kind == 3)
            if not reply.ok:
                sid = None
        else:
            op, reply = await load.one_off(kind, prompt, mt, i, sid)
        done.append(Timed(op, sent, time.monotonic(), reply))
        if reply.status == 503:
            await asyncio.sleep(0.05)
        i += 1


async def held_continuation(load: Load, url: str, sid: str, started: asyncio.Event) -> dict[str, Any] | None:
    """A long streamed continuation of `sid` on the server at `url`: its done event's data, or None
    when it broke first."""
    body = load.generate("", HELD_TOKENS, "sample", session_id=sid, stream=True)
    event = ""
    try:
        async with load.client.stream("POST", url + "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    started.set()
                elif line.startswith("data: ") and event == "done":
                    data: dict[str, Any] = json.loads(line[6:])
                    return data
    except httpx.HTTPError:
        pass
    finally:
        started.set()
    return None


async def replica_fault(load: Load, cfg: Config, cluster: Cluster) -> None:
    t, mt = load.tally, cfg.max_tokens
    victim, address = cluster.replicas[0], cluster.replica_urls[0]
    start = time.monotonic()
    done: list[Timed] = []
    killed, back = float("inf"), 0.0  # monotonic times; back stays 0 until the replica answers again
    # requests of the fault itself (aimed at the replica, or probing its sessions) are not the load's
    aside = Load(load.client, address, load.model, load.deadline)

    def running() -> bool:
        now = time.monotonic()
        return now < start + cfg.seconds or (not back and now < killed + 60) or (bool(back) and now < back + 2)

    async def fault() -> None:
        nonlocal killed, back
        await asyncio.sleep(cfg.seconds / 3)
        held = [sid for _, sid in [await aside.create_session(PROMPTS[i], mt) for i in range(HELD_SESSIONS)] if sid]
        t.sessions.update({sid: aside.tally.sessions[sid] for sid in held})
        started = [asyncio.Event() for _ in held]
        streams = [asyncio.create_task(held_continuation(aside, address, *a)) for a in zip(held, started, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), cfg.deadline)
        victim.proc.kill()
        killed = time.monotonic()
        t.notes["killed_at_s"] = round(killed - start, 2)
        broken = []
        for sid, result in zip(held, await asyncio.gather(*streams), strict=True):
            if result is None:
                broken.append(sid)
                t.sessions[sid].unsure.append((0, HELD_TOKENS))
            else:  # finished before the kill
                t.sessions[sid].expected += result["usage"]["completion_chars"]
        t.notes["sessions_held"] = len(broken)

        async def answers() -> None:
            nonlocal back
            while time.monotonic() < killed + 60:
                with contextlib.suppress(httpx.HTTPError):
                    if (await load.client.get(address + "/readyz", timeout=2)).status_code == 200:
                        back = time.monotonic()
                        t.notes["replica_back_s"] = round(back - killed, 2)
                        return
                await asyncio.sleep(0.2)

        async def freed() -> None:
            waiting = set(broken)
            while waiting and time.monotonic() < killed + cfg.sessions_deadline:
                for sid in sorted(waiting):
                    body = load.generate("", 1, "greedy", session_id=sid)
                    reply = await aside.call("continue", "POST", "/generate", body)
                    if reply.ok and reply.body is not None:
                        usage = reply.body["usage"]
                        t.sessions[sid].expected += usage["prompt_chars"] + usage["completion_chars"]
                        waiting.discard(sid)
                if not waiting:
                    t.notes["sessions_freed_s"] = round(time.monotonic() - killed, 2)
                    return
                await asyncio.sleep(0.5)

        aside.url = load.url  # the held sessions are continued again through nginx, on any replica
        await asyncio.gather(answers(), freed())

    await asyncio.gather(fault(), *(session_client(load, cfg, c, done, running) for c in range(cfg.clients)))
    t.notes.setdefault("replica_back_s", None)
    t.notes.setdefault("sessions_freed_s", None)
    t.notes["restarts"] = victim.restarts
    share = window_figures(t, done, killed, back or time.monotonic())
    await load.check_sessions()
    if share < 0.99:
        t.failures.append(f"{share:.1%} of the requests sent while the replica was down answered (< 99%)")
    if not back:
        t.failures.append(f"{victim.name} did not answer on {address} within 60 s of its kill")
    if t.notes["sessions_held"] and t.notes["sessions_freed_s"] is None:
        t.failures.append(f"its sessions could not be continued within {cfg.sessions_deadline:g} s of the kill")
    if cluster.dead():
        t.failures.append(f"not running at the end: {', '.join(cluster.dead())}")


async def master_fault(load: Load, cfg: Config, redis_cluster: RedisCluster) -> None:
    t, mt = load.tally, cfg.max_tokens
    start = time.monotonic()
    end = start + cfg.seconds
    done: list[Timed] = []
    killed = float("inf")
    probes = [sid for _, sid in [await load.create_session(PROMPTS[i % 4], mt) for i in range(8)] if sid]
    aside = Load(load.client, load.url, load.model, load.deadline)

    async def fault() -> None:
        nonlocal killed
        await asyncio.sleep(cfg.seconds / 3)
        master = redis_cluster.masters()[0]
        await asyncio.to_thread(redis_cluster.kill, master)
        killed = time.monotonic()
        t.notes["killed_at_s"] = round(killed - start, 2)
        while not await asyncio.to_thread(redis_cluster.failed_over, master):
            if time.monotonic() > killed + 60:
                return
            await asyncio.sleep(0.2)
        t.notes["failover_s"] = round(time.monotonic() - killed, 2)
        # every session (a few on each master) is served again
        while time.monotonic() < max(end, killed + 60):
            replies = [await aside.call("session_get", "GET", f"/sessions/{sid}") for sid in probes]
            if all(r.ok for r in replies):
                t.notes["sessions_served_s"] = round(time.monotonic() - killed, 2)
                return
            await asyncio.sleep(0.2)

    await asyncio.gather(fault(), *(session_client(load, cfg, c, done, lambda: time.monotonic() < end)
                                   for c in range(cfg.clients)))  # fmt: skip
    t.notes.setdefault("failover_s", None)
    t.notes.setdefault("sessions_served_s", None)
    window_figures(t, done, killed, killed + (t.notes["sessions_served_s"] or cfg.seconds))
    stateless_failed = sum(not r.reply.ok for r in done if r.op in STATELESS_OPS)
    working = False
    probe_deadline = time.monotonic() + cfg.deadline
    while not working and time.monotonic() < probe_deadline:
        _, sid = await load.create_session(PROMPTS[0], mt)
        working = sid is not None and (await load.continue_session(sid, "", mt)).ok
    t.notes.update(stateless_failed=stateless_failed, probed_sessions=len(probes))
    await load.check_sessions()
    if t.notes["failover_s"] is None:
        t.failures.append("no replica took over from the killed master within 60 s")
    elif t.notes["sessions_served_s"] is None:
        t.failures.append("sessions not all served again after the failover")
    if stateless_failed:
        t.failures.append(f"{stateless_failed} requests without a session failed")
    if not working:
        t.failures.append(f"new sessions not working {cfg.deadline:.0f}s after the end")


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """What the scenarios run against: one server and its Redis, a cluster, or a server on a Redis Cluster."""

    url: str
    server: Server | None = None
    redis: Redis | None = None
    cluster: Cluster | None = None
    redis_cluster: RedisCluster | None = None


ALLOWED = {
    "steady": {200},
    "storm": {200, 429},
    "redis": {200, 409, 503},
    "contention": {200, 409},
    "replica": {200, 409, 502},
    "redis-cluster": {200, 409, 503},
}


async def run_scenarios(cfg: Config, names: list[str], on: Targets) -> list[Tally]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    timeout = httpx.Timeout(cfg.deadline + 5)
    tallies = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        load = Load(client, on.url, cfg.model, cfg.deadline)
        for name in names:
            print(f"loadtest: {name} ...", flush=True)
            load.tally = tally = Tally(name, ALLOWED[name])
            t0 = time.monotonic()
            if name == "steady":
                await steady(load, cfg)
            elif name == "storm" and on.server is not None:
                await storm(load, cfg, on.server.proc.pid)
            elif name == "redis" and on.redis is not None:
                await outage(load, cfg, on.redis)
            elif name == "contention":
                await contention(load, cfg)
            elif name == "replica" and on.cluster is not None:
                await replica_fault(load, cfg, on.cluster)
            elif name == "redis-cluster" and on.redis_cluster is not None:
                await master_fault(load, cfg, on.redis_cluster)
            tally.seconds = time.monotonic() - t0
            tally.judge(breaks_allowed=name == "replica", losses_allowed=name == "redis-cluster")
            tallies.append(tally)
    return tallies


def table(tallies: list[Tally]) -> str:
    lines = [
        "| scenario | seconds | requests | chars served | errors by status | transport errors | hung "
        "| first char p50 / p99 ms | sessions exact | result |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for t in tallies:
        exact = f"{t.sessions_checked - len(t.lost)} / {t.sessions_checked}" if t.sessions_checked else "-"
        result = "pass" if not t.failures else "FAIL: " + "; ".join(t.failures)
        lines.append(
            f"| {t.name} | {t.seconds:.0f} | {t.requests:,} | {t.chars:,} | {t.errors()} | {sum(t.transport.values())} "
            f"| {t.hung} | {t.ttfc_ms()} | {exact} | {result} |"
        )
    return "\n".join(lines)


def details(tallies: list[Tally]) -> str:
    out = []
    for t in tallies:
        n = t.notes
        if t.name == "storm" and "streams" in n:
            out.append(
                f"- storm: {n['streams']} streams dropped after the first token; active generations "
                f"{n['active_after']:g} after {n['drained_s']} s; {n['generated_chars']:,} characters generated in "
                f"all (a stream not aborted would make {STORM_TOKENS:,}); server RSS {n['rss_before_mb']} MB before, "
                f"{n['rss_peak_mb']} MB peak, {n['rss_after_mb']} MB after (allowed: +{n['rss_allowance_mb']} MB)"
            )
        elif t.name == "redis" and "killed_at_s" in n:
            out.append(
                f"- redis: killed at {n['killed_at_s']} s, restarted at {n['restarted_at_s']} s; sessions worked "
                f"again {n['recovered_s']} s after the restart; requests without a session "
                f"answered 503 {n['stateless_503']} times; clients whose last request succeeded "
                f"{n['last_requests_ok']}; sessions still leased after the restart "
                f"{n['sessions_locked_after_restart']}; "
                f"outcomes unknown (503 or broken) allowed for in the session check {n['unsure_outcomes']}"
            )
        elif t.name == "contention" and "accepted" in n:
            out.append(
                f"- contention: {n['accepted']:,} continuations accepted, {n['conflicts']:,} answered 409; "
                f"every session's length is its creation plus the accepted ones"
            )
        elif t.name == "replica" and "killed_at_s" in n:
            out.append(
                f"- replica: one of 2 replicas killed -9 at {n['killed_at_s']} s while it streamed "
                f"{n['sessions_held']} sessions' continuations; it answered again on its address "
                f"{n['replica_back_s']} s later; those sessions could be continued again after "
                f"{n['sessions_freed_s']} s; of the {n['window_requests']} requests sent through nginx meanwhile "
                f"{n['window_answered']:.1%} were answered (failed: {failed(n, 'failed_in_window')}); of the "
                f"{n['in_flight_at_fault']} in flight at the kill, those the dead replica had received failed "
                f"({failed(n, 'in_flight_failed')}): nginx does not send a request twice"
            )
        elif t.name == "redis-cluster" and "killed_at_s" in n:
            out.append(
                f"- redis-cluster: a master of 3 (each with a replica) killed -9 at {n['killed_at_s']} s; its "
                f"replica took over {n['failover_s']} s later; every session served again after "
                f"{n['sessions_served_s']} s; requests without a session failed {n['stateless_failed']} times; "
                f"failed meanwhile: {failed(n, 'failed_in_window')}; "
                f"sessions that lost an acknowledged update: {len(t.lost)}"
            )
        late = n.get("503_after_restart_s")
        if late:
            out.append(
                f"- {t.name}: {len(late)} answers 503 while Redis was up again, {min(late)} to {max(late)} s after "
                "its restart"
            )
    return "\n".join(out)


def failed(notes: dict[str, Any], key: str) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(notes[key].items())) or "none"


def run(cfg: Config, out: Path | None = None, readme: Path | None = None) -> tuple[str, bool]:
    """Run the scenarios; returns the report and whether every expectation held."""
    unknown = set(cfg.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    workdir = Path(tempfile.mkdtemp(prefix="rnnserve-loadtest-"))
    env = {
        "RNNSERVE_MODELS_DIR": str(cfg.models_dir),
        "RNNSERVE_DEFAULT_MODEL": cfg.model,
        "RNNSERVE_LOG_LEVEL": "warning",
        **cfg.env,
    }
    found: dict[str, Tally] = {}
    try:
        one_server = [name for name in cfg.scenarios if name in ONE_SERVER]
        if one_server:
            redis = Redis(workdir)
            server: Server | None = None
            try:
                redis.start()
                server = Server({**env, "RNNSERVE_REDIS_URL": redis.url})
                server.wait_ready()
                on = Targets(server.url, server=server, redis=redis)
                found.update((t.name, t) for t in asyncio.run(run_scenarios(cfg, one_server, on)))
            finally:
                if server is not None:
                    server.stop()
                redis.kill()
        if "replica" in cfg.scenarios:
            with start_cluster(port=free_ports(1)[0], env=env, workdir=workdir / "cluster") as cluster:
                on = Targets(cluster.url, cluster=cluster)
                found.update((t.name, t) for t in asyncio.run(run_scenarios(cfg, ["replica"], on)))
        if "redis-cluster" in cfg.scenarios:
            with start_redis_cluster(workdir / "redis-cluster") as redis_cluster:
                server = Server({**env, "RNNSERVE_REDIS_URL": redis_cluster.url, "RNNSERVE_REDIS_CLUSTER": "true"})
                try:
                    server.wait_ready()
                    on = Targets(server.url, server=server, redis_cluster=redis_cluster)
                    found.update((t.name, t) for t in asyncio.run(run_scenarios(cfg, ["redis-cluster"], on)))
                finally:
                    server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tallies = [found[name] for name in cfg.scenarios]
    passed = all(not t.failures for t in tallies)
    report = (
        f"Measured on {machine()}; model {cfg.model}, {cfg.seconds:g} s per scenario, {cfg.clients} clients "
        f"({cfg.contention_clients} on {cfg.contention_sessions} sessions in contention), "
        f"{cfg.storm_streams} storm streams in waves of {cfg.storm_wave}, max_tokens {cfg.max_tokens}, "
        f"hung after {cfg.deadline:g} s.\n\n" + table(tallies)
    )
    extra = details(tallies)
    if extra:
        report += "\n\n" + extra
    if out is not None:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}
        doc = {"machine": machine(), "config": config, "passed": passed, "scenarios": [t.to_json() for t in tallies]}
        out.write_text(json.dumps(doc, indent=2, default=dict) + "\n")
    if readme is not None:
        write_section(readme, "loadtest", report)
    return report, passed
