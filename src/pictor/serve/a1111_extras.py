"""A1111's Extras endpoints, ``POST /sdapi/v1/extra-single-image`` and ``/extra-batch-images``: upscale
pictures as A1111's Extras tab does (`a1111_postprocess` has its sizes, crop and blend).

The upscalers are "None", "Lanczos" and "Nearest" (Pillow, as A1111's own) and the server's upscale model
(``pictor serve --upscaler``) by the name ``GET /sdapi/v1/upscalers`` lists. A picture the model upscales is
an upscale job (`upscales.upscale_params`: the queue, history, cancel, limits and tiles of ``POST
/v1/images/upscale``), run at the model's factor to the power of the runs A1111 makes, and finished in the
job with A1111's exact Lanczos resize, crop and blend (`upscale_runs` calls `a1111_postprocess.finish`), so
that the history keeps the very PNG the answer carries. A picture no model touches is resized here, at once,
and kept nowhere, as A1111 keeps it nowhere (``save_output=False``); its PNG carries the picture's own text
chunks and A1111's ``postprocessing`` text, but not a pictor record, which would name other pixels.

Face restoration (``gfpgan_visibility``, ``codeformer_visibility`` above 0) is refused: A1111 restores faces
there (it fetches GFPGAN and CodeFormer itself, and fails the request when CodeFormer is missing); pictor has
no face restorer.
"""

from __future__ import annotations

import base64
import contextlib
import io
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from pictor.provenance import RECORD_KEY, RENDER_KEY
from pictor.serve import a1111_postprocess as post
from pictor.serve.a1111_errors import A1111Route, field_error
from pictor.serve.a1111_loading import when_loaded
from pictor.serve.a1111_params import API_MARK
from pictor.serve.errors import APIError
from pictor.serve.routes import bearer, finished_images
from pictor.serve.service import Service, service
from pictor.serve.store import JobRow
from pictor.serve.uploads import decode_base64_image
from pictor.serve.upscales import UpscaleForm, served_upscaler, upscale_params
from pictor.upscaler_files import UpscalerFile
from pictor.upscaling import DEFAULT_OVERLAP, DEFAULT_TILE, MAX_SCALE, with_alpha

router = APIRouter(
    prefix="/sdapi/v1", route_class=A1111Route, dependencies=[Depends(bearer)], tags=["A1111-compatible"]
)
Visibility = Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)]


class ExtrasBase(BaseModel):
    """A1111's ``ExtrasBaseRequest``; a field it has not is accepted and ignored, as A1111 does."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int | None = Field(
        0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h."
    )
    show_extras_results: bool | None = Field(True, description="Ignored, as A1111 ignores it here.")
    gfpgan_visibility: Visibility = Field(0, description="Refused above 0: pictor has no face restorer.")
    codeformer_visibility: Visibility = Field(0, description="Refused above 0: pictor has no face restorer.")
    codeformer_weight: Visibility = Field(0, description="Ignored (CodeFormer's).")
    upscaling_resize: float | None = Field(
        2, gt=0, le=MAX_SCALE, allow_inf_nan=False, description="The factor (resize_mode 0)."
    )
    upscaling_resize_w: int | None = Field(512, ge=1, le=65535, description="Target width (resize_mode 1).")
    upscaling_resize_h: int | None = Field(512, ge=1, le=65535, description="Target height (resize_mode 1).")
    upscaling_crop: bool | None = Field(True, description="resize_mode 1: exactly the target, centred.")
    upscaler_1: str | None = Field("None", description="None, Lanczos, Nearest or the server's model.")
    upscaler_2: str | None = Field("None", description="Blended in at extras_upscaler_2_visibility.")
    extras_upscaler_2_visibility: Visibility = Field(0, description="upscaler_2's share, 0 to 1.")
    upscale_first: bool | None = Field(False, description="Ignored, as A1111 ignores it.")


class ExtrasSingleImageRequest(ExtrasBase):
    image: str | None = Field("", description="A base64 PNG, JPEG or WebP (a data: URL too).")


class FileData(BaseModel):
    data: str = Field(description="A base64 PNG, JPEG or WebP (a data: URL too).")
    name: str = Field(description="Its file name (A1111's API ignores it; so does pictor).")


class ExtrasBatchImagesRequest(ExtrasBase):
    imageList: list[FileData] = Field(description="The pictures; the answer keeps their order.")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="A1111's postprocessing text as HTML.")
    image: str = Field(description="A base64 PNG.")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field(description="A1111's postprocessing text (of the last picture) as HTML.")
    images: list[str] = Field(description="Base64 PNGs, in the order sent.")


@dataclass
class Plan:
    """One picture's work: the picture (RGB, its text chunks kept), its settings, and the model's runs."""

    picture: Image.Image
    spec: dict[str, Any]
    runs: int


def upscaler_names(svc: Service) -> list[str]:
    """The names the Extras upscalers take, as GET /sdapi/v1/upscalers lists them (and Nearest)."""
    pipe = svc.manager.pipeline
    loaded = getattr(pipe, "upscaler", None) if pipe is not None else None
    if loaded is not None:
        return [*post.BUILT_IN, loaded.name]
    return [*post.BUILT_IN, *([svc.settings.upscaler.stem] if svc.settings.upscaler is not None else [])]


def checked_names(svc: Service, body: ExtrasBase) -> tuple[str, str]:
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, field):
            raise field_error(
                field,
                "pictor has no face restorer (GET /sdapi/v1/face-restorers is empty); send 0 or leave it out",
            )
    names = upscaler_names(svc)
    chosen = []
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(body, field) or post.NONE
        if name not in names:
            raise field_error(
                field, f"{name!r} is not an upscaler of this server; send one of {', '.join(names)}"
            )
        chosen.append(name)
    return chosen[0], chosen[1]


def model_used(names: tuple[str, str], visibility: float) -> str | None:
    """The upscale model's name where the request runs it, else None."""
    first, second = names
    if first == post.NONE:
        return None
    if first not in post.PILLOW:
        return first
    return second if second not in post.BUILT_IN and visibility > 0 else None


def plan(svc: Service, body: ExtrasBase, picture: Image.Image, upscaler: UpscalerFile | None) -> Plan:
    """A picture's sizes by A1111's rules, held to the server's pixel limit before any work."""
    names = checked_names(svc, body)
    rgb = with_alpha(picture).convert("RGB")  # A1111's Extras upscale RGB (its alpha dropped, as there)
    rgb.info = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
    spec = plan_spec(body, rgb, model_used(names, body.extras_upscaler_2_visibility or 0.0))
    sizes = post.Sizing(spec["scale"], tuple(spec["dest"]), tuple(spec["crop"]) if spec["crop"] else None)
    mode, model = spec["resize_mode"], spec["model"]
    if names[0] == post.NONE:
        return Plan(rgb, spec, 0)
    field = "upscaling_resize" if mode == 0 else "upscaling_resize_w"
    if min(sizes.dest) < 1:
        raise field_error(
            field,
            f"a {rgb.width}x{rgb.height} picture at x{sizes.scale:g} is under 8 pixels on a side, "
            "which A1111 rounds down to 0 (to a multiple of 8); ask for a larger size",
        )
    runs = post.model_runs(rgb.size, sizes, upscaler.scale) if model and upscaler else 0
    largest = max(sizes.size[0] * sizes.size[1], sizes.dest[0] * sizes.dest[1])
    if any(n in post.PILLOW for n in names) and sizes.scale >= 1:
        w, h = post.pillow_sizes(rgb.size, sizes.scale)
        largest = max(largest, w * h)
    if runs and upscaler is not None:
        largest = max(largest, rgb.width * rgb.height * upscaler.scale ** (2 * runs))
        if upscaler.scale**runs > MAX_SCALE:
            raise field_error(
                field,
                f"the upscale model would run {runs} times (x{upscaler.scale**runs}), past the x"
                f"{MAX_SCALE:g} pictor's upscales go to; ask for a smaller size",
            )
    limit = svc.settings.limits.max_picture_pixels
    if largest > limit:
        raise field_error(
            field,
            f"the {rgb.width}x{rgb.height} picture upscaled to {sizes.size[0]}x{sizes.size[1]} makes "
            f"{largest} pixels (on the way), more than this server makes ({limit}); ask for a smaller size",
        )
    return Plan(rgb, spec, runs)


def pillow_png(plan: Plan) -> str:
    """A picture no model touched: A1111's result, with the picture's text chunks (not pictor's record) and
    A1111's postprocessing text, base64."""
    image = post.upscaled(plan.picture, plan.spec)
    info = PngImagePlugin.PngInfo()
    for key, value in plan.picture.info.items():
        if key not in (RECORD_KEY, RENDER_KEY, "postprocessing"):
            info.add_itxt(key, value)
    info.add_itxt("postprocessing", post.infotext(plan.spec))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def job_params(svc: Service, plan: Plan, upscaler: UpscalerFile) -> dict[str, Any]:
    """An upscale job at the model's factor for A1111's runs, finished with A1111's steps (`upscale_runs`)."""
    factor = float(upscaler.scale**plan.runs)
    form = UpscaleForm(plan.picture, factor, DEFAULT_TILE, DEFAULT_OVERLAP, None, "b64_json")
    try:
        params = upscale_params(svc, form)
    except APIError as exc:  # its own size check, in the words of the request's fields
        field = "upscaling_resize" if plan.spec["resize_mode"] == 0 else "upscaling_resize_w"
        raise field_error(field, exc.message) from None
    width, height = plan.spec["crop"] or plan.spec["dest"]
    return {**params, **API_MARK, "a1111_extras": plan.spec, "width": width, "height": height}


async def job_png(svc: Service, request: Request, job: JobRow) -> str:
    try:
        done = await finished_images(svc, request, job.id, "b64_json")
    except APIError as exc:
        if exc.code == "job_cancelled":
            raise APIError(
                409,
                f"the upscale job was interrupted (POST /sdapi/v1/interrupt, or DELETE /v1/jobs/{job.id}) "
                "before it finished; send the request again",
                code="interrupted",
            ) from None
        raise
    return done.data[0].b64_json or ""


async def extras(
    svc: Service, request: Request, body: ExtrasBase, pictures: list[Image.Image]
) -> tuple[list[str], str]:
    """Every picture checked and sized first; then the model's jobs queued, the rest resized; in order."""
    names = await run_in_threadpool(checked_names, svc, body)
    upscaler = None
    if model_used(names, body.extras_upscaler_2_visibility or 0.0):
        upscaler = await when_loaded(svc, request, lambda: served_upscaler(svc))
        names = await run_in_threadpool(checked_names, svc, body)  # the loaded model's name
    plans = [await run_in_threadpool(plan, svc, body, p, upscaler) for p in pictures]
    jobs: dict[int, JobRow] = {}
    try:
        for i, p in enumerate(plans):
            if p.runs and upscaler is not None:
                params = await run_in_threadpool(job_params, svc, p, upscaler)
                jobs[i] = await run_in_threadpool(svc.submit, params, None)
        out = [
            await job_png(svc, request, jobs[i]) if i in jobs else await run_in_threadpool(pillow_png, p)
            for i, p in enumerate(plans)
        ]
    except BaseException:
        for job in jobs.values():
            with contextlib.suppress(APIError):  # finished meanwhile
                svc.manager.cancel(job.id)
        raise
    # A1111 answers the text of the last picture it made
    return out, post.html_info(post.infotext(plans[-1].spec) if plans else "")


def read_picture(svc: Service, text: str | None, field: str) -> Image.Image:
    if not (text or "").strip():
        raise field_error(field, "send a picture, base64 (or a data:image/png;base64,... URL)")
    try:
        return decode_base64_image(text or "", field, svc.settings.limits, fitted=True)
    except APIError as exc:
        exc.param = field.split("[")[0]  # the request's field: imageList for imageList[2].data
        raise


@router.post(
    "/extra-single-image",
    response_model=ExtrasSingleImageResponse,
    summary="A1111's Extras upscale of one picture (None, Lanczos, Nearest or the server's upscale model)",
)
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> ExtrasSingleImageResponse:
    svc = service(request)
    picture = await run_in_threadpool(read_picture, svc, body.image, "image")
    (image,), html_info = await extras(svc, request, body, [picture])
    return ExtrasSingleImageResponse(html_info=html_info, image=image)


@router.post(
    "/extra-batch-images",
    response_model=ExtrasBatchImagesResponse,
    summary="A1111's Extras upscale of several pictures, answered in the order sent",
)
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> ExtrasBatchImagesResponse:
    svc = service(request)
    pictures = [
        await run_in_threadpool(read_picture, svc, item.data, f"imageList[{i}].data")
        for i, item in enumerate(body.imageList)
    ]
    images, html_info = await extras(svc, request, body, pictures)
    return ExtrasBatchImagesResponse(html_info=html_info, images=images)


def plan_spec(body: ExtrasBase, picture: Image.Image, model: str | None) -> dict[str, Any]:
    """The settings of the picture's upscale (`model`: the upscale model's name where it runs)."""
    first, second = body.upscaler_1 or post.NONE, body.upscaler_2 or post.NONE
    visibility = body.extras_upscaler_2_visibility or 0.0
    mode = int(body.resize_mode or 0)
    by = body.upscaling_resize if body.upscaling_resize is not None else 2.0
    target = (body.upscaling_resize_w or 512, body.upscaling_resize_h or 512)
    sizes = post.sizing(picture.width, picture.height, mode, by, *target, body.upscaling_crop is not False)
    return post.extras_spec((first, second), visibility, sizes, model, mode, by, target)
