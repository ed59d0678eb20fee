"""The engine: per model, one loop batches every running generation into each recurrent step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from app import metrics
from app.checkpoint import Checkpoint
from app.engine.generate import prefill, run_beam, score
from app.engine.inspect import Trace, inspect
from app.engine.sampling import draw, filter_logits
from app.engine.sequence import GenerationRequest, GenerationResult, Sequence
from app.errors import OverloadedError, UnavailableError
from app.nn import CharRNN, FusedStep, State, select_state, stack_states

log = logging.getLogger(__name__)

# Steps run on a batch padded to a multiple of this many rows: CPU matmul kernels then give a row
# the same bits whatever else is in the batch, so a seeded request's text never depends on load.
ROW_MULTIPLE = 8
# One trip to the worker thread decodes steps until this much time has passed (or something needs
# the event loop: a request waiting to join, a prompt being read, a row's first character or end).
# The cost of a trip and of a stream event is then paid once per burst of characters, not per step.
STEP_BUDGET_S = 0.02


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
                await asyncio.wait_for(self._ready.wait(), timeout)
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
        prefill_chunk: int = 1024,
        naive: bool = False,
        step: str = "torch",
        step_budget: float = STEP_BUDGET_S,
    ) -> None:
        self.ckpt = ckpt
        self.model = ckpt.model
        self.naive = naive
        if naive:
            max_batch = 1
        self.fused = None if naive else make_step(ckpt.model, step)
        self.row_multiple = 1 if naive else ROW_MULTIPLE
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
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{ckpt.name}")
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
        self._executor.shutdown(wait=True)

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
        return await asyncio.to_thread(score, self.model, ids, state)

    async def inspect(
        self, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
    ) -> Trace:
        return await asyncio.to_thread(inspect, self.model, ids, text, layer, kind, units, top)

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
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
                touched = await loop.run_in_executor(self._executor, self._steps, admitted)
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
        deadline = time.perf_counter() + self.step_budget
        news = self._step(admitted)
        touched = dict.fromkeys(news)
        while self._only_decoding(news) and time.perf_counter() < deadline:
            news = self._step([])
            touched.update(dict.fromkeys(news))
        return list(touched)

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
        joined = []
        for stream in list(self.prefilling):
            seq = stream.seq
            if seq.cancelled:
                self.prefilling.remove(stream)
                seq.cancel()
                seq.finish(None)  # the prompt was not fully read: no state to continue from
                touched.append(stream)
                continue
            if seq.state is None:
                seq.state = self.model.zero_state(1)
            chunk, seq.to_prefill = seq.to_prefill[: self.prefill_chunk], seq.to_prefill[self.prefill_chunk :]
            if self.naive:  # the baseline reads its prompt one recurrent call per character
                for i in chunk:
                    _, seq.state = self.model(torch.tensor([[i]]), seq.state)
            else:
                seq.state = prefill(self.model, chunk, seq.state)
            if not seq.to_prefill:
                self.prefilling.remove(stream)
                joined.append(stream)
        if joined:
            states = [s.seq.state for s in joined if s.seq.state is not None]
            self.state = stack_states(([self.state] if self.state is not None else []) + states)
            self.running.extend(joined)
        for stream in joined:
            stream.seq.start_state, stream.seq.state = stream.seq.state, None  # it lives in the batch now
        for stream in self.running:
            if stream.seq.cancelled:
                stream.seq.cancel()
        if any(s.seq.finish_reason is None for s in self.running):
            self._decode_one()
        self.steps += 1
        # rows that finished leave the batch with their state
        done = [i for i, s in enumerate(self.running) if s.seq.finish_reason is not None]
        if done:
            assert self.state is not None
            for i in done:
                self.running[i].seq.finish(select_state(self.state, torch.tensor([i])))
            keep = [i for i in range(len(self.running)) if i not in set(done)]
            self.state = select_state(self.state, torch.tensor(keep, dtype=torch.long)) if keep else None
            touched.extend(self.running[i] for i in done)
            self.running = [self.running[i] for i in keep]
        touched.extend(self.running)
        return touched

    def _decode_one(self) -> None:
        assert self.state is not None
        n = len(self.running)
        pad = -n % self.row_multiple
        ids = torch.tensor([s.seq.pending for s in self.running] + [0] * pad)  # (B,)
        state = self.state
        if pad:
            state = stack_states([state, self.model.zero_state(pad)])
        if self.fused is not None:
            logits, state = self.fused(ids, state)  # (B, V)
        else:
            out, state = self.model(ids.view(1, -1), state)
            logits = out[0]
        self.state = select_state(state, torch.arange(n)) if pad else state
        metrics.BATCH.labels(self.ckpt.name).observe(n)
        metrics.CHARS.labels(self.ckpt.name).inc(sum(s.seq.finish_reason is None for s in self.running))
        chosen = choose_rows(logits[:n], [s.seq for s in self.running])
        for i, stream in enumerate(self.running):
            if stream.seq.finish_reason is None:
                stream.seq.advance(logits[i], chosen[i])

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
            result = await asyncio.to_thread(
                run_beam, self.model, self.decode, seq.req, seq.state, on_text, lambda: seq.cancelled
            )
        except Exception:
            log.exception("beam search failed for model %s", self.ckpt.name)
            seq.cancel()
            result = seq.result(None)
        finally:
            self.beams -= 1
        await asyncio.sleep(0)  # let the callbacks scheduled by the worker run first
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


def choose_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The next character of every row at once: argmax for greedy rows; for sampling rows, their
    own filters and one uniform draw from their own generator each (as `sampling.choose`)."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, seq in enumerate(seqs) if seq.params.strategy == "sample" and seq.finish_reason is None]
    if rows:
        params = [seqs[i].params for i in rows]
        column = [[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                  [p.min_p for p in params]]  # fmt: skip
        temperature, top_k, top_p, min_p = (torch.tensor(c, dtype=logits.dtype).unsqueeze(1) for c in column)
        probs = torch.softmax(filter_logits(logits[rows], temperature, top_k, top_p, min_p), dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=seqs[i].generator, dtype=torch.float64) for i in rows])
        chosen[rows] = draw(probs, uniforms)
    return chosen.tolist()


def make_step(model: CharRNN, kind: str) -> Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]:
    """The decoding step: ONNX Runtime's run of the fused step ("onnx"), or the fused step in torch."""
    if kind == "onnx":
        from app.nn.onnx_step import OnnxStep

        return OnnxStep(model, threads=torch.get_num_threads())
    return FusedStep(model)


class Engine:
    """The engines of all loaded models."""

    def __init__(
        self,
        max_batch: int,
        max_queue: int,
        naive: bool = False,
        step: str = "torch",
        step_budget: float = STEP_BUDGET_S,
    ) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.naive = naive
        self.step = step
        self.step_budget = step_budget
        self.engines: dict[str, ModelEngine] = {}

    def start(self, models: dict[str, Checkpoint]) -> None:
        for name, ckpt in models.items():
            self.engines[name] = ModelEngine(
                ckpt, self.max_batch, self.max_queue, naive=self.naive, step=self.step, step_budget=self.step_budget
            )
            self.engines[name].start()

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines.values()))

    def drain(self, grace: float) -> None:
        """Stop admitting; `grace` seconds later, cancel what still runs (its clients get `done`)."""
        for e in self.engines.values():
            e.draining = True
        asyncio.get_running_loop().call_later(grace, self.abort_all)

    def abort_all(self) -> None:
        for e in self.engines.values():
            e.abort_all()

    def __getitem__(self, ckpt: Checkpoint) -> ModelEngine:
        return self.engines[ckpt.name]

    async def score(self, ckpt: Checkpoint, ids: list[int], state: State | None = None) -> list[float]:
        """Per-character logprobs of ids[1:], off the event loop."""
        return await self[ckpt].score(ids, state)

    async def inspect(
        self, ckpt: Checkpoint, ids: list[int], text: str, layer: int, kind: str, units: list[int] | None, top: int
    ) -> Trace:
        """The per-character trace of a text (ids: BOS first), off the event loop."""
        return await self[ckpt].inspect(ids, text, layer, kind, units, top)
