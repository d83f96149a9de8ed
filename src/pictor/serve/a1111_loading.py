"""A1111 requests that need the served model to be mapped wait for it while it loads, as a /v1 job waits in
the queue (`pictor.serve.a1111_api`'s txt2img and img2img)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from pictor.serve.errors import APIError
from pictor.serve.service import Service

T = TypeVar("T")

LOAD_POLL_SECONDS = 0.1


async def when_loaded(svc: Service, request: Request, mapping: Callable[[], T]) -> T:
    """Map a body (in a worker thread); one that needs the model while it loads (`Service.need_model`'s
    503 model_loading) waits for the load and is mapped again, as a /v1 job waits in the queue. A load that
    fails, a server that drains, and a client that leaves end the wait."""
    while True:
        try:
            return await run_in_threadpool(mapping)
        except APIError as exc:
            if exc.code != "model_loading":
                raise
        while svc.manager.pipeline is None:
            svc.manager.check_intake()  # shutting down, or the load failed: its 503
            if await request.is_disconnected():
                raise APIError(499, "the client left while the model loaded", code="client_closed")
            svc.manager.request_load()  # a load that failed and may be tried again is tried for this one
            await asyncio.sleep(LOAD_POLL_SECONDS)
