"""Where the served model's load stands after a failure: why it failed, what the jobs it stranded are told,
and when it may be tried again.

A load that failed once (a missing or broken file, a LoRA, Redux or tiling setting that does not fit) mostly
fails again, and a load can take minutes: reloading for every request would make each wait that long to be
told the same. So after a failure jobs are refused (503, Retry-After) for ``ServeSettings.load_retry``
seconds; the first job after that is queued and the model is loaded again for it, so a file fixed meanwhile
is picked up without a restart. The owner (`JobManager`) guards an instance with its lock.
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

    def failed(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.retry_at = time.monotonic() + self.retry_seconds
        self.loading = False

    def succeeded(self) -> None:
        self.error, self.loading = None, False

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
