"""A held session lease, renewed in the background until it is let go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.errors import ConflictError, NotFoundError, RnnserveError, UnavailableError
from app.sessions.store import SessionStore

log = logging.getLogger(__name__)


class Lease:
    """`token`'s lease on one session, renewed every third of the store's lease until `stop()`.

    A renewal that finds the session leased to another token (ours ran out and was taken) or gone
    sets `lost` and calls `on_lost` once. A store that does not answer is asked again at the next
    beat: should the lease run out meanwhile and be taken, the next renewal says so, and the
    commit's compare-and-set refuses this holder anyway.
    """

    def __init__(self, store: SessionStore, session_id: str, token: str) -> None:
        self.store = store
        self.session_id = session_id
        self.token = token
        self.lost: RnnserveError | None = None
        self.on_lost: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_seconds / 3)
            try:
                await self.store.renew(self.session_id, self.token)
            except (ConflictError, NotFoundError) as e:
                self.lost = e
                if self.on_lost is not None:
                    self.on_lost()
                return
            except UnavailableError as e:
                log.warning("lease of session %s not renewed: %s", self.session_id, e.message)
            except Exception:  # the beat must go on: a dead heartbeat would lose the session silently
                log.exception("lease of session %s not renewed", self.session_id)
