"""``create_app(settings, pipeline=None)``: the FastAPI app of ``pictor serve``.

One process, one model: the job manager's worker thread owns the pipeline (given, or loaded from
``settings.model`` at start-up, while /healthz already answers and /readyz says "loading").
Every error is OpenAI-shaped JSON; bad input is a 4xx, and nothing a client sends makes a 5xx.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from pictor import __version__
from pictor.generation_settings import tiling_problem
from pictor.lora_tools import model_linears
from pictor.models.lora import linear_layers
from pictor.pipeline import Pipeline
from pictor.serve import a1111_api, edits, settings_from, upscales, variations
from pictor.serve.api_models import Health
from pictor.serve.errors import APIError, error_body
from pictor.serve.head import HeadAsGet
from pictor.serve.jobs import JobManager
from pictor.serve.lora_library import LoraLibrary
from pictor.serve.metrics import CONTENT_TYPE, Metrics
from pictor.serve.routes import COMMON_ERRORS, bearer, router
from pictor.serve.security import BlockList, Guard, PromptPolicy
from pictor.serve.service import Service
from pictor.serve.settings import ServeSettings
from pictor.serve.store import Store

log = logging.getLogger("pictor.serve")
STATIC = Path(__file__).parent / "static"

DESCRIPTION = """Text-to-image generation with pictor.

* `POST /v1/images/generations` is OpenAI's Images API (the `openai` client works unchanged; pictor's
  `seed`, `steps`, `guidance`, `negative_prompt`, `sampler`, `schedule`, `layout`, `regions` (regional
  prompts: `[{"box": [x0, y0, x1, y1], "prompt": "...", "strength": 1}]`, any model), `regional_attention`
  (`true` runs the regions as one pass with a masked attention, each region's prompt reaching only its box,
  instead of a pass per region; needs `regions`; Regional-Prompting-FLUX's controls of it: `regional_steps`,
  `regional_double_interval`, `regional_single_interval`, `regional_base_ratio`), `composable` (A1111's
  composable diffusion: `true` runs the prompt's parts joined by AND, each with an optional `:weight`, as
  passes guided together, any model),
  `reference_image`, `context_image` (FLUX.1 Kontext), `control_image` and `control_canny` (FLUX.1 Canny /
  Depth), `redux_image` and `redux_strength` (FLUX.1 Redux), `ip_adapter_image` and `ip_adapter_scale` (XLabs'
  FLUX.1 IP-Adapter, on a server started with `--ip-adapter-model` and `--clip-vision`), `controlnet_images`,
  `controlnet_scales`, `controlnet_modes`, `controlnet_start` and `controlnet_end` (FLUX.1 ControlNets, on a
  server started with `--controlnet`) go in `extra_body`).
* `POST /v1/images/edits` is OpenAI's image edit (multipart: `image`, `mask`; `layout` and `regions` as
  their JSON text; pictor's `reference_image`, `context_image`, `control_image`, `redux_image` and
  `ip_adapter_image` as further files, `controlnet_image` files (the field repeated, one per ControlNet),
  `control_canny`, `redux_strength`, `ip_adapter_scale`, `composable`, `regional_attention` (and its four
  controls) and the ControlNet settings as fields); `POST /v1/jobs/edits` queues it.
* `POST /v1/images/variations` is OpenAI's image variation (multipart: `image`): an img2img edit of the
  picture (strength 0.7, an optional `prompt`; the picture is also the reference on a model with a
  reference adapter), or, on a server with FLUX.1 Redux loaded, a generation with the picture as its
  `redux_image` (no img2img; `redux_strength` instead of `strength`); `POST /v1/jobs/variations` queues it.
* `POST /v1/images/upscale` enlarges a picture with the server's upscale model (ESRGAN, Real-ESRGAN...; on a
  server started with `--upscaler FILE`; multipart: `image`, `scale`, `tile`, `overlap`); `POST
  /v1/jobs/upscales` queues it. Generations may name that model as their `hires_upscaler`.
* `POST /v1/images/settings` reads an uploaded image's pictor record or A1111 parameters text and answers
  its prompt and settings as a generation body (A1111's PNG Info; nothing is kept).
* `POST /v1/jobs` queues the same request and returns at once; follow it with `GET /v1/jobs/{id}` or the
  server-sent events of `GET /v1/jobs/{id}/events`.
* With an API key, every `/v1` request needs `Authorization: Bearer KEY`; image URLs carry a signature.
"""

ID_FIELDS = ("job_id", "image_id")


def create_app(
    settings: ServeSettings, pipeline: Pipeline | None = None, policy: PromptPolicy | None = None
) -> FastAPI:
    store = Store(settings.data_dir)
    metrics = Metrics()

    def load_model() -> Pipeline:
        from pictor.loading import load

        pipe = load(
            settings.model,
            device=settings.device,
            offload=settings.offload,
            blocks_on_device=settings.blocks_on_device,
        )
        factor = pipe.autoencoder.params.downsample_factor
        problem = tiling_problem(factor, settings.vae_tile, settings.vae_tile_overlap)
        if problem:  # refused at load: the health check and every request say why
            raise ValueError(f"--vae-tile does not fit model '{pipe.name}': {problem}")
        if settings.redux_model is not None and settings.siglip is not None:
            pipe.set_redux(settings.redux_model, settings.siglip)  # a bad file: /readyz says why
        if settings.ip_adapter_model is not None and settings.clip_vision is not None:
            pipe.set_ip_adapter(settings.ip_adapter_model, settings.clip_vision)  # likewise
        for path in settings.controlnets:  # in order: requests give their pictures in this order
            try:
                pipe.add_controlnet(path)
            except ValueError as exc:  # a bad file, or one made for another model: /readyz says which flag
                message = str(exc)  # most name the file already
                where = "" if message.startswith(str(path)) else f"{path}: "
                raise ValueError(f"--controlnet {where}{message}") from exc
        if settings.upscaler is not None:  # a bad file fails the load, and /readyz names the flag and file
            try:
                pipe.set_upscaler(settings.upscaler)
            except ValueError as exc:  # the loader's messages start with the file's path
                message = str(exc)
                where = "" if message.startswith(str(settings.upscaler)) else f"{settings.upscaler}: "
                raise ValueError(f"--upscaler {where}{message}") from exc
        return pipe

    library = lora_library(settings, pipeline)
    manager = JobManager(
        store, settings, metrics, pipeline=pipeline, loader=None if pipeline else load_model, library=library
    )
    if policy is None and settings.block_words:
        policy = BlockList(settings.block_words)
    svc = Service(settings, store, manager, metrics, policy, library)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            # The running batch finishes (bounded by the job timeout); queued jobs stay queued on disk.
            await run_in_threadpool(manager.stop, settings.job_timeout + 5)
            if manager._thread is None or not manager._thread.is_alive():
                store.close()

    app = FastAPI(title="pictor", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = svc
    # Each loaded ControlNet is one more picture a request may carry, so the body caps grow by that many.
    served = (getattr(pipeline, "controlnets", None) or []) if pipeline is not None else settings.controlnets
    app.add_middleware(Guard, settings=settings, controlnets=len(served))
    app.add_middleware(HeadAsGet)  # outermost: the guard and the routes see a GET
    _add_error_handlers(app)
    # Variations and upscales first: their 405 routes must come before the main router's GET
    # /v1/images/{image_id}.
    app.include_router(variations.router)
    app.include_router(upscales.router)
    app.include_router(settings_from.router)
    app.include_router(router)
    app.include_router(edits.router)
    _add_ops_routes(app, svc)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    a1111_api.install(app)  # /sdapi/v1: AUTOMATIC1111's API (after the document's hook, which it extends)
    return app


def lora_library(settings: ServeSettings, pipeline: Pipeline | None) -> LoraLibrary:
    """The LoRAs of --lora-dir, checked against the served model's layers (read off its config when the
    model is still to be loaded, so a bad folder is named before the server listens)."""
    if settings.lora_dir is None:
        return LoraLibrary()
    if pipeline is not None:
        layers = linear_layers(pipeline.transformer)
        linears = {p: (m.in_features, m.out_features) for p, m in layers.items()}
    else:
        linears = model_linears(settings.model)
    return LoraLibrary(Path(settings.lora_dir), linears)


def _add_ops_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="The process is up")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["ops"],
        responses={503: {"model": Health, "description": "Model loading, failed, or shutting down"}},
        summary="The model is loaded and jobs are taken",
    )
    def readyz() -> Any:
        manager = svc.manager
        if manager.load_error and not manager.loading:  # loading again: "loading" below
            health = Health(status="error", detail=f"the model failed to load: {manager.load_error}")
        elif manager.draining:
            health = Health(status="draining", detail="shutting down; no new jobs")
        elif manager.pipeline is None:
            health = Health(status="loading", model=svc.settings.model)
        else:
            return Health(status="ready", model=manager.pipeline.ref or manager.pipeline.name)
        return JSONResponse(health.model_dump(), status_code=503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["ops"],
        dependencies=[Depends(bearer)],  # documentation: the Guard asks for the key when there is one
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: COMMON_ERRORS[401]},
        summary="Prometheus metrics (with the API key when the server has one)",
    )
    def metrics() -> PlainTextResponse:
        text = svc.metrics.render(svc.manager.queue_depth(), svc.store.counts_by_status(), svc.manager.ready)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)


# -- errors ---------------------------------------------------------------------------------------------


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        where = ".".join(loc)
        kind = e.get("type", "")
        if kind == "json_invalid":
            text = f"malformed JSON ({e.get('ctx', {}).get('error', 'cannot parse')}); send a JSON object"
            loc, where = [], ""
        elif kind == "missing" and not loc:
            text = "the request body is missing; send a JSON object"
        elif kind in ("dict_type", "model_attributes_type") and not loc:
            text = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
        elif kind == "missing":
            text = f"'{where}' is required"
        elif kind == "extra_forbidden":
            text = f"unknown field '{where}'"
        elif kind == "string_pattern_mismatch" and loc and loc[-1] in ID_FIELDS:
            text = f"{where} must be 32 lowercase hex characters (a uuid without dashes)"
        elif kind == "string_pattern_mismatch" and loc == ["size"]:
            text = "size must be WIDTHxHEIGHT (e.g. 64x64) or 'auto'"
        else:
            text = f"{where or 'request body'}: {e.get('msg', 'invalid value')}"
        parts.append(text)
        param = param or (where or None)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more problems")
    return "; ".join(parts), param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if await _image_list_sent(request, errors):
            kind = "a variation" if request.url.path.endswith("/variations") else "an edit"
            return JSONResponse(
                error_body(
                    f"{kind} takes one image, as the field 'image'; lists of images (image[]) are not "
                    "supported",
                    code="invalid_request",
                    param="image",
                ),
                status_code=400,
            )
        message, param = _validation_message(errors)
        return JSONResponse(error_body(message, code="invalid_request", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail)
        if (status == 404 and exc.detail == "Not Found") or (
            # POST /v1/images/inpaint & co. meet GET /v1/images/{image_id}: an endpoint that is not here
            status == 405 and request.method == "POST" and request.url.path.startswith("/v1/images/")
        ):
            message = f"no such endpoint: {request.method} {request.url.path}"
            if request.url.path.startswith("/v1/images/"):
                message += (
                    "; the image endpoints are POST /v1/images/generations, POST /v1/images/edits, "
                    "POST /v1/images/variations and POST /v1/images/upscale"
                )
            return JSONResponse(error_body(message, code="not_found"), status_code=404)
        if status == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's words for a body json cannot read: bytes that are not UTF-8, an integer of more
            # than 4,300 digits (Python's limit)
            message = (
                "the request body could not be read as JSON: send a JSON object in UTF-8, with numbers "
                "of at most 4,300 digits"
            )
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed_methods(request))}
            return JSONResponse(
                error_body(message, code="method_not_allowed"), status_code=405, headers=headers
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(status)
        return JSONResponse(error_body(message, code=code), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error", "internal"), status_code=500)


async def _image_list_sent(request: Request, errors: list[Any]) -> bool:
    """Whether a multipart edit (or variation) lacks 'image' because it sent 'image[]' (the openai client's
    list form)."""
    missing_image = any(
        e.get("type") == "missing" and list(e.get("loc", ()))[-1:] == ["image"] for e in errors
    )
    if not missing_image or not (request.headers.get("content-type") or "").startswith("multipart/"):
        return False
    return "image[]" in (await request.form())


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with 422 replaced by the 400 this server really sends for invalid input."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                # FastAPI files error models under the route's media type (image/png, text/event-stream);
                # errors are always JSON.
                if int(status) >= 400 and "ErrorResponse" in json.dumps(response):
                    response["content"] = error_content
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    # This server's limits, so the document says what it accepts (pixels and size multiples stay prose).
    limits = app.state.service.settings.limits
    fields = components.get("ImageGenerationRequest", {}).get("properties", {})
    for name, key, value in (
        ("n", "maximum", limits.max_images),
        ("steps", "maximum", limits.max_steps),
        ("prompt", "maxLength", limits.max_prompt_chars),
    ):
        for option in fields.get(name, {}).get("anyOf", [fields.get(name, {})]):
            if option.get("type") in ("integer", "string"):
                option[key] = value
    app.openapi_schema = schema
    return schema
