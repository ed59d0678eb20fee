"""The engine: per model, one loop batches every running generation into each recurrent step."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from app import metrics
from app.checkpoint import Checkpoint
from app.engine.compute import Compute
from app.engine.generate import CHUNK, beam_generation, prefill_steps, read, score_steps
from app.engine.inspect import Trace, inspect
from app.engine.sampling import draw, filter_logits, softmax
from app.engine.sequence import GenerationRequest, GenerationResult, Sequence
from app.errors import NotFoundError, OverloadedError, UnavailableError
from app.nn import CharRNN, FusedStep, State, Step, select_state, stack_states, state_from_parts, state_parts

log = logging.getLogger(__name__)

# Where the step's kernels give a row different bits at different batch sizes (as torch's CPU
# matmuls can), steps run on a batch padded to a multiple of this many rows: a row then gets the
# same bits whatever else is in the batch, so a seeded request's text never depends on load.
ROW_MULTIPLE = 8
# One trip to the compute thread decodes steps until this much time has passed (or something needs
# the event loop: a request waiting to join, a prompt being read, a row's first character or end).
# The cost of a trip and of a stream event is then paid once per burst of characters, not per step.
STEP_BUDGET_S = 0.02
# Each stream a trip touches costs an event (an SSE frame or a WebSocket message, sent here and
# parsed by the client, on the cores the steps need): a trip lasts at least this long per running
# row, so a full batch sends about 1,000 events a second, however many rows it has (on 2 cores,
# 2,000 a second cost 10-15% of the throughput at 32 and 128 streams).
TRIP_S_PER_ROW = 0.001
# A step reads about this many chunks' worth of prompt characters, over all the streams still
# reading theirs (together where one call can read them all, else one at a time, round robin): a
# burst of new requests then neither stalls the running streams for long nor waits for all the
# others' prompts before its first character.
PREFILL_CHUNKS_PER_STEP = 4
# Where prompts are read together (each row to its own length, in one call), each takes at least
# this many characters per step, however many there are.
READ_MIN_WIDTH = 16


class Stream:
    """A client's view of one generation: coalesced text pieces, then the result."""

    def __init__(self, engine: ModelEngine, seq: Sequence) -> None:
        self.engine = engine
        self.seq = seq
        self.admitted_at = self.last_text_at = time.perf_counter()
        self.texts: list[str] = []
        self.result: GenerationResult | None = None
        self.delivered = False
        self.sent = 0  # characters handed to the client so far
        self._ready = asyncio.Event()
        self._done_callbacks: list[Callable[[], None]] = []

    def push_text(self, text: str) -> None:
        now = time.perf_counter()
        model = self.engine.ckpt.name
        if self.last_text_at == self.admitted_at:
            metrics.TTFC.labels(model).observe(now - self.admitted_at)
        else:
            metrics.INTER_CHAR.labels(model).observe((now - self.last_text_at) / len(text))
        self.last_text_at = now
        self.texts.append(text)
        self._ready.set()

    def finish(self, result: GenerationResult) -> None:
        self.result = result
        self.engine.streams.discard(self)
        self._ready.set()
        for callback in self._done_callbacks:
            callback()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the generation has ended, however it ended."""
        self._done_callbacks.append(callback)

    async def next(self, timeout: float | None = None) -> str | GenerationResult | None:
        """All text made since the last call (at least one character), else the result once done.

        None when `timeout` passes with nothing new. After the result, raises StopAsyncIteration.
        """
        if not self.texts and self.result is None:
            try:
                async with asyncio.timeout(timeout):  # unlike wait_for, no task per call
                    await self._ready.wait()
            except TimeoutError:
                return None
        self._ready.clear()
        if self.texts:
            text = "".join(self.texts)
            self.texts.clear()
            self.sent += len(text)
            return text
        if self.result is not None and not self.delivered:
            self.delivered = True
            return self.result
        raise StopAsyncIteration

    def abort(self) -> None:
        """Stop the generation (a no-op once it is done); its slot is freed at the next step."""
        if self.result is None:
            self.seq.cancelled = True


class ModelEngine:
    """Continuous batching for one model: requests join and leave between steps.

    `naive=True` gives the baseline it is measured against: one request at a time, one
    `nn.LSTM`/`nn.GRU`/`nn.RNN` call per character (prompt included), no padding, no fused step.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        max_batch: int,
        max_queue: int,
        prefill_chunk: int = CHUNK,
        naive: bool = False,
        step: str = "torch",
        step_budget: float = STEP_BUDGET_S,
        compute: Compute | None = None,
        weights: str = "fp32",
    ) -> None:
        """Runs torch work (building the step included): call it on the compute thread it is given."""
        self.ckpt = ckpt
        self.model = ckpt.model
        self.naive = naive
        if naive:
            max_batch = 1
        self.fused = None if naive else make_step(ckpt.model, step, weights)
        self.row_multiple = 1 if self.fused is None else row_multiple(self.fused, ckpt.model)
        self.reader = make_reader(ckpt.model, "naive" if naive else step)
        # prompts are read together only where a row's result cannot depend on the others (calls
        # padded to this many rows); 0: one at a time
        self.read_rows = read_min_rows(self.reader, ckpt.model) if step == "onnx" and not naive else 0
        self.step_budget = 0.0 if naive else step_budget  # the baseline: one step per trip
        self.decode = ckpt.vocab.chars
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Stream] = deque()
        self.prefilling: list[Stream] = []  # admitted, prompt still being fed
        self.running: list[Stream] = []  # rows of self.state, in order
        self.state: State | None = None
        self.beams = 0
        self.steps = 0
        self.draining = False
        self.stopped = False
        self.streams: set[Stream] = set()  # every admitted stream not yet finished
        self._wake = asyncio.Event()
        self._own_compute = compute is None
        self.compute = compute or Compute()
        self.sampler = RowSampler([])
        # compute-thread seconds of the current trip by phase, added to the metric when it ends
        self.spent = dict.fromkeys(metrics.PHASES, 0.0)
        self.seconds = {phase: metrics.ENGINE_SECONDS.labels(ckpt.name, phase) for phase in metrics.PHASES}
        self.batch_sizes = metrics.BATCH.labels(ckpt.name)  # looked up once, observed every step
        self.chars_made = metrics.CHARS.labels(ckpt.name)
        self._task: asyncio.Task[None] | None = None

    # -- public --------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running) + self.beams

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"engine-{self.ckpt.name}")

    async def stop(self) -> None:
        self.stopped = True  # a trip under way ends after its current step
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_compute:
            self.compute.shutdown()

    def submit(self, req: GenerationRequest, state: State | None = None) -> Stream:
        """Queue a generation; raises OverloadedError when the queue is full."""
        if self.draining:
            raise UnavailableError("the server is shutting down; retry on another replica", param=None)
        if self.load >= self.max_batch + self.max_queue:
            raise OverloadedError(
                f"model {self.ckpt.name} is at capacity ({self.max_batch} running, {self.max_queue} queued); "
                "retry shortly",
                retry_after=1,
            )
        stream = Stream(self, Sequence(req, self.decode, state))
        self.streams.add(stream)
        if req.params.strategy == "beam":
            self.beams += 1
            asyncio.get_running_loop().create_task(self._run_beam(stream))
        else:
            self.waiting.append(stream)
            self._wake.set()
        return stream

    async def score(self, ids: list[int], state: State | None = None) -> list[float]:
        return await self.compute.run_steps(score_steps(self.model, ids, state), STEP_BUDGET_S)

    async def prefill(self, ids: list[int], state: State | None = None) -> State:
        return await self.compute.run_steps(prefill_steps(self.model, ids, state), STEP_BUDGET_S)

    async def inspect(
        self, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
    ) -> Trace:
        return await self.compute.run(inspect, self.model, ids, text, layer, kind, units, top)

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not (self.waiting or self.prefilling or self.running):
                self._wake.clear()
                await self._wake.wait()
                continue
            room = self.max_batch - len(self.running) - len(self.prefilling)
            gone = [s for s in self.waiting if s.seq.cancelled]  # leave the queue now, without a row
            for stream in gone:
                self.waiting.remove(stream)
            admitted = gone + [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                touched = await self.compute.run(self._steps, admitted)
            except Exception:
                log.exception("engine step failed for model %s; failing its running requests", self.ckpt.name)
                touched = self._fail_all()
            name = self.ckpt.name
            metrics.QUEUE.labels(name).set(len(self.waiting))
            metrics.ACTIVE.labels(name).set(self.load)
            for stream in touched:
                text = stream.seq.take_unsent()
                if text:
                    stream.push_text(text)
                if stream.seq.final is not None and stream.result is None:
                    stream.finish(stream.seq.final)

    @torch.inference_mode()
    def _steps(self, admitted: list[Stream]) -> list[Stream]:
        """One trip off the event loop: a step, then more while every row just keeps decoding and
        the step budget lasts. Returns the streams with news (each once, in order)."""
        start = time.perf_counter()
        deadline = start + trip_budget(self.step_budget, len(self.running))
        try:
            news = self._step(admitted)
            touched = dict.fromkeys(news)
            while self._only_decoding(news) and time.perf_counter() < deadline:
                news = self._step([])
                touched.update(dict.fromkeys(news))
            return list(touched)
        finally:
            self._account(time.perf_counter() - start)

    def _account(self, trip: float) -> None:
        """Add a trip's seconds to the metric by phase; what the phases do not cover is bookkeeping."""
        self.spent["bookkeeping"] = max(0.0, trip - sum(self.spent.values()))
        for phase, seconds in self.spent.items():
            self.seconds[phase].inc(seconds)
            self.spent[phase] = 0.0

    def _only_decoding(self, news: list[Stream]) -> bool:
        """Whether the next step can run without the event loop's attention in between (`news`:
        the streams the last step touched)."""
        if self.waiting or self.prefilling or not self.running or self.stopped:
            return False
        if any(s.seq.final is not None for s in news):  # a finished row's client gets its result now
            return False
        # a row's first character goes out at once (time to first character); a cancelled row
        # leaves at once
        return all(
            s.last_text_at != s.admitted_at and s.seq.finish_reason is None and not s.seq.cancelled
            for s in self.running
        )

    def _step(self, admitted: list[Stream]) -> list[Stream]:
        """One engine step, off the event loop: feed prompts a chunk further, then decode one character."""
        touched: list[Stream] = []
        self.prefilling.extend(admitted)
        for stream in [s for s in self.prefilling if s.seq.cancelled]:
            self.prefilling.remove(stream)
            stream.seq.cancel()
            stream.seq.finish(None)  # the prompt was not fully read: no state to continue from
            touched.append(stream)
        ready, ended = self._read_prompts() if self.prefilling else ([], [])
        self._join(ready)  # nothing to read: the step makes their first character
        for stream in self.running:
            if stream.seq.cancelled:
                stream.seq.cancel()
        touched += self._leave()  # before the step, which would feed them their pending character
        if self.running:
            self._decode_one()
        self.steps += 1
        touched += self._leave()
        # a prompt read to its end gave its first character: the row joins after this step's decode,
        # so that character goes out now
        for stream in ended:
            seq = stream.seq
            if seq.finish_reason is not None:
                assert seq.state is not None
                seq.started(seq.state)
                seq.finish(seq.state)
                touched.append(stream)
        self._join([s for s in ended if s.seq.finish_reason is None])
        touched.extend(self.running)
        return touched

    def _leave(self) -> list[Stream]:
        """Rows that finished leave the batch with their state (after all but their pending character)."""
        done = [i for i, s in enumerate(self.running) if s.seq.finish_reason is not None]
        if not done:
            return []
        assert self.state is not None
        for i in done:
            self.running[i].seq.finish(select_state(self.state, torch.tensor([i])))
        keep = [i for i in range(len(self.running)) if i not in set(done)]
        self.state = select_state(self.state, torch.tensor(keep, dtype=torch.long)) if keep else None
        left = [self.running[i] for i in done]
        self.running = [self.running[i] for i in keep]
        return left

    def _join(self, streams: list[Stream]) -> None:
        """Streams become rows of the batch; their states move into it."""
        if not streams:
            return
        states = [s.seq.state if s.seq.state is not None else self.model.zero_state(1) for s in streams]
        self.state = stack_states(([self.state] if self.state is not None else []) + states)
        self.running.extend(streams)
        for stream, state in zip(streams, states, strict=True):
            stream.seq.started(state)
            stream.seq.state = None  # it lives in the batch now

    def _read_prompts(self) -> tuple[list[Stream], list[Stream]]:
        """Feed the prompts being read a chunk further. Returns the streams with nothing to read
        (their first step comes next), and those whose prompt ended, their first character made."""
        ready = [s for s in self.prefilling if not s.seq.to_prefill]
        reading = [s for s in self.prefilling if s.seq.to_prefill]
        budget = PREFILL_CHUNKS_PER_STEP * self.prefill_chunk  # prompt characters this step may read
        groups: list[tuple[list[Stream], int]] = []
        if self.read_rows and reading:  # every prompt at once, a slice of each
            groups.append((reading, min(self.prefill_chunk, max(READ_MIN_WIDTH, budget // len(reading)))))
        else:  # one prompt per call, a chunk each, round robin
            for stream in reading:
                if budget <= 0:
                    break
                groups.append(([stream], self.prefill_chunk))
                budget -= min(len(stream.seq.to_prefill), self.prefill_chunk)
        ended = [stream for group, width in groups for stream in self._read(group, width)]
        took = {s for group, _ in groups for s in group}
        # round robin: the streams that read this step go to the back of the line
        self.prefilling = [s for s in reading if s not in took] + [s for s in reading if s in took and s.seq.to_prefill]
        return ready, ended

    def _read(self, streams: list[Stream], width: int) -> list[Stream]:
        """The next `width` prompt characters of each stream, in one call; returns the streams whose
        prompt ended, their first character chosen from the logits after it."""
        seqs = [s.seq for s in streams]
        start = time.perf_counter()
        pad = max(0, self.read_rows - len(seqs))  # dummy rows of one character
        rows = [seq.to_prefill[:width] for seq in seqs] + [[0]] * pad
        states = [seq.state if seq.state is not None else self.model.zero_state(1) for seq in seqs]
        logits, state = self.reader(rows, stack_states(states + ([self.model.zero_state(pad)] if pad else [])))
        ended = []
        for i, seq in enumerate(seqs):
            seq.to_prefill = seq.to_prefill[width:]
            seq.state = select_state(state, torch.tensor([i]))
            if not seq.to_prefill:
                ended.append(i)
        done_reading = time.perf_counter()
        self.spent["prefill"] += done_reading - start
        if ended:
            first = [seqs[i] for i in ended]
            chosen = RowSampler(first).choose(logits[ended])
            for i, seq, nxt in zip(ended, first, chosen, strict=True):
                seq.advance(logits[i], nxt)
            self.chars_made.inc(len(ended))
            self.spent["choose"] += time.perf_counter() - done_reading
        return [streams[i] for i in ended]

    def _decode_one(self) -> None:
        assert self.state is not None
        n = len(self.running)
        pad = -n % self.row_multiple
        ids = torch.from_numpy(np.array([s.seq.pending for s in self.running] + [0] * pad, dtype=np.int64))  # (B,)
        state = self.state
        if pad:
            state = stack_states([state, self.model.zero_state(pad)])
        start = time.perf_counter()
        if self.fused is not None:
            logits, state = self.fused(ids, state)  # (B, V)
        else:
            out, state = self.model(ids.view(1, -1), state)
            logits = out[0]
        stepped = time.perf_counter()
        self.spent["step"] += stepped - start
        self.state = select_state(state, torch.arange(n)) if pad else state
        self.batch_sizes.observe(n)
        seqs = [s.seq for s in self.running]
        if not self.sampler.fits(seqs):  # the batch changed: the sampling columns are rebuilt
            self.sampler = RowSampler(seqs)
        chosen = self.sampler.choose(logits[:n] if pad else logits)
        made = 0
        for i, seq in enumerate(seqs):
            if seq.finish_reason is None:
                seq.advance(logits[i] if seq.req.logprobs else None, chosen[i])
                made += 1
        self.chars_made.inc(made)
        self.spent["choose"] += time.perf_counter() - stepped

    def _fail_all(self) -> list[Stream]:
        failed = self.prefilling + self.running
        for stream in failed:
            stream.seq.cancel()
            stream.seq.finish(None)
        self.prefilling, self.running, self.state = [], [], None
        return failed

    async def _run_beam(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        seq = stream.seq

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(stream.push_text, text)

        try:
            steps = beam_generation(self.model, self.decode, seq.req, seq.state, on_text, lambda: seq.cancelled)
            result = await self.compute.run_steps(steps, self.step_budget)
        except Exception:
            log.exception("beam search failed for model %s", self.ckpt.name)
            seq.cancel()
            result = seq.result(None)
        finally:
            self.beams -= 1
        await asyncio.sleep(0)  # let the callbacks scheduled by the compute thread run first
        streamed = sum(len(t) for t in stream.texts) + stream.sent
        rest = self.decode_ids(result.ids)[streamed:]
        if rest:
            stream.push_text(rest)
        stream.finish(result)

    def decode_ids(self, ids: list[int]) -> str:
        return "".join(self.decode[i] for i in ids)

    def abort_all(self) -> None:
        for stream in list(self.streams):
            stream.abort()


def trip_budget(step_budget: float, rows: int) -> float:
    """Seconds of steps in one trip: the step budget, longer for a large batch; 0 (one step) stays 0."""
    return max(step_budget, TRIP_S_PER_ROW * rows) if step_budget else 0.0


class RowSampler:
    """The next character of every row of a batch at once: argmax for greedy rows; for sampling
    rows, their own filters and one uniform draw from their own generator each (as
    `sampling.choose`). Built once per batch composition: per step, only the logits are new."""

    def __init__(self, seqs: list[Sequence]) -> None:
        self.key = self._key(seqs)
        self.rows = [i for i, seq in enumerate(seqs) if seq.params.strategy == "sample" and seq.finish_reason is None]
        self.sampling = [seqs[i] for i in self.rows]
        params = [seq.params for seq in self.sampling]
        # a filter that is off for every row is passed as its scalar "off" value, so it is skipped
        self.temperature = self._column([p.temperature for p in params], 1.0)
        self.top_k = self._column([p.top_k for p in params], 0)
        self.top_p = self._column([p.top_p for p in params], 1.0)
        self.min_p = self._column([p.min_p for p in params], 0.0)
        columns = (self.temperature, self.top_k, self.top_p, self.min_p)
        self.filtering = any(isinstance(c, torch.Tensor) for c in columns)  # a filter on for some row

    @staticmethod
    def _key(seqs: list[Sequence]) -> tuple[int, ...]:
        return tuple(seq.id if seq.finish_reason is None else -1 for seq in seqs)

    @staticmethod
    def _column(values: list[float], off: float) -> torch.Tensor | float:
        if all(v == off for v in values):
            return off
        return torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # (R, 1)

    def fits(self, seqs: list[Sequence]) -> bool:
        return self._key(seqs) == self.key

    def choose(self, logits: torch.Tensor) -> list[int]:
        if not self.rows:
            return logits.argmax(dim=-1).tolist()
        every = len(self.rows) == logits.shape[0]  # every row samples: no gather, no scatter
        sampled = logits if every else logits[self.rows]
        if self.filtering:
            sampled = filter_logits(sampled, self.temperature, self.top_k, self.top_p, self.min_p)
        drawn = draw(softmax(sampled), [seq.uniform() for seq in self.sampling])
        if every:
            return drawn
        chosen = logits.argmax(dim=-1).tolist()
        for row, nxt in zip(self.rows, drawn, strict=True):
            chosen[row] = nxt
        return chosen


# rows of prompt ids (each not empty) and their state -> the logits after each row's last id (B, V), the state there
Reader = Callable[[list[list[int]], State], tuple[torch.Tensor, State]]


def make_step(model: CharRNN, kind: str, weights: str = "fp32") -> Step:
    """The decoding step: ONNX Runtime's run of the fused step ("onnx", on fp32 or int8 weights), or the
    fused step in torch (fp32)."""
    if kind == "onnx":
        from app.nn.onnx_step import OnnxStep

        return OnnxStep(model, threads=torch.get_num_threads(), weights=weights)
    if weights != "fp32":
        raise ValueError(f"{weights} weights run on ONNX Runtime's step only")
    return FusedStep(model)


def make_reader(model: CharRNN, kind: str) -> Reader:
    """The prompt reader: ONNX Runtime's whole-sequence ops over many rows ("onnx"), torch's whole-sequence
    kernel one row at a time ("torch"), or the baseline's one recurrent call per character ("naive")."""
    if kind == "onnx":
        from app.nn.onnx_step import OnnxPrefill

        return OnnxPrefill(model, threads=torch.get_num_threads())

    def one_row(rows: list[list[int]], state: State) -> tuple[torch.Tensor, State]:
        (ids,) = rows
        if kind == "naive":
            for i in ids:
                out, state = model(torch.tensor([[i]]), state)
            return out[0], state
        logits, state = read(model, ids, state)
        return logits.unsqueeze(0), state

    return one_row


def _noise_state(model: CharRNN, rows: int, g: torch.Generator) -> State:
    """A state of `rows` rows with values in (-1, 1), as after some text."""
    return state_from_parts([torch.randn(t.shape, generator=g).tanh() for t in state_parts(model.zero_state(rows))])


def _same(a: tuple[torch.Tensor, State], b: tuple[torch.Tensor, State]) -> bool:
    pairs = zip((a[0], *state_parts(a[1])), (b[0], *state_parts(b[1])), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@torch.inference_mode()
def read_min_rows(reader: Reader, model: CharRNN, rows: int = 12) -> int:
    """The fewest rows a call of `reader` must have for every row to get the same bits whatever the
    other rows and their lengths, with two calls giving the bits of one (ONNX Runtime's kernels do,
    from 1 row for LSTM and GRU, from 2 for RNN, on the CPUs measured); 0 where there is none: prompts
    are then read one at a time, in fixed chunks."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (rows,), generator=g).tolist()
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    state = _noise_state(model, rows, g)
    whole = reader(ids, state)
    _, half = reader([row[: len(row) // 2] for row in ids], state)
    if not _same(reader([row[len(row) // 2 :] for row in ids], half), whole):
        return 0
    alike = [
        all(
            _same(
                reader(ids[first : first + n], select_state(state, part)),
                (whole[0][part], select_state(whole[1], part)),
            )
            for first in (0, rows - n)
            for part in [torch.arange(first, first + n)]
        )
        for n in range(1, rows)
    ]
    return next((least for least in (1, 2) if all(alike[least - 1 :])), 0)


@torch.inference_mode()
def row_multiple(step: Step, model: CharRNN, rows: int = 16) -> int:
    """1 when `step` gives each row the same bits at every batch size from 1 to `rows` (ONNX
    Runtime's kernels do on the CPUs measured), else ROW_MULTIPLE: batches are then padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows,), generator=g)
    full = _noise_state(model, rows, g)
    logits, after = step(ids, full)
    for n in range(1, rows):
        first = torch.arange(n)
        if not _same(step(ids[:n], select_state(full, first)), (logits[:n], select_state(after, first))):
            return ROW_MULTIPLE
    return 1


class Engine:
    """The engines of all loaded models."""

    def __init__(
        self,
        max_batch: int,
        max_queue: int,
        naive: bool = False,
        step: str = "torch",
        step_budget: float = STEP_BUDGET_S,
        compute: Compute | None = None,
        weights: str = "fp32",
    ) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.naive = naive
        self.step = step
        self.weights = weights
        self.step_budget = step_budget
        self.compute = compute or Compute()  # shared by the models' engines
        self.engines: dict[str, ModelEngine] = {}
        # by id(checkpoint): engines of replaced or removed weights, finishing what they run
        self.retired: weakref.WeakValueDictionary[int, ModelEngine] = weakref.WeakValueDictionary()

    async def start(self, models: dict[str, Checkpoint]) -> None:
        for name, ckpt in models.items():
            self.engines[name] = await self.compute.run(self._engine, ckpt)
            self.engines[name].start()

    def _engine(self, ckpt: Checkpoint) -> ModelEngine:
        return ModelEngine(
            ckpt, self.max_batch, self.max_queue, naive=self.naive, step=self.step, step_budget=self.step_budget,
            compute=self.compute, weights=self.weights,
        )  # fmt: skip

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines.values()))
        self.compute.shutdown()

    def drain(self, grace: float) -> None:
        """Stop admitting; `grace` seconds later, cancel what still runs (its clients get `done`)."""
        for e in [*self.engines.values(), *self.retired.values()]:
            e.draining = True
        asyncio.get_running_loop().call_later(grace, self.abort_all)

    def abort_all(self) -> None:
        for e in [*self.engines.values(), *self.retired.values()]:
            e.abort_all()

    def __getitem__(self, ckpt: Checkpoint) -> ModelEngine:
        engine = self.engines.get(ckpt.name)
        if engine is None or engine.ckpt is not ckpt:  # the weights changed while a request held these
            engine = self.retired.get(id(ckpt))
        if engine is None:
            raise NotFoundError(f"model {ckpt.name!r} was replaced or removed; retry", param="model")
        return engine

    async def score(self, ckpt: Checkpoint, ids: list[int], state: State | None = None) -> list[float]:
        """Per-character logprobs of ids[1:], off the event loop."""
        return await self[ckpt].score(ids, state)

    async def prefill(self, ckpt: Checkpoint, ids: list[int], state: State | None = None) -> State:
        """The state after reading `ids` from `state`, off the event loop."""
        return await self[ckpt].prefill(ids, state)

    async def inspect(
        self, ckpt: Checkpoint, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
    ) -> Trace:
        """The per-character trace of a text (ids: BOS first), off the event loop."""
        return await self[ckpt].inspect(ids, text, layer, kind, units, top)
