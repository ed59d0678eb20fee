"""Background tasks that must run to their end although the request that started them is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[None]] = set()


def background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)  # a reference, so the task is not collected before it ends
    task.add_done_callback(_running.discard)
