"""What one sampler run of the worker does with a batch of jobs, apart from the queue's bookkeeping
(`jobs.JobManager`): the call that runs it for its kind (a generation, an edit or an upscale) and the request
it takes, the prompt notices kept with its jobs, and the job error for what stopped it. Separate so that the
queue's locking and life cycle read on their own, and what a run asks of the pipeline reads in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pictor.latent_preview import Previews
from pictor.pipeline import Pipeline
from pictor.request_resolution import request_texts, text_notices
from pictor.serve.job_requests import Live, edit_request, generation_request
from pictor.serve.pipeline_errors import REQUEST_ERRORS, job_error
from pictor.serve.previews import frame_handler
from pictor.serve.settings import ServeSettings
from pictor.serve.store import Store
from pictor.serve.upscale_runs import UpscalerUnavailable, check_hires_upscaler, run_upscale

log = logging.getLogger("pictor.serve")


class RunCancelled(Exception):
    """Raised by a run's progress callback once every job of the run was cancelled: the sampler stops."""


class RunTimedOut(Exception):
    """Raised by a run's progress callback past the job timeout: the sampler stops."""


def prompt_notices(pipeline: Pipeline, params: dict[str, Any]) -> list[str]:
    """What the pipeline warns about a job's texts (`Pipeline.prompt_notices`), asked of the texts its
    resolution checks (`pictor.request_resolution.request_texts`): with prompt editing, each text its
    schedules reach over the job's steps and hires steps, whose editing brackets the text encoder never
    reads; and each region's prompt or AND part."""
    steps = int(params.get("steps") or pipeline.defaults["steps"])
    hires_steps = (params.get("hires_steps") or steps) if params.get("hires_scale") else None
    texts = request_texts(
        params.get("prompt") or "",
        params.get("negative_prompt") or "",
        bool(params.get("prompt_editing")),
        steps,
        hires_steps,
        params.get("regions"),
        bool(params.get("composable")),
    )
    return text_notices(pipeline, texts, bool(params.get("prompt_weights")))


def batch_run(
    pipeline: Pipeline,
    batch: list[Live],
    store: Store,
    settings: ServeSettings,
    keep_preview: Callable[[Live, bytes], None],
) -> tuple[Callable[[Any, Any], Any], Any]:
    """The call that runs a batch (its request, its progress callback) and the request it takes, by the
    batch's kind: an upscale, an edit or a generation. `keep_preview`: where a shown job's live preview goes
    (`previews.frame_handler`)."""
    params = batch[0].job.params
    kind = params.get("kind")  # None (a generation), "edit" or "upscale"
    total_images = sum(live.job.n for live in batch)
    runs = {
        "seed": batch[0].seed,
        "num_images": total_images,
        "batch_size": min(total_images, settings.max_batch),
        "vae_tile": settings.vae_tile,
        "vae_tile_overlap": settings.vae_tile_overlap,
    }
    previews = None  # an upscale has no sampler steps to show
    if kind != "upscale" and settings.previews != "off":
        previews = Previews(frame_handler(batch, keep_preview), settings.previews)
    if kind == "upscale":  # one picture through the upscale model: never merged (its upload is its own)
        pipe = pipeline
        return (lambda _r, p: run_upscale(pipe, params, store, p)), None
    if kind == "edit":
        pipe, edit = pipeline, pipeline.edit

        def run_edit(r: Any, p: Any) -> Any:  # an upscaling edit's model must still be the one loaded
            check_hires_upscaler(pipe, params, "upscaler")
            return edit(r, p, previews)

        return run_edit, edit_request(params, store, **runs)
    pipe, generate = pipeline, pipeline.generate

    def run_generation(r: Any, p: Any) -> Any:  # a hires upscale model must still be the one loaded
        check_hires_upscaler(pipe, params)
        return generate(r, p, previews)

    return run_generation, generation_request(params, store, **runs)


def run_error(
    exc: Exception, job_timeout: float, form: bool = False, what: str = "generation"
) -> dict[str, Any]:
    """The job error for what stopped a run: a timeout (past `job_timeout` seconds), a request the model
    refused, or a fault. `form`: the job came as a multipart form (an edit), whose field names an error about
    a request uses."""
    if isinstance(exc, RunTimedOut):
        message = f"the job ran past its {job_timeout:g} s limit and was stopped"
        return {"message": message, "type": "timeout_error", "code": "job_timeout"}
    if isinstance(exc, REQUEST_ERRORS):
        return job_error(exc, form)
    if isinstance(exc, UpscalerUnavailable):  # the server's settings changed while the job waited
        return {"message": str(exc), "type": "server_error", "code": "upscaler_unavailable"}
    log.error("%s failed", what, exc_info=exc)
    message = f"{what} failed: {type(exc).__name__}: {exc}"
    return {"message": message, "type": "server_error", "code": "generation_failed"}
