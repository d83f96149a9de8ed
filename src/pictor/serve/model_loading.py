"""Where the served model's load stands after a failure: why it failed, what the jobs it stranded are told,
and when it may be tried again.

A load that failed once (a missing or broken file, a LoRA, Redux, IP-Adapter or tiling setting that does not
fit) mostly fails again, and a load can take minutes: reloading for every request would make each wait that
long to be told the same. So after a failure jobs are refused (503, Retry-After) for
``ServeSettings.load_retry`` seconds; after that the model is loaded again for the first job sent (or the
first request that needs the model to be checked at all, `wanted`), and by itself while jobs resumed from
before a restart wait, so a file fixed meanwhile is picked up without a restart. The owner (`JobManager`)
guards an instance with its lock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pictor.serve.errors import APIError


@dataclass
class LoadState:
    model: str | None  # as the server was told (--model); None: the default
    retry_seconds: float
    error: str | None = None  # why the last load failed; None once one succeeded (or before the first)
    loading: bool = False
    retry_at: float = 0.0  # time.monotonic() from which a failed load may be tried again
    # A request that needs the model to be checked at all (a variation, a hires request without a size)
    # asked for it after a failed load: load it although no job waits.
    wanted: bool = False

    def started(self) -> None:
        self.loading, self.wanted = True, False

    def failed(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.retry_at = time.monotonic() + self.retry_seconds
        self.loading = self.wanted = False

    def succeeded(self) -> None:
        self.error, self.loading, self.wanted = None, False, False

    def want(self) -> None:
        """Ask for the model without queueing a job; heeded once a failed load may be tried again (a first
        load, or one under way, needs no asking)."""
        if self.error is not None and self.refusal() is None and not self.loading:
            self.wanted = True

    def next_try(self, work_waiting: bool) -> float | None:
        """For a worker without the model: seconds until it should load it (0: now), or None to wait for work.
        The first load starts at once; after a failure, once jobs wait or a request asked for the model, and
        no sooner than `retry_at`."""
        if self.error is None:
            return 0.0
        if not (work_waiting or self.wanted):
            return None
        return max(0.0, self.retry_at - time.monotonic())

    def refusal(self) -> APIError | None:
        """The 503 for new work while a failed load is not to be tried again yet; None when work is taken
        (the model is there, is loading, or may be loaded again)."""
        if self.error is None or self.loading:
            return None
        wait = math.ceil(self.retry_at - time.monotonic())
        if wait <= 0:
            return None
        return APIError(
            503,
            f"the model failed to load: {self.error}; the server loads it again for the first job sent "
            f"after {wait} s (fix the model's files or the server's settings meanwhile)",
            "server_error",
            "model_unavailable",
            headers={"Retry-After": str(wait)},
        )

    def job_error(self) -> dict[str, Any]:
        """The error of a job that was queued for a load that failed."""
        model = f"model '{self.model}'" if self.model else "its model"
        message = (
            f"the server could not load {model} ({self.error}), so this job was not run; once the model's "
            "files or the server's settings are fixed (GET /readyz says why it failed), send the job again: "
            f"the server loads the model again for the first job sent {self.retry_seconds:g} s or more after "
            "the failure"
        )
        return {"message": message, "type": "server_error", "code": "model_unavailable"}
