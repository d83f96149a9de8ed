"""Fan-out of job events from the worker thread to asyncio listeners (SSE streams, waiting requests).

Events are small dicts: ``{"event": "status" | "progress" | "done" | "draining", ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class Hub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]]] = {}

    def subscribe(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            self._subs.setdefault(job_id, set()).add((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            subs = self._subs.get(job_id, set())
            subs.difference_update({s for s in subs if s[1] is queue})
            if not subs:
                self._subs.pop(job_id, None)

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            targets = list(self._subs.get(job_id, ()))
        for loop, queue in targets:
            with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def broadcast(self, event: dict[str, Any]) -> None:
        with self._lock:
            ids = list(self._subs)
        for job_id in ids:
            self.publish(job_id, event)
