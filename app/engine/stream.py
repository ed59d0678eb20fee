"""Stream: a client's handle on one generation: coalesced text pieces, then the result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from app import metrics
from app.engine.sequence import GenerationResult, Sequence
from app.nn import State

# ids from a state (None: the zero state) -> the state after them, computed off the event loop
AsyncPrefill = Callable[[list[int], State | None], Awaitable[State]]


class Stream:
    """What the API holds of a generation: `next()` gives its text, then its result; `abort()` stops it;
    `result_after(n)` is what a session saves when its client received only `n` characters."""

    def __init__(self, seq: Sequence, model: str, prefill: AsyncPrefill) -> None:
        self.seq = seq
        self._prefill = prefill
        self._ttfc = metrics.TTFC.labels(model)
        self._inter_char = metrics.INTER_CHAR.labels(model)
        self.admitted_at = time.perf_counter()
        self.last_text_at: float | None = None  # when text last came in; None: none yet
        self.texts: list[str] = []  # made and not yet taken by `next`
        self.result: GenerationResult | None = None
        self.delivered = False  # `next` has returned the result
        self.sent = 0  # characters handed to the client so far
        self._ready = asyncio.Event()
        self._finished = asyncio.Event()
        self._done_callbacks: list[Callable[[], None]] = []

    def push_text(self, text: str) -> None:
        now = time.perf_counter()
        if self.last_text_at is None:
            self._ttfc.observe(now - self.admitted_at)
        else:
            self._inter_char.observe((now - self.last_text_at) / len(text))
        self.last_text_at = now
        self.texts.append(text)
        self._ready.set()

    def finish(self, result: GenerationResult) -> None:
        self.result = result
        self._ready.set()
        self._finished.set()
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
        """Stop the generation (a no-op once it is done); its row is freed at the next step."""
        if self.result is None:
            self.seq.cancelled = True

    async def ended(self) -> None:
        """Until the generation has ended, however it ended."""
        await self._finished.wait()

    async def result_after(self, chars: int) -> GenerationResult | None:
        """Once the generation has ended: its result cut after its first `chars` characters (as a
        cancelled one), with the state there, to continue from; None where there is no such state
        (its prompt was not prefilled to its end)."""
        await self._finished.wait()
        result, seq = self.result, self.seq
        if result is None or seq.start_state is None:
            return None
        made = result.consumed[:chars]
        base: State | None
        if chars >= seq.start_made:
            # prefill what was made after the state the row started decoding from
            base, ids = seq.start_state, [seq.start_pending, *made[seq.start_made :]]
        else:  # nothing was handed out of what that state holds: prefill the prompt again
            base, ids = seq.origin, [*seq.req.ids, *made]
        state = await self._prefill(ids[:-1], base)
        return GenerationResult(
            ids=made, finish_reason="cancelled", state=state, pending=ids[-1],
            generator_state=seq.generator_state_after(len(made)), consumed=made,
        )  # fmt: skip
