"""``/sdapi/v1``: AUTOMATIC1111's API on pictor's job queue, so that clients written for A1111 (Open WebUI,
SillyTavern, image-editor plugins, scripts) use a pictor server unchanged.

txt2img and img2img are jobs like any other: queued, batched, kept in the history with their images and
provenance, cancelled by ``DELETE /v1/jobs/{id}``; they make the pixels the OpenAI endpoints make with the
same settings (`a1111_requests` maps the fields). progress, interrupt and skip look at the jobs sent here.
Errors answer in A1111's shape (`a1111_errors`). With an API key, a request needs it as the Bearer token or
as the password of HTTP Basic auth (A1111's ``--api-auth``), any user name: the guard alone decides
(`security.Guard`), so no route dependency parses the Basic header; the document declares the scheme
(`install`).

A request that needs the model to be mapped (its kind of guidance, its default size) while the model loads
waits for it, as a /v1 job waits in the queue, instead of a 503 (`a1111_loading.when_loaded`).
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool

from pictor.provenance import PARAMETERS_KEY
from pictor.serve.a1111_errors import A1111Error, A1111Route, field_error
from pictor.serve.a1111_extras import router as extras_router
from pictor.serve.a1111_info import info_of, parameters_fields, png_text
from pictor.serve.a1111_loading import when_loaded
from pictor.serve.a1111_models import (
    A1111Common,
    A1111Images,
    Img2ImgRequest,
    LoraItem,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
    UpscalerItem,
)
from pictor.serve.a1111_names import check_checkpoint, sampler_list, scheduler_list, served_model
from pictor.serve.a1111_params import API_MARK, Mapped, translated
from pictor.serve.a1111_requests import img2img_inputs, txt2img_request
from pictor.serve.edit_validation import edit_params
from pictor.serve.errors import APIError
from pictor.serve.routes import bearer, finished_images
from pictor.serve.service import Service, service
from pictor.serve.store import JobRow
from pictor.serve.uploads import decode_base64_image

# Declared in the document only (`install`): FastAPI's HTTPBasic dependency would answer 401 itself for a
# Basic header it cannot parse (no colon, a user name that is not ASCII), even on a server without a key.
BASIC_SCHEME = {
    "type": "http",
    "scheme": "basic",
    "description": "The server's API key as the password (any user name, UTF-8), as A1111's --api-auth.",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": A1111Error, "description": description}
    for status, description in (
        (400, "Bad input, or a model other than the one served"),
        (401, "Missing or wrong API key (when the server has one)"),
        (403, "Cross-site request refused"),
        (404, "No such endpoint"),
        (409, "The job was interrupted before it finished"),
        (413, "Request body too large"),
        (429, "Queue full; retry after the Retry-After header's seconds"),
        (500, "The model failed on this job"),
        (503, "Shutting down or model unavailable; retry later"),
        (504, "The job ran past the server's per-job time limit"),
    )
}
router = APIRouter(
    prefix="/sdapi/v1",
    route_class=A1111Route,
    dependencies=[Depends(bearer)],
    responses=ERRORS,
    tags=["A1111-compatible"],
)
# A1111's settings clients read (GET /sdapi/v1/options); what they set is taken and ignored, but a model.
OPTIONS = {
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "samples_format": "png",
    "eta_noise_seed_delta": 0,
    "show_progress_every_n_steps": 1,
}
SAME_VAE = {"", "automatic", "none", "auto"}


# -- generation -----------------------------------------------------------------------------------------


@router.post("/txt2img", response_model=A1111Images, summary="A1111's txt2img, as a pictor job; waits")
async def txt2img(body: Txt2ImgRequest, request: Request) -> A1111Images:
    svc = service(request)
    generation, mapped = await when_loaded(svc, request, lambda: txt2img_request(svc, body))
    try:
        params = await run_in_threadpool(svc.params, generation)  # as POST /v1/images/generations checks it
    except APIError as exc:
        raise translated(exc, mapped.names) from None
    job = await run_in_threadpool(svc.submit, {**params, **API_MARK}, None)
    return await answer(svc, request, job, body, mapped)


@router.post(
    "/img2img", response_model=A1111Images, summary="A1111's img2img and inpainting, as a pictor job"
)
async def img2img(body: Img2ImgRequest, request: Request) -> A1111Images:
    svc = service(request)
    source, mask, mapped = await when_loaded(svc, request, lambda: img2img_inputs(svc, body))
    try:  # as POST /v1/images/edits checks it; the prompt may be empty: the picture says what to draw
        kept = await run_in_threadpool(edit_params, svc, source, mask, mapped.fields, prompt_optional=True)
    except APIError as exc:
        raise translated(exc, mapped.names) from None
    job = await run_in_threadpool(svc.submit, {**kept, **API_MARK}, None)
    echo = body if body.include_init_images else body.model_copy(update={"init_images": None, "mask": None})
    return await answer(svc, request, job, echo, mapped)


async def answer(
    svc: Service, request: Request, job: JobRow, body: A1111Common, mapped: Mapped
) -> A1111Images:
    """Wait for the job; its images (base64 PNGs with their provenance) and A1111's info about them."""
    try:
        done = await finished_images(svc, request, job.id, "b64_json")
    except APIError as exc:
        if exc.code == "job_cancelled":
            raise APIError(
                409,
                f"the job was interrupted (POST /sdapi/v1/interrupt, or DELETE /v1/jobs/{job.id}) before it "
                "finished; send the request again for its images",
                code="interrupted",
            ) from None
        raise translated(exc, mapped.names) from None  # a job the model refused when it ran
    images = [d.b64_json or "" for d in done.data]
    texts = [png_text(base64.b64decode(b)) for b in images]
    finished = svc.store.get_job(job.id) or job
    info = info_of(svc, body, finished, texts, mapped)
    # A1111 echoes its own fields only: a field it has not (SillyTavern's `auth`, "user:KEY") is not sent back
    parameters = body.model_dump(mode="json", exclude=set(body.model_extra or {}))
    return A1111Images(
        images=images if body.send_images is not False else [], parameters=parameters, info=info
    )


# -- the queue ----------------------------------------------------------------------------------------------


def a1111_jobs(svc: Service) -> list[JobRow]:
    """The jobs sent through /sdapi that are queued or running, oldest first."""
    return [job for job in svc.store.unfinished() if job.params.get("api") == API_MARK["api"]]


@router.get(
    "/progress", response_model=ProgressResponse, summary="Progress of the A1111 jobs queued or running"
)
def progress(
    request: Request, skip_current_image: Annotated[bool, Query(description="Leave the preview out")] = False
) -> ProgressResponse:
    svc = service(request)
    jobs = a1111_jobs(svc)
    if not jobs:
        return ProgressResponse(progress=0, eta_relative=0, state=ProgressState(), textinfo="idle")
    running = [(job, svc.manager.progress(job.id)) for job in jobs]
    job, (step, total) = next(((j, p) for j, p in running if p is not None), (jobs[0], (0, 0)))
    fraction = step / total if total else 0.0
    elapsed = time.time() - job.started if job.started and total else 0.0
    shown = svc.manager.preview(job.id) if not skip_current_image else None
    state = ProgressState(
        job=job.id,
        job_count=len(jobs),
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        sampling_step=step,
        sampling_steps=total,
    )
    return ProgressResponse(
        progress=fraction,
        eta_relative=elapsed / fraction - elapsed if fraction > 0 else 0.0,
        state=state,
        current_image=base64.b64encode(shown[0]).decode("ascii") if shown else None,
        textinfo=f"step {step} of {total}" if total else "queued",
    )


@router.post("/interrupt", summary="Cancel the running A1111 jobs (DELETE /v1/jobs/{id} for each)")
def interrupt(request: Request) -> dict[str, Any]:
    svc = service(request)
    for job in a1111_jobs(svc):
        if svc.manager.progress(job.id) is not None:  # running: A1111 stops what it runs, not what waits
            with contextlib.suppress(APIError):  # finished meanwhile
                svc.manager.cancel(job.id)
    return {}


@router.post("/skip", summary="As interrupt: a pictor job's images share one run, so none is skipped alone")
def skip(request: Request) -> dict[str, Any]:
    return interrupt(request)


# -- what the server has ------------------------------------------------------------------------------------


@router.get("/samplers", response_model=list[SamplerItem], summary="pictor's samplers by A1111 name")
def samplers() -> list[dict[str, Any]]:
    return sampler_list()


@router.get("/schedulers", response_model=list[SchedulerItem], summary="Schedule types")
def schedulers() -> list[dict[str, Any]]:
    return scheduler_list()


@router.get(
    "/upscalers", response_model=list[UpscalerItem], summary="Hires upscalers: Lanczos and the server's"
)
def upscalers(request: Request) -> list[UpscalerItem]:
    svc = service(request)
    out = [UpscalerItem(name="None", scale=4), UpscalerItem(name="Lanczos", scale=4)]
    pipe = svc.manager.pipeline
    loaded = getattr(pipe, "upscaler", None) if pipe is not None else None
    if loaded is not None:
        path = str(svc.settings.upscaler) if svc.settings.upscaler else None
        out.append(
            UpscalerItem(
                name=loaded.name, model_name=loaded.architecture, model_path=path, scale=loaded.scale
            )
        )
    elif svc.settings.upscaler is not None:  # loaded with the model, which is still loading
        out.append(UpscalerItem(name=svc.settings.upscaler.stem, model_path=str(svc.settings.upscaler)))
    return out


@router.get("/sd-models", response_model=list[SDModelItem], summary="The served model, as a checkpoint")
def sd_models(request: Request) -> list[SDModelItem]:
    return [served_model(service(request))]


@router.get("/options", summary="A1111's settings clients read: the served model among them")
def get_options(request: Request) -> dict[str, Any]:
    svc = service(request)
    card = served_model(svc)
    previews = svc.settings.previews != "off"
    return {"sd_model_checkpoint": card.title, "sd_checkpoint_hash": card.sha256, **OPTIONS} | {
        "live_previews_enable": previews
    }


@router.post(
    "/options", summary="Set options: the served model is accepted, another is a 400; UI options ignored"
)
def set_options(request: Request, body: Annotated[dict[str, Any], Body()]) -> None:
    svc = service(request)
    check_checkpoint(svc, body.get("sd_model_checkpoint"), "sd_model_checkpoint")
    vae = body.get("sd_vae")
    if vae is not None and (not isinstance(vae, str) or vae.strip().lower() not in SAME_VAE):
        raise APIError(
            400,
            f"sd_vae: {vae!r}: this server decodes with its model's own autoencoder; send Automatic or leave "
            "it out",
            param="sd_vae",
            code="model_not_found",
        )


@router.get(
    "/loras", response_model=list[LoraItem], summary="The LoRAs of --lora-dir (<lora:NAME:WEIGHT> tags)"
)
def loras(request: Request) -> list[LoraItem]:
    files = list(service(request).library.files.values())
    return [
        LoraItem(name=f.name, alias=f.name, path=str(f.path), metadata={"sha256": f.sha256}) for f in files
    ]


@router.post("/refresh-loras", summary="Read --lora-dir again (POST /v1/loras/refresh)")
def refresh_loras(request: Request) -> None:
    library = service(request).library
    if library.folder is not None:
        library.refresh()


@router.post("/refresh-checkpoints", summary="Nothing to do: the server serves one model")
@router.post("/refresh-vae", summary="Nothing to do: the model's own autoencoder decodes")
def refresh_nothing() -> None:
    return None


@router.get("/sd-vae", summary="Empty: the model's own autoencoder decodes")
@router.get("/latent-upscale-modes", summary="Empty: pictor's hires fix enlarges pictures, not latents")
@router.get("/prompt-styles", summary="Empty: pictor keeps no prompt styles")
@router.get("/face-restorers", summary="Empty: pictor has no face restoration")
@router.get("/hypernetworks", summary="Empty")
@router.get("/script-info", summary="Empty: pictor runs no A1111 scripts")
def nothing() -> list[Any]:
    return []


@router.get("/scripts", summary="No A1111 scripts")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings", summary="No textual-inversion embeddings")
def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


@router.post(
    "/png-info", response_model=PNGInfoResponse, summary="A picture's A1111 parameters and text chunks"
)
def png_info(body: PNGInfoRequest, request: Request) -> PNGInfoResponse:
    if not body.image.strip():
        raise field_error("image", "send a picture, base64 (or a data:image/png;base64,... URL)")
    picture = decode_base64_image(body.image, "image", service(request).settings.limits, fitted=True)
    items = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop(PARAMETERS_KEY, "")
    return PNGInfoResponse(info=text, items=items, parameters=parameters_fields(text))


# -- the router in the app --------------------------------------------------------------------------------


@router.api_route(
    "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
)
def not_here(rest: str, request: Request) -> None:
    """An A1111 endpoint pictor has not (or a method it does not take), in A1111's error shape."""
    path = f"/sdapi/v1/{rest}"
    allowed = sorted(
        m
        for route in [*extras_router.routes, *router.routes]
        if getattr(route, "path", None) == path
        for m in getattr(route, "methods", ())
    )
    if allowed:
        raise APIError(
            405,
            f"method {request.method} is not allowed on {path}; use {', '.join(allowed)}",
            code="method_not_allowed",
            headers={"Allow": ", ".join(allowed)},
        )
    raise APIError(
        404,
        f"no such endpoint: {request.method} {path}; pictor's A1111 API has txt2img, img2img, progress, "
        "interrupt, skip, options, sd-models, samplers, schedulers, upscalers, loras, png-info, "
        "extra-single-image and extra-batch-images",
        code="not_found",
    )


# A1111's liveness probe, outside /sdapi (clients ask it before anything else): open, as /healthz is.
probe = APIRouter(tags=["A1111-compatible"])


@probe.get("/internal/ping", summary="A1111's liveness probe: {} while the server is up (as /healthz)")
def internal_ping() -> dict[str, Any]:
    return {}


def install(app: FastAPI) -> None:
    """Serve /sdapi/v1 on `app`, and keep its 422s in the OpenAPI document (which drops FastAPI's own), with
    HTTP Basic beside the Bearer key as a way in (the guard checks both)."""
    # before `router`, whose last route answers every other /sdapi path
    app.include_router(extras_router, responses=ERRORS)
    app.include_router(router)
    app.include_router(probe)
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain()  # FastAPI's, made once and kept: what is added here is added once
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/A1111Error"}}}
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes.setdefault("HTTPBasic", BASIC_SCHEME)
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/sdapi/"):
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.setdefault(
                        "422", {"description": "A field pictor cannot take", "content": content}
                    )
                    security = operation.setdefault("security", [])
                    if {"HTTPBasic": []} not in security:
                        security.append({"HTTPBasic": []})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
