"""ModelEngine: one model's loop, which batches every running generation into each recurrent step."""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from app import metrics
from app.checkpoint import Checkpoint
from app.engine.compute import Compute
from app.engine.config import STEP_BUDGET_S, EngineConfig
from app.engine.generate import beam_generation, prefill_steps
from app.engine.kernels import Kernels, make_kernels
from app.engine.runner import Runner
from app.engine.scheduler import Scheduler
from app.engine.sequence import GenerationRequest, GenerationResult, Sequence
from app.engine.stream import Stream
from app.errors import OverloadedError, UnavailableError
from app.nn import State

log = logging.getLogger(__name__)

# Each stream a trip touches costs an event (an SSE frame or a WebSocket message, on the cores the
# steps need): a trip lasts at least this long per running row, so a full batch sends a bounded
# number of events a second, however many rows it has.
TRIP_S_PER_ROW = 0.001


def trip_budget(step_budget: float, rows: int) -> float:
    """Seconds of steps in one trip: the step budget, longer for a large batch; 0 (one step) stays 0."""
    return max(step_budget, TRIP_S_PER_ROW * rows) if step_budget else 0.0


class ModelEngine:
    """Continuous batching for one model: requests join and leave between steps. Each step, the
    scheduler plans and the runner carries the plan out, on the compute thread.

    The naive backend is the baseline it is measured against: one request at a time, one
    `nn.LSTM`/`nn.GRU`/`nn.RNN` call per character (prompt included), no padding, no fused step.
    """

    def __init__(self, ckpt: Checkpoint, config: EngineConfig, compute: Compute | None = None) -> None:
        """Builds the kernels: call it on the compute thread it is given."""
        self.ckpt = ckpt
        self.config = config
        self.chars = ckpt.vocab.chars
        kernels = make_kernels(ckpt.model, config)
        self.scheduler = Scheduler(config.rows, config.prefill_chunk, prefill_together=kernels.prefill_rows > 0)
        self.runner = Runner(ckpt.name, ckpt.model, kernels)
        self.step_budget = config.trip_budget
        self.beams = 0
        self.steps = 0
        self.draining = False
        self.stopped = False
        self.streams: dict[int, Stream] = {}  # every admitted stream not yet finished, by its sequence's id
        self._wake = asyncio.Event()
        self._own_compute = compute is None
        self.compute = compute or Compute()
        self._task: asyncio.Task[None] | None = None

    @property
    def kernels(self) -> Kernels:
        return self.runner.kernels

    @property
    def load(self) -> int:
        return self.scheduler.load + self.beams

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
        rows, queue = self.config.rows, self.config.max_queue
        if self.load >= rows + queue:
            raise OverloadedError(
                f"model {self.ckpt.name} is at capacity ({rows} running, {queue} queued); retry shortly",
                retry_after=1,
            )
        seq = Sequence(req, self.chars, state)
        stream = Stream(seq, self.ckpt.name, self.prefill)
        self.streams[seq.id] = stream
        if req.params.strategy == "beam":
            self.beams += 1
            asyncio.get_running_loop().create_task(self._run_beam(stream))
        else:
            self.scheduler.add(seq)
            self._wake.set()
        return stream

    async def prefill(self, ids: list[int], state: State | None = None) -> State:
        """The state after `ids` from `state` (None: the zero state), off the event loop."""
        return await self.compute.run_steps(prefill_steps(self.ckpt.model, ids, state), STEP_BUDGET_S)

    def abort_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.abort()

    async def _loop(self) -> None:
        while True:
            if self.scheduler.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted = self.scheduler.admit()
            try:
                touched = await self.compute.run(self._trip, admitted)
            except Exception:
                log.exception("engine step failed for model %s; failing its running requests", self.ckpt.name)
                self.scheduler.fail_all()
                self.runner.reset()
                # every admitted sequence has ended, some of them before the failure
                touched = [stream.seq for stream in self.streams.values() if stream.seq.final is not None]
            name = self.ckpt.name
            metrics.QUEUE.labels(name).set(len(self.scheduler.waiting))
            metrics.ACTIVE.labels(name).set(self.load)
            for seq in touched:
                stream = self.streams.get(seq.id)
                if stream is None:  # already finished
                    continue
                text = seq.take_unsent()
                if text:
                    stream.push_text(text)
                    seq.shown = True
                if seq.final is not None:
                    self._finish(stream, seq.final)

    def _finish(self, stream: Stream, result: GenerationResult) -> None:
        del self.streams[stream.seq.id]
        stream.finish(result)

    @torch.inference_mode()
    def _trip(self, admitted: list[Sequence]) -> list[Sequence]:
        """One trip off the event loop: a step, then more while every row just keeps decoding and
        the step budget lasts. Returns the sequences with news (each once, in order)."""
        start = time.perf_counter()
        deadline = start + trip_budget(self.step_budget, len(self.scheduler.running))
        try:
            news = self._step(admitted)
            touched = dict.fromkeys(news)
            while self._only_decoding(news) and time.perf_counter() < deadline:
                news = self._step([])
                touched.update(dict.fromkeys(news))
            return list(touched)
        finally:
            self.runner.account(time.perf_counter() - start)

    def _only_decoding(self, news: list[Sequence]) -> bool:
        """Whether the next step can run without the event loop's attention in between (`news`:
        the sequences the last step touched; a finished one's client gets its result now)."""
        return not self.stopped and all(seq.final is None for seq in news) and self.scheduler.only_decoding()

    def _step(self, admitted: list[Sequence]) -> list[Sequence]:
        """One engine step: prompts prefill a call further, then every row decodes one character."""
        plan = self.scheduler.schedule(admitted)
        self.runner.run(plan, self.scheduler.running)
        self.steps += 1
        end = self.scheduler.end_step()
        self.runner.end(end)
        return plan.dropped + plan.left + end.left + end.finished + self.scheduler.running

    async def _run_beam(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        seq = stream.seq

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(stream.push_text, text)

        try:
            steps = beam_generation(self.ckpt.model, self.chars, seq.req, seq.state, on_text, lambda: seq.cancelled)
            result = await self.compute.run_steps(steps, self.step_budget)
            self.runner.chars_made.inc(len(result.consumed))
        except Exception:
            log.exception("beam search failed for model %s", self.ckpt.name)
            seq.cancel()
            result = seq.result(None)
        finally:
            self.beams -= 1
        await asyncio.sleep(0)  # let the callbacks scheduled by the compute thread run first
        streamed = sum(len(t) for t in stream.texts) + stream.sent
        rest = "".join(self.chars[i] for i in result.ids)[streamed:]
        if rest:
            stream.push_text(rest)
        self._finish(stream, result)
