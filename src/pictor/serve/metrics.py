"""Prometheus text exposition (format 0.0.4), written by hand: a few counters and two histograms do not
need a client library."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; tiny models finish in tens of milliseconds, real ones in tens of seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            running += c
            out.append(f'{name}_bucket{{le="{le:g}"}} {running}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    """Thread-safe: the worker thread observes, the event loop renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.images_total = 0
        self.batches_total = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)  # accepted -> finished
        self.run_time = Histogram(LATENCY_BUCKETS)  # sampler run of one batch
        self.batch_images = Histogram(BATCH_BUCKETS)

    def job_finished(self, status: str, latency: float) -> None:
        with self._lock:
            self.finished[status] = self.finished.get(status, 0) + 1
            self.latency.observe(latency)

    def batch_done(self, images: int, seconds: float) -> None:
        with self._lock:
            self.batches_total += 1
            self.images_total += images
            self.run_time.observe(seconds)
            self.batch_images.observe(images)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, queue_depth: int, jobs_by_state: Mapping[str, int], ready: bool) -> str:
        with self._lock:
            lines = [
                "# HELP pictor_model_ready 1 when the model is loaded and jobs run.",
                "# TYPE pictor_model_ready gauge",
                f"pictor_model_ready {int(ready)}",
                "# HELP pictor_queue_depth Jobs waiting to run (the running batch not included).",
                "# TYPE pictor_queue_depth gauge",
                f"pictor_queue_depth {queue_depth}",
                "# HELP pictor_jobs Jobs in the history by state.",
                "# TYPE pictor_jobs gauge",
                *(f'pictor_jobs{{state="{s}"}} {n}' for s, n in sorted(jobs_by_state.items())),
                "# HELP pictor_jobs_finished_total Jobs that reached a final state in this process.",
                "# TYPE pictor_jobs_finished_total counter",
                *(f'pictor_jobs_finished_total{{state="{s}"}} {n}' for s, n in sorted(self.finished.items())),
                "# HELP pictor_requests_rejected_total Job submissions refused (queue full, shutting down).",
                "# TYPE pictor_requests_rejected_total counter",
                *(
                    f'pictor_requests_rejected_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.rejected.items())
                ),
                "# HELP pictor_images_generated_total Images made in this process.",
                "# TYPE pictor_images_generated_total counter",
                f"pictor_images_generated_total {self.images_total}",
                "# HELP pictor_batches_total Sampler runs (one run may serve several merged jobs).",
                "# TYPE pictor_batches_total counter",
                f"pictor_batches_total {self.batches_total}",
                "# HELP pictor_job_latency_seconds Time from accepting a job to its final state.",
                "# TYPE pictor_job_latency_seconds histogram",
                *self.latency.lines("pictor_job_latency_seconds"),
                "# HELP pictor_batch_run_seconds Time of one sampler run, decode and saving included.",
                "# TYPE pictor_batch_run_seconds histogram",
                *self.run_time.lines("pictor_batch_run_seconds"),
                "# HELP pictor_batch_images Images per sampler run.",
                "# TYPE pictor_batch_images histogram",
                *self.batch_images.lines("pictor_batch_images"),
            ]
        return "\n".join(lines) + "\n"
