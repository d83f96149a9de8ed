"""The job queue and the one worker thread that runs the model.

- Bounded: at most ``queue_size`` jobs wait; more are refused (429) rather than piling up.
- One worker thread owns the pipeline, so the model is loaded once and the event loop never waits on it.
- Batching: jobs with the same prompt and settings are merged into one ``generate()`` call of up to
  ``max_batch`` images. The pipeline gives image i of a request the seed ``seed + i``, so merged jobs must
  have consecutive seeds: a job without a seed gets the next free one (only behind another job without a
  seed, whose start seed is random), a job with a seed joins only when its seed is the next one.
- Cancellation and timeouts stop a running sampler at the next step: the progress callback raises.
- Durability: every state change is committed to the store before it is announced. On start, queued jobs
  and jobs that were running when the process died are queued again; a job that was running during
  ``max_attempts`` deaths is failed instead, so one poisonous job cannot crash-loop the server.
- Loading: a model that fails to load fails the jobs sent for it since the start (their clients are told at
  once, rather than waiting for a fix that may never come); jobs are then refused (503) for ``load_retry``
  seconds, and the first one after that is queued and loads the model again. Jobs resumed from before a
  restart stay queued instead (a restart promises to run them): while they wait, the worker tries the load
  again every ``load_retry`` seconds by itself, and they run once a load succeeds.
- Uploads are deleted when nothing needs them any more (see `upload_retention`).

What a run does with its batch (the pipeline call for its kind, the notices kept with its jobs, the error
for what stopped it) is in `job_runs`; this module keeps the queue, the worker and the jobs' states.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from pictor.pipeline import Pipeline, seed_notice
from pictor.serve.errors import APIError, not_found
from pictor.serve.events import Hub
from pictor.serve.job_requests import Live, take_batch
from pictor.serve.job_runs import RunCancelled, RunTimedOut, batch_run, prompt_notices, run_error
from pictor.serve.lora_library import LoraLibrary, LoraUnavailable
from pictor.serve.metrics import Metrics
from pictor.serve.model_loading import LoadState
from pictor.serve.settings import ServeSettings
from pictor.serve.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    ImageRow,
    JobRow,
    Store,
    new_id,
)
from pictor.serve.upload_retention import delete_uploads, missing_upload, sweep_uploads, upload_ids

log = logging.getLogger("pictor.serve")


class JobManager:
    def __init__(
        self,
        store: Store,
        settings: ServeSettings,
        metrics: Metrics,
        pipeline: Pipeline | None = None,
        loader: Callable[[], Pipeline] | None = None,
        library: LoraLibrary | None = None,
    ) -> None:
        if pipeline is None and loader is None:
            raise ValueError("JobManager needs a pipeline or a loader")
        self.library = library or LoraLibrary()
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.pipeline = pipeline
        self._load = LoadState(settings.model, settings.load_retry)
        # Jobs resumed from the store at start: a failed load leaves them queued (see the module's docstring).
        self._resumed: set[str] = set()
        self.hub = Hub()
        self._loader = loader
        self._cond = threading.Condition()
        self._queue: deque[JobRow] = deque()
        self._running: dict[str, Live] = {}
        self._draining = False
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def loading(self) -> bool:
        return self._load.loading

    @property
    def load_error(self) -> str | None:
        """Why the last load of the model failed; None once one succeeded."""
        return self._load.error

    def start(self) -> None:
        self._recover()
        self._sweep_uploads()
        # A daemon thread: if a sampler run hangs past the shutdown grace, the process still exits and
        # the job is resumed on the next start.
        self._thread = threading.Thread(target=self._work, name="pictor-worker", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Stop taking work: new jobs get 503, the running batch finishes, queued jobs stay queued."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        self.hub.broadcast({"event": "draining"})

    def stop(self, timeout: float | None = None) -> None:
        self.begin_drain()
        if self._thread is not None:
            self._thread.join(timeout)

    def _recover(self) -> None:
        for job in self.store.unfinished():
            if job.status == RUNNING:
                if job.attempts >= self.settings.max_attempts:
                    self.store.finish(
                        job.id,
                        FAILED,
                        error={
                            "message": f"the server stopped {job.attempts} times while running this job; "
                            "giving up on it so that it cannot stop the server again",
                            "type": "server_error",
                            "code": "crash_loop",
                        },
                    )
                    log.warning("job %s failed after %d interrupted attempts", job.id, job.attempts)
                    delete_uploads(self.store, upload_ids(job.params))
                    continue
                self.store.requeue(job.id)
                job.status = QUEUED
            self._queue.append(job)
            self._resumed.add(job.id)
        if self._queue:
            log.info("resuming %d unfinished jobs from %s", len(self._queue), self.store.data_dir)

    def _sweep_uploads(self) -> None:
        """Before any request: delete the uploads no queued or succeeded job names (upload_retention)."""
        keep = self._uploads_in_use()
        for params in self.store.params_of(SUCCEEDED):
            keep |= upload_ids(params)
        sweep_uploads(self.store, keep)

    def _uploads_in_use(self, besides: Collection[str] = ()) -> set[str]:
        """The uploads that queued or running jobs name, but for the jobs whose ids are in `besides`."""
        with self._cond:
            jobs = [*self._queue, *(live.job for live in self._running.values())]
        return set().union(*(upload_ids(job.params) for job in jobs if job.id not in besides))

    def _release(self, job: JobRow, besides: Collection[str] = ()) -> None:
        """Delete the uploads of a job that ended without images, none that another queued or running job
        names (no two jobs share one; this keeps it so should that change)."""
        delete_uploads(self.store, upload_ids(job.params) - self._uploads_in_use({job.id, *besides}))

    def _fail_run(self, batch: list[Live], error: dict[str, Any]) -> None:
        """Fail the jobs of a run that stopped on an error. Nothing reads their pictures any more, so these go
        first: a client that sees a job failed finds its uploads gone too."""
        running = [live.job.id for live in batch]
        for live in batch:
            if not live.cancelled:  # a cancelled job's go after the run (`_release_ended`)
                self._release(live.job, besides=running)
                self._finish(live.job, FAILED, error=error)

    # -- requests from the API -----------------------------------------------------------------------

    def check_intake(self) -> None:
        """Raise the 503 that new work gets now (shutting down; a failed load not to be tried again yet), so
        that a request refused anyway is refused before its pictures are decoded and written. `submit`
        checks again."""
        with self._cond:
            if self._draining:
                self.metrics.reject("shutting_down")
                raise APIError(
                    503,
                    "the server is shutting down and takes no new jobs; retry shortly",
                    "server_error",
                    "shutting_down",
                    headers={"Retry-After": str(self.settings.retry_after)},
                )
            refusal = self._load.refusal()
            if refusal is not None:
                raise refusal

    def submit(self, params: dict[str, Any], user: str | None = None) -> JobRow:
        retry = {"Retry-After": str(self.settings.retry_after)}
        with self._cond:
            self.check_intake()
            if len(self._queue) >= self.settings.queue_size:
                self.metrics.reject("queue_full")
                raise APIError(
                    429,
                    f"the queue is full ({len(self._queue)} jobs waiting); "
                    f"retry after {self.settings.retry_after} s",
                    "rate_limit_error",
                    "queue_full",
                    headers=retry,
                )
            job = JobRow(new_id(), time.time(), QUEUED, params, user)
            self.store.add_job(job)  # committed before the caller answers 202
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> JobRow:
        with self._cond:
            queued = next((j for j in self._queue if j.id == job_id), None)
            if queued is not None:
                self._queue.remove(queued)
                self._finish(queued, CANCELLED)
                self._release(queued)
            elif job_id in self._running and not self._running[job_id].cancelled:
                # The sampler stops at its next step if no other job shares the run; either way this job's
                # images are dropped and its state is final now. Its uploads go once the run has stopped.
                self._running[job_id].cancelled = True
                self._finish(self._running[job_id].job, CANCELLED)
            else:
                job = self.store.get_job(job_id)
                if job is None:
                    raise not_found("job", job_id)
                if job.status in TERMINAL:
                    raise APIError(
                        409, f"job '{job_id}' already {job.status}; nothing to cancel", code="job_finished"
                    )
        job = self.store.get_job(job_id)
        assert job is not None
        return job

    def busy(self, job_id: str) -> bool:
        """Whether a job is queued, or in the running batch (a cancelled one too, until its run stops)."""
        with self._cond:
            return job_id in self._running or any(j.id == job_id for j in self._queue)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        with self._cond:
            live = self._running.get(job_id)
            return (live.step, live.total) if live else None

    def preview(self, job_id: str) -> tuple[bytes, int, int] | None:
        """A running job's newest live preview (JPEG), the step it shows and the steps in all; None while
        it has none (queued, finished, before its first step, or previews off)."""
        with self._cond:
            live = self._running.get(job_id)
            if live is None or live.cancelled or live.preview is None:
                return None
            return live.preview, live.preview_step, live.total

    def _keep_preview(self, live: Live, jpeg: bytes) -> None:
        with self._cond:
            if live.cancelled:  # cancelled since the frame was made
                return
            live.preview, live.preview_step = jpeg, live.step
        event = {"event": "preview", "step": live.step, "total": live.total, "jpeg": jpeg}
        self.hub.publish(live.job.id, event)

    def queue_position(self, job_id: str) -> int | None:
        with self._cond:
            return next((i for i, j in enumerate(self._queue) if j.id == job_id), None)

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    async def wait(self, job_id: str) -> JobRow:
        """Wait for a job's final state without blocking the event loop."""
        events = self.hub.subscribe(job_id)
        try:
            while True:
                job = self.store.get_job(job_id)
                if job is None:
                    raise not_found("job", job_id)
                if job.status in TERMINAL:
                    return job
                if self._draining and job.status == QUEUED:
                    raise APIError(
                        503,
                        f"the server is shutting down; job '{job_id}' stays queued and runs after "
                        f"the restart (GET /v1/jobs/{job_id})",
                        "server_error",
                        "shutting_down",
                        headers={"Retry-After": str(self.settings.retry_after)},
                    )
                while (await events.get())["event"] in ("progress", "preview"):
                    pass
        finally:
            self.hub.unsubscribe(job_id, events)

    # -- the worker ------------------------------------------------------------------------------------

    def unavailable(self) -> APIError | None:
        """The 503 for new work while a failed load is not to be tried again yet (see `LoadState`)."""
        with self._cond:
            return self._load.refusal()

    def request_load(self) -> None:
        """Ask for the model after a failed load without queueing a job (a variation, a hires request without
        a size: they need the model to be checked at all); the worker loads it again unless `unavailable()`
        says it is too soon."""
        with self._cond:
            if self.pipeline is None:
                self._load.want()
                self._cond.notify_all()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return  # draining
            self._run(batch)

    def _next_batch(self) -> list[Live] | None:
        """Wait for work, loading the model first where it is missing (see `LoadState.next_try` for when);
        the next sampler run, taken off the queue, or None once the server drains."""
        while True:
            with self._cond:
                if self._draining:
                    return None
                if self.pipeline is not None:
                    if self._queue:
                        batch = take_batch(self._queue, self.settings.max_batch)
                        self._running = {live.job.id: live for live in batch}
                        return batch
                    self._cond.wait()
                    continue
                wait = self._load.next_try(bool(self._queue))
                if wait is None or wait > 0:
                    self._cond.wait(wait)  # for work, a request for the model, or the end of the pause
                    continue
                self._load.started()
            self._load_model()

    def _run(self, batch: list[Live]) -> None:
        try:
            self._run_batch(batch)
        except Exception:  # a bug here must not kill the worker and strand the queue
            log.exception("worker error")
            self._fail_run(
                batch, {"message": "internal error in the worker", "type": "server_error", "code": "internal"}
            )
        finally:
            with self._cond:
                self._running = {}
            self._release_ended(batch)

    def _release_ended(self, batch: list[Live]) -> None:
        """After a run: the uploads of its jobs that failed or were cancelled, which it no longer reads."""
        try:
            for live in batch:
                ended = self.store.get_job(live.job.id)
                if ended is not None and ended.status in (FAILED, CANCELLED):
                    self._release(ended)
        except Exception:  # the worker goes on: the next start sweeps what is left
            log.exception("deleting the uploads of ended jobs failed")

    def _load_model(self) -> None:
        """Load the model (`LoadState.started` already said so); on failure, fail the jobs sent since the
        start (their clients learn why at once) and refuse new ones for a while; jobs resumed from before a
        restart stay queued for a later load. The server stays up to say why (readyz, the jobs' errors,
        503s)."""
        assert self._loader is not None
        try:
            pipeline = self._loader()
        except Exception as exc:
            log.exception("loading the model failed")
            with self._cond:  # atomic with submit and cancel: no job is queued or cancelled in between
                self._load.failed(exc)
                stranded = [job for job in self._queue if job.id not in self._resumed]
                for job in stranded:
                    self._queue.remove(job)
                    self._release(job)  # first: a client that sees the job failed finds its uploads gone
                    self._finish(job, FAILED, error=self._load.job_error())
                if self._queue:
                    log.warning(
                        "%d jobs resumed from before the restart stay queued; the model is loaded again "
                        "for them in %g s",
                        len(self._queue),
                        self.settings.load_retry,
                    )
            return
        with self._cond:
            self.pipeline = pipeline
            self._load.succeeded()
            self._resumed.clear()  # a loaded model is never unloaded: nothing is left to tell apart
        log.info("model '%s' loaded", pipeline.name)

    def _run_batch(self, batch: list[Live]) -> None:
        assert self.pipeline is not None
        started = time.time()
        params = batch[0].job.params
        kind = params.get("kind")  # None (a generation), "edit" or "upscale"
        # The pipeline warns about a prompt longer than its text encoder reads, but a warning reaches only
        # the server's log (and catching it here is no option: warnings.catch_warnings is process-wide). So
        # the same sentences are asked for and kept with the jobs (merged jobs share prompts), where the API
        # and the page show them; asked here, where the model is sure to be loaded.
        notices: list[str] = []
        if kind != "upscale":  # an upscale's prompt is its picture's record's, which nothing reads
            notices = prompt_notices(self.pipeline, params)
        for live in batch:
            # A job's own seeds can repeat smaller seeds' images (the generator reads 32 bits of a seed).
            aliased = seed_notice(live.seed, live.job.n) if kind != "upscale" else None
            job_notices = [*notices, aliased] if aliased else notices
            self.store.mark_running([live.job.id], started, job_notices)
            live.job.status, live.job.started, live.job.warnings = RUNNING, started, job_notices
            self.hub.publish(live.job.id, {"event": "status", "status": RUNNING})
        gone = missing_upload(self.store, params)
        if gone is not None:
            for live in batch:
                self._finish(live.job, FAILED, error=gone)
            return
        run, request = batch_run(self.pipeline, batch, self.store, self.settings, self._keep_preview)
        deadline = time.monotonic() + self.settings.job_timeout
        try:
            self.library.activate(self.pipeline, params.get("loras"))
        except LoraUnavailable as exc:  # gone, changed or broken since the server started: not the client's
            self._fail_run(batch, {"message": str(exc), "type": "server_error", "code": "lora_unavailable"})
            return

        def progress(step: int, total: int) -> None:
            with self._cond:
                alive = [live for live in batch if not live.cancelled]
                for live in alive:
                    live.step, live.total = step, total
            if not alive:
                raise RunCancelled
            for live in alive:
                self.hub.publish(live.job.id, {"event": "progress", "step": step, "total": total})
            if time.monotonic() > deadline:
                raise RunTimedOut

        try:
            images = run(request, progress)
        except RunCancelled:
            return  # every job of the run was cancelled, and is already final
        except Exception as exc:
            what = "upscale" if kind == "upscale" else "generation"
            error = run_error(exc, self.settings.job_timeout, form=kind == "edit", what=what)
            self._fail_run(batch, error)
            return
        self.metrics.batch_done(len(images), time.time() - started)
        offset = 0
        for live in batch:
            mine, offset = images[offset : offset + live.job.n], offset + live.job.n
            if live.cancelled:
                continue
            rows = [
                ImageRow(
                    self.store.write_image(g.image, g.record), live.job.id, i, g.seed, time.time(), g.record
                )
                for i, g in enumerate(mine)
            ]
            if not self._finish(live.job, SUCCEEDED, images=rows):  # cancelled while saving
                for row in rows:
                    self.store.image_path(row.id).unlink(missing_ok=True)

    def _finish(
        self,
        job: JobRow,
        status: str,
        error: dict[str, Any] | None = None,
        images: list[ImageRow] | None = None,
    ) -> bool:
        finished = time.time()
        with self._cond:  # a finished job shows no live preview any more (it may wait for its run's end)
            live = self._running.get(job.id)
            if live is not None:
                live.preview = None
        if not self.store.finish(job.id, status, error=error, images=images, finished=finished):
            return False
        self.metrics.job_finished(status, finished - job.created)
        self.hub.publish(job.id, {"event": "done", "status": status})
        return True
