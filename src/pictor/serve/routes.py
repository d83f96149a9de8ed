"""The /v1 API: OpenAI-compatible image generation, the job API, images and their provenance."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer

from pictor.guidance_methods import METHODS
from pictor.provenance import (
    PARAMETERS_KEY,
    POSTPROCESSING_KEYS,
    RECORD_KEY,
    ProvenanceError,
    read_text_chunks,
)
from pictor.sampling import SAMPLERS, SCHEDULES
from pictor.serve.api_models import (
    DeletedJob,
    ErrorResponse,
    ImageData,
    ImageMetadata,
    ImagesResponse,
    Job,
    JobList,
    ModelCard,
    ModelList,
    UpscalerCard,
)
from pictor.serve.controlnets import cards as controlnet_cards
from pictor.serve.errors import APIError, not_found
from pictor.serve.generation_body import ImageGenerationRequest
from pictor.serve.service import Service, failure, job_or_404, service
from pictor.serve.store import QUEUED, SUCCEEDED, TERMINAL, JobRow

ID_PATTERN = r"^[0-9a-f]{32}$"
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="32 lowercase hex characters")]
ImageId = Annotated[str, Path(pattern=ID_PATTERN, description="32 lowercase hex characters")]


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Declared on every /v1 operation so the OpenAPI document lists what the server really answers.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("Bad input: the message says what to change"),
    401: _err("Missing or wrong API key (when the server has one)"),
    403: _err("Cross-site request refused"),
    404: _err("No such job or image"),
    413: _err("Request body too large"),
}
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    429: _err("Queue full; retry after the Retry-After header's seconds"),
    503: _err("Shutting down or model unavailable; retry later"),
}
SYNC_ERRORS: dict[int | str, dict[str, Any]] = {
    **SUBMIT_ERRORS,
    409: _err("The job was cancelled (DELETE /v1/jobs/{id}) before it finished"),
    500: _err("The model failed on this job (not bad input: a server-side fault)"),
    504: _err("The job ran past the server's per-job time limit"),
}

# Documentation only: the Guard middleware checks the key before routing, so bad input from an
# unauthenticated client is a 401, never a validation report.
bearer = HTTPBearer(auto_error=False, description="The server's API key, when it was started with one.")


def known_query_only(request: Request) -> None:
    """Unknown query parameters are a 400, like unknown body fields: ``?query=red`` is a typo for ``?q=``."""
    route = request.scope.get("route")
    known = {p.alias for p in getattr(getattr(route, "dependant", None), "query_params", [])}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        hint = f"; this endpoint takes {', '.join(sorted(known))}" if known else ""
        raise APIError(
            400, f"unknown query parameter '{unknown[0]}'{hint}", param=unknown[0], code="unknown_parameter"
        )


V1_DEPENDENCIES = [Depends(bearer), Depends(known_query_only)]
router = APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=COMMON_ERRORS)


OTHER_METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]

# -- OpenAI Images ---------------------------------------------------------------------------------


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=SYNC_ERRORS,
    summary="Create images (OpenAI Images API); waits for the job",
)
async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    svc = service(request)
    params = await run_in_threadpool(svc.params, body)  # may decode a reference picture
    job = await run_in_threadpool(svc.submit, params, body.user)
    return await finished_images(svc, request, job.id, body.response_format or "url")


async def finished_images(
    svc: Service, request: Request, job_id: str, response_format: str
) -> ImagesResponse:
    """Wait for a job and answer as OpenAI does: its images as URLs or base64 PNGs."""
    job = await svc.manager.wait(job_id)
    if job.status != SUCCEEDED:
        raise failure(job, svc.settings)
    data = []
    for r in job.results:
        if response_format == "b64_json":
            raw = await run_in_threadpool(_image_bytes, svc, r["image_id"])
            if raw is None:  # DELETE /v1/history/{id} came between the job's end and this answer
                raise APIError(
                    410,
                    f"job '{job.id}' succeeded, but was deleted from the history meanwhile (DELETE "
                    f"/v1/history/{job.id}), with its images; send the request again",
                    code="job_deleted",
                )
            data.append(ImageData(b64_json=base64.b64encode(raw).decode("ascii")))
        else:
            data.append(ImageData(url=svc.image_url(request, r["image_id"])))
    # OpenAI's clients ignore a field they do not know; left out when empty, as OpenAI's answers have none.
    return ImagesResponse(created=int(job.created), data=data, job_id=job.id, warnings=job.warnings or None)


def _image_bytes(svc: Service, image_id: str) -> bytes | None:
    """An image's PNG, or None when its history entry was deleted meanwhile. Read at once: a file is checked
    for by opening it, as a check before the open could be outrun by a DELETE."""
    try:
        with svc.store.image_path(image_id).open("rb") as f:
            return f.read()
    except FileNotFoundError:
        if svc.store.get_image(image_id) is None:
            return None
        raise  # the row is there, the file is not: removed by hand from the data dir (a 500)


@router.api_route("/images/generations", methods=OTHER_METHODS, include_in_schema=False)
@router.api_route("/images/edits", methods=OTHER_METHODS, include_in_schema=False)
@router.api_route("/jobs/edits", methods=OTHER_METHODS, include_in_schema=False)
def post_only(request: Request) -> None:
    # Without this, GET /v1/images/generations would reach GET /v1/images/{image_id}, and GET
    # /v1/jobs/edits would reach GET /v1/jobs/{job_id}: a 400 instead of a 405.
    raise APIError(
        405,
        f"method {request.method} is not allowed on {request.url.path}; use POST",
        code="method_not_allowed",
        headers={"Allow": "POST"},
    )


def model_card(svc: Service) -> ModelCard:
    pipe = svc.manager.pipeline
    limits = svc.settings.limits
    return ModelCard(
        id=(pipe.ref or pipe.name) if pipe is not None else (svc.settings.model or "default"),
        created=int(svc.started),
        ready=pipe is not None,
        trained=pipe.config.trained if pipe is not None else None,
        defaults={k: v for k, v in pipe.defaults.items()} if pipe is not None else {},
        limits={
            "max_pixels": limits.max_pixels,
            "max_steps": limits.max_steps,
            "max_images": limits.max_images,
            "max_prompt_chars": limits.max_prompt_chars,
            "size_multiple": pipe.patch if pipe is not None else 1,
        },
        samplers=list(SAMPLERS),
        schedules=list(SCHEDULES),
        guidance_methods=list(METHODS),  # (pictor.guidance_methods) the page's Guidance method select
        # From the bundle's config, as the pipeline decides (context_images.context_problem): so the page
        # offers a context picture only where it would not be refused.
        kontext=bool(pipe.config.kontext) if pipe is not None else False,
        reference=pipe is not None and pipe.reference_adapter is not None,
        layout=pipe is not None and pipe.layout_adapter is not None,
        fill=pipe is not None and pipe.fill,
        # FLUX.1 Canny / Depth: known by the input width (`pipe.control`), the kind from the bundle's config.
        control=pipe.config.control if pipe is not None and pipe.control else None,
        redux=pipe is not None and pipe.redux is not None,
        ip_adapter=pipe is not None and pipe.ip_adapter is not None,
        # FLUX.1 ControlNets, in the order requests give their pictures; the page offers one input each.
        controlnets=controlnet_cards(pipe) if pipe is not None else [],
        upscaler=upscaler_card(pipe),
    )


def upscaler_card(pipe: Any) -> UpscalerCard | None:
    """What the model card says of the loaded upscale model; None without one (or while the model loads)."""
    upscaler = getattr(pipe, "upscaler", None) if pipe is not None else None
    if upscaler is None:
        return None
    return UpscalerCard(
        name=upscaler.name, architecture=upscaler.architecture, scale=upscaler.scale, sha256=upscaler.sha256
    )


@router.get("/loras", summary="The LoRAs requests may choose (`loras`), and files left out with why")
def list_loras(request: Request) -> dict[str, Any]:
    return service(request).library.listing()


@router.post(
    "/loras/refresh",
    summary="Read --lora-dir again: new files offered, removed ones not, changed ones checked anew",
)
def refresh_loras(request: Request) -> dict[str, Any]:
    return service(request).library.refresh()


@router.get("/models", response_model=ModelList, summary="The served model, its defaults and limits")
def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(service(request))])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    summary="The served model under any of its names (OpenAI's models.retrieve)",
)
def get_model(model_id: str, request: Request) -> ModelCard:
    svc = service(request)
    if model_id not in svc.model_names():
        raise APIError(
            404,
            f"no model '{model_id}' is served here; this server answers to: {svc.served()}",
            code="model_not_found",
            param="model",
        )
    return model_card(svc)


# -- jobs --------------------------------------------------------------------------------------------


@router.post(
    "/jobs",
    response_model=Job,
    status_code=202,
    responses=SUBMIT_ERRORS,
    summary="Queue a generation job; returns at once",
)
def create_job(body: ImageGenerationRequest, request: Request, response: Response) -> Job:
    svc = service(request)
    job = svc.submit(svc.params(body), body.user)
    return accepted(svc, request, response, job)


def accepted(svc: Service, request: Request, response: Response, job: JobRow) -> Job:
    """A queued job's 202 answer: its view, and where to poll it (the Location header)."""
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    return svc.view(request, job)


@router.get("/jobs", response_model=JobList, summary="History, newest first; q searches prompts")
def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    q: Annotated[str, Query(max_length=200, description="substring of the prompt")] = "",
) -> JobList:
    svc = service(request)
    if "\x00" in q:  # SQLite would end the pattern there and match every job
        raise APIError(
            400, "q: NUL characters are not allowed in a search", param="q", code="invalid_request"
        )
    jobs, total = svc.store.list_jobs(limit, offset, q)
    return JobList(
        data=[svc.view(request, j) for j in jobs],
        total=total,
        limit=limit,
        offset=offset,
        has_more=offset + len(jobs) < total,
    )


@router.get("/jobs/{job_id}", response_model=Job, summary="A job's status, progress, results or error")
def get_job(job_id: JobId, request: Request) -> Job:
    svc = service(request)
    return svc.view(request, job_or_404(svc, job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=Job,
    responses={409: _err("The job had already finished")},
    summary="Cancel a job (queued: removed; running: stopped at the next step)",
)
def cancel_job(job_id: JobId, request: Request) -> Job:
    svc = service(request)
    return svc.view(request, svc.manager.cancel(job_id))


@router.delete(
    "/history/{job_id}",
    response_model=DeletedJob,
    responses={409: _err("The job has not finished (cancel it first)")},
    summary="Delete a finished job from the history, with its images and its uploaded pictures",
)
def delete_history_entry(job_id: JobId, request: Request) -> DeletedJob:
    return DeletedJob(id=service(request).forget(job_id).id)


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStreamResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    summary="Server-sent events: status, progress, preview (a data URL) ... done (the final job)",
)
async def job_events(job_id: JobId, request: Request) -> EventStreamResponse:
    svc = service(request)
    job_or_404(svc, job_id)

    async def stream() -> AsyncIterator[str]:
        events = svc.manager.hub.subscribe(job_id)  # before reading the state, so nothing is missed
        try:
            job = job_or_404(svc, job_id)
            yield _sse("status", svc.view(request, job).model_dump())
            while job.status not in TERMINAL:
                if svc.manager.draining and job.status == QUEUED:
                    yield _sse(
                        "draining", {"id": job_id, "message": "server shutting down; the job stays queued"}
                    )
                    return
                try:
                    event = await asyncio.wait_for(events.get(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"  # keeps proxies from closing a quiet stream
                    continue
                if event["event"] in ("progress", "preview"):
                    step, total = event["step"], event["total"]
                    progress = {"id": job_id, "step": step, "total": total, "fraction": step / total}
                    if "jpeg" in event:  # inline, so a listener needs no second request (nor a race with it)
                        progress["image"] = (
                            "data:image/jpeg;base64," + base64.b64encode(event["jpeg"]).decode()
                        )
                    yield _sse(event["event"], progress)
                    continue
                job = job_or_404(svc, job_id)
                if job.status not in TERMINAL:
                    yield _sse("status", svc.view(request, job).model_dump())
            yield _sse("done", svc.view(request, job).model_dump())
        finally:
            svc.manager.hub.unsubscribe(job_id, events)

    return EventStreamResponse(stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get(
    "/jobs/{job_id}/preview",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The newest preview of the running job"},
        404: _err("No such job, or no preview of it now"),
    },
    summary="A running job's newest live preview (JPEG; X-Preview-Step says which step it shows)",
)
def get_job_preview(job_id: JobId, request: Request) -> Response:
    svc = service(request)
    job = job_or_404(svc, job_id)
    shown = svc.manager.preview(job_id)
    if shown is None:
        if svc.settings.previews == "off":
            why = "previews are off on this server (pictor serve --previews)"
        elif job.params.get("kind") == "upscale":
            why = "an upscale runs no sampler, so it has no steps to preview"
        else:
            why = f"the job is {job.status}; a job has a preview while it runs, from its first step"
        raise APIError(404, f"job '{job_id}' has no preview now: {why}", code="no_preview")
    jpeg, step, total = shown
    headers = {"Cache-Control": "no-store", "X-Preview-Step": str(step), "X-Preview-Total": str(total)}
    return Response(jpeg, media_type="image/jpeg", headers=headers)


# -- images --------------------------------------------------------------------------------------------


@router.get(
    "/images/{image_id}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG with its provenance chunks"}},
    summary="An image as stored, with its provenance (A1111 parameters + pictor record)",
)
def get_image(
    image_id: ImageId,
    request: Request,
    exp: Annotated[int | None, Query(description="Signed URLs: expiry (unix time)")] = None,
    sig: Annotated[str | None, Query(max_length=64, description="Signed URLs: signature")] = None,
) -> Response:
    svc = service(request)
    if svc.store.get_image(image_id) is None:
        raise not_found("image", image_id)
    try:
        png = _image_bytes(svc, image_id)  # read before answering: a DELETE may come at any time
    except FileNotFoundError:  # its file removed from the data dir by hand: as if it had never been
        raise not_found("image", image_id) from None
    if png is None:
        message = f"image '{image_id}' was deleted from the history meanwhile"
        raise APIError(404, message, code="image_not_found")
    return Response(
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"}
    )


@router.get("/images/{image_id}/metadata", response_model=ImageMetadata, summary="An image's provenance")
def get_image_metadata(image_id: ImageId, request: Request) -> ImageMetadata:
    svc = service(request)
    row = svc.store.get_image(image_id)
    if row is None:
        raise not_found("image", image_id)
    try:
        chunks = read_text_chunks(svc.store.image_path(image_id))
    except ProvenanceError:
        raise not_found("image", image_id) from None
    record = json.loads(chunks[RECORD_KEY]) if RECORD_KEY in chunks else row.record
    return ImageMetadata(
        id=image_id,
        job_id=row.job_id,
        seed=row.seed,
        url=svc.image_url(request, image_id),
        parameters=chunks.get(PARAMETERS_KEY, ""),
        postprocessing=chunks.get(POSTPROCESSING_KEYS[0], ""),
        record=record,
    )
