"""A1111's Extras endpoints, ``POST /sdapi/v1/extra-single-image`` and ``/extra-batch-images``: upscale
pictures as A1111's Extras tab does (`a1111_postprocess` has its sizes, crop and blend).

The upscalers are "None", "Lanczos" and "Nearest" (Pillow, as A1111's own) and the server's upscale model
(``pictor serve --upscaler``) by the name ``GET /sdapi/v1/upscalers`` lists. A picture the model upscales is
an upscale job (`upscales.upscale_params`: the queue, history, cancel, limits and tiles of ``POST
/v1/images/upscale``), run as many times as A1111 runs the model (its ``runs``: up to 3, held to the pixel
limit, not to pictor's x16), and finished in the job with A1111's exact Lanczos resize, crop and blend
(`upscale_runs` calls `a1111_postprocess.finish`), so that the history keeps the very PNG the answer carries.
A picture no model touches is resized here, at once, and kept nowhere, as A1111 keeps it nowhere
(``save_output=False``); its PNG carries the picture's own text chunks and A1111's ``postprocessing`` text,
but not a pictor record, which would name other pixels.

Face restoration (``gfpgan_visibility``, ``codeformer_visibility`` above 0) is refused: A1111 restores faces
there (it fetches GFPGAN and CodeFormer itself, and fails the request when CodeFormer is missing); pictor has
no face restorer.
"""

from __future__ import annotations

import base64
import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from anyio.lowlevel import RunVar
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from pictor.provenance import RECORD_KEY, RENDER_KEY
from pictor.serve import a1111_postprocess as post
from pictor.serve.a1111_errors import A1111Route, field_error
from pictor.serve.a1111_loading import when_loaded
from pictor.serve.a1111_models import Flag
from pictor.serve.a1111_params import API_MARK
from pictor.serve.errors import APIError
from pictor.serve.routes import bearer, finished_images
from pictor.serve.service import Service, service
from pictor.serve.store import JobRow
from pictor.serve.uploads import FORMATS, base64_bytes, decode_upload
from pictor.serve.upscales import UpscaleForm, served_upscaler, upscale_params
from pictor.upscaler_files import UpscalerFile
from pictor.upscaling import DEFAULT_OVERLAP, DEFAULT_TILE, MAX_SCALE, tile_count, with_alpha

router = APIRouter(
    prefix="/sdapi/v1", route_class=A1111Route, dependencies=[Depends(bearer)], tags=["A1111-compatible"]
)
PILLOW_WORKERS = 2  # pictures decoded and resized at once, over all Extras requests (each up to ~0.4 GB)
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("pictor_extras_pillow_work")  # one per event loop
ORIENTATION = 0x0112
Visibility = Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)]


class ExtrasBase(BaseModel):
    """A1111's ``ExtrasBaseRequest``; a field it has not is accepted and ignored, as A1111 does. Strict
    JSON types (a number for a number, 0 / 1 or false / true for a switch), as the document says: these
    endpoints take no prompt text whose numbers arrive as strings."""

    model_config = ConfigDict(extra="allow", strict=True)

    resize_mode: int | None = Field(
        0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h."
    )
    show_extras_results: Flag | None = Field(True, description="Ignored, as A1111 ignores it here.")
    gfpgan_visibility: Visibility = Field(0, description="Refused above 0: pictor has no face restorer.")
    codeformer_visibility: Visibility = Field(0, description="Refused above 0: pictor has no face restorer.")
    codeformer_weight: Visibility = Field(0, description="Ignored (CodeFormer's).")
    upscaling_resize: float | None = Field(
        2, gt=0, le=MAX_SCALE, allow_inf_nan=False, description="The factor (resize_mode 0)."
    )
    upscaling_resize_w: int | None = Field(512, ge=1, le=65535, description="Target width (resize_mode 1).")
    upscaling_resize_h: int | None = Field(512, ge=1, le=65535, description="Target height (resize_mode 1).")
    upscaling_crop: Flag | None = Field(True, description="resize_mode 1: exactly the target, centred.")
    upscaler_1: str | None = Field("None", description="None, Lanczos, Nearest or the server's model.")
    upscaler_2: str | None = Field("None", description="Blended in at extras_upscaler_2_visibility.")
    extras_upscaler_2_visibility: Visibility = Field(0, description="upscaler_2's share, 0 to 1.")
    upscale_first: Flag | None = Field(False, description="Ignored, as A1111 ignores it.")


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
    """One picture's work by A1111's rules: its settings (with the model's runs) and the most pixels it
    makes (the result, or a picture on the way)."""

    spec: dict[str, Any]
    runs: int
    largest: int


@dataclass
class Sent:
    """A picture as sent: its bytes, the field that named it, and its size from the header (as shown)."""

    data: bytes
    field: str
    size: tuple[int, int]


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


def size_field(body: ExtrasBase) -> str:
    return "upscaling_resize" if int(body.resize_mode or 0) == 0 else "upscaling_resize_w"


def plan(
    svc: Service,
    body: ExtrasBase,
    names: tuple[str, str],
    size: tuple[int, int],
    upscaler: UpscalerFile | None,
) -> Plan:
    """A width x height picture's sizes by A1111's rules, held to the server's pixel limit before any work:
    the result and every picture on the way (a Lanczos or Nearest run, each of the model's runs)."""
    spec = plan_spec(body, size, model_used(names, body.extras_upscaler_2_visibility or 0.0))
    if names[0] == post.NONE:
        return Plan({**spec, "runs": 0}, 0, 0)
    sizes = post.Sizing(spec["scale"], tuple(spec["dest"]), tuple(spec["crop"]) if spec["crop"] else None)
    width, height = size
    field = size_field(body)
    if min(sizes.dest) < 1:
        raise field_error(
            field,
            f"a {width}x{height} picture at x{sizes.scale:g} is under 8 pixels on a side, "
            "which A1111 rounds down to 0 (to a multiple of 8); ask for a larger size",
        )
    runs = post.model_runs(size, sizes, upscaler.scale) if spec["model"] and upscaler else 0
    largest = max(sizes.size[0] * sizes.size[1], sizes.dest[0] * sizes.dest[1])
    if any(n in post.PILLOW for n in names) and sizes.scale >= 1:
        w, h = post.pillow_sizes(size, sizes.scale)
        largest = max(largest, w * h)
    if runs and upscaler is not None:  # A1111 runs the model up to 3 times, whatever its factor
        largest = max(largest, width * height * upscaler.scale ** (2 * runs))
    limit = svc.settings.limits.max_picture_pixels
    if largest > limit:
        on_the_way = f", {runs} run(s) of the x{upscaler.scale} model" if runs and upscaler else ""
        raise field_error(
            field,
            f"the {width}x{height} picture upscaled to {sizes.size[0]}x{sizes.size[1]} makes "
            f"{largest} pixels (on the way{on_the_way}), more than this server makes ({limit}); "
            "ask for a smaller size",
        )
    return Plan({**spec, "runs": runs}, runs, largest)


def rgb_picture(picture: Image.Image) -> Image.Image:
    """The picture as A1111's Extras upscale it: RGB (alpha dropped; 16-bit grey scaled to 8 bits, not
    clipped), its text chunks kept."""
    rgb = with_alpha(picture).convert("RGB")
    rgb.info = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
    return rgb


def pillow_png(picture: Image.Image, spec: dict[str, Any]) -> str:
    """A picture no model touched: A1111's result, with the picture's text chunks (not pictor's record) and
    A1111's postprocessing text, base64."""
    image = post.upscaled(picture, spec)
    info = PngImagePlugin.PngInfo()
    for key, value in picture.info.items():
        if key not in (RECORD_KEY, RENDER_KEY, "postprocessing"):
            info.add_itxt(key, value)
    info.add_itxt("postprocessing", post.infotext(spec))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def job_params(
    svc: Service, body: ExtrasBase, picture: Image.Image, p: Plan, upscaler: UpscalerFile
) -> dict[str, Any]:
    """An upscale job for A1111's runs of the model, finished with A1111's steps (`upscale_runs`). The form's
    one run at the model's factor is held to the limits there; `plan` held every run to them."""
    form = UpscaleForm(picture, float(upscaler.scale), DEFAULT_TILE, DEFAULT_OVERLAP, None, "b64_json")
    try:
        params = upscale_params(svc, form)
    except APIError as exc:  # its own size check, in the words of the request's fields
        raise field_error(size_field(body), exc.message) from None
    s = upscaler.scale
    tiles = sum(
        tile_count(upscaler.net, picture.width * s**i, picture.height * s**i, s, DEFAULT_TILE)
        for i in range(p.runs)
    )
    width, height = p.spec["crop"] or p.spec["dest"]
    extras = {"a1111_extras": p.spec, "scale": float(s**p.runs), "tiles": tiles}
    return {**params, **API_MARK, **extras, "width": width, "height": height}


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


def picture_bytes(svc: Service, text: str | None, field: str) -> bytes:
    """The bytes of a base64 picture (or a data: URL), the upload's size limit and base64 checked."""
    if not (text or "").strip():
        raise field_error(field, "send a picture, base64 (or a data:image/png;base64,... URL)")
    try:
        return base64_bytes(text or "", field, svc.settings.limits)
    except APIError as exc:
        exc.param = field.split("[")[0]  # the request's field: imageList for imageList[2].data
        raise


def header_size(svc: Service, data: bytes, field: str) -> tuple[int, int]:
    """A picture's size as shown (EXIF orientation) from its header, decoding nothing; a picture the upload
    rules refuse is refused as an upload is (`decode_upload`, which stops at the header for those)."""
    limits = svc.settings.limits
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                    width, height = im.size
                    exif = im.info.get("exif")
            if width * height > limits.max_picture_pixels:
                raise ValueError("too large")
        except Exception:
            decode_upload(data, field, limits, fitted=True)  # its own 4xx
            raise
        if isinstance(exif, bytes):
            tags = Image.Exif()
            with contextlib.suppress(Exception):  # a damaged EXIF: exif_transpose leaves it as stored too
                tags.load(exif)
            if tags.get(ORIENTATION) in (5, 6, 7, 8):  # turned a quarter: exif_transpose swaps the sides
                width, height = height, width
        return width, height
    except APIError as exc:
        exc.param = field.split("[")[0]
        raise


def decoded(svc: Service, sent: Sent) -> Image.Image:
    try:
        return rgb_picture(decode_upload(sent.data, sent.field, svc.settings.limits, fitted=True))
    except APIError as exc:
        exc.param = sent.field.split("[")[0]
        raise


def pillow_work() -> anyio.CapacityLimiter:
    """At most PILLOW_WORKERS pictures decoded and resized (or kept for a job) at once, over all Extras
    requests: many requests at once wait their turn instead of each holding its decoded pictures."""
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(PILLOW_WORKERS)
        _limiter.set(limiter)
        return limiter


async def extras(
    svc: Service, request: Request, body: ExtrasBase, texts: list[tuple[str | None, str]]
) -> tuple[list[str], str]:
    """The names, the count, every picture's size (from its header) and the request's pixel budget checked
    before any work; then one picture at a time decoded, sized again and resized (or its job queued), only
    its base64 answer kept; the model's jobs awaited in order."""
    names = checked_names(svc, body)
    limits = svc.settings.limits
    if len(texts) > limits.max_images:
        raise field_error(
            "imageList",
            f"{len(texts)} pictures are more than this server takes in one request "
            f"(max_images, {limits.max_images}); send them in several requests",
        )
    upscaler = None
    if model_used(names, body.extras_upscaler_2_visibility or 0.0):
        upscaler = await when_loaded(svc, request, lambda: served_upscaler(svc))
        names = checked_names(svc, body)  # the loaded model's name
    sent = []
    budget, spent = 2 * limits.max_picture_pixels, 0
    for text, field in texts:
        data = await run_in_threadpool(picture_bytes, svc, text, field)
        size = await run_in_threadpool(header_size, svc, data, field)
        spent += size[0] * size[1] + plan(svc, body, names, size, upscaler).largest
        if spent > budget:
            raise field_error(
                "imageList" if len(texts) > 1 else size_field(body),
                f"the pictures up to {field} read and make {spent} pixels, more than this server does in "
                f"one request ({budget}: twice max_picture_pixels); send fewer or smaller pictures",
            )
        sent.append(Sent(data, field, size))
    out: list[str | None] = []
    jobs: dict[int, JobRow] = {}
    last: dict[str, Any] = {}
    try:
        for i, item in enumerate(sent):
            picture = await anyio.to_thread.run_sync(decoded, svc, item, limiter=pillow_work())
            p = plan(svc, body, names, picture.size, upscaler)  # as decoded (an EXIF the header hid)
            last = p.spec
            if p.runs and upscaler is not None:
                params = await anyio.to_thread.run_sync(
                    job_params, svc, body, picture, p, upscaler, limiter=pillow_work()
                )
                del picture
                jobs[i] = await run_in_threadpool(svc.submit, params, None)
                out.append(None)
            else:
                out.append(await anyio.to_thread.run_sync(pillow_png, picture, p.spec, limiter=pillow_work()))
                del picture
            item.data = b""  # decoded: its bytes are no longer needed
        answers = [
            await job_png(svc, request, jobs[i]) if i in jobs else text or "" for i, text in enumerate(out)
        ]
    except BaseException:
        for job in jobs.values():
            with contextlib.suppress(APIError):  # finished meanwhile
                svc.manager.cancel(job.id)
        raise
    # A1111 answers the text of the last picture it made
    return answers, post.html_info(post.infotext(last) if last else "")


@router.post(
    "/extra-single-image",
    response_model=ExtrasSingleImageResponse,
    summary="A1111's Extras upscale of one picture (None, Lanczos, Nearest or the server's upscale model)",
)
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> ExtrasSingleImageResponse:
    svc = service(request)
    (image,), html_info = await extras(svc, request, body, [(body.image, "image")])
    return ExtrasSingleImageResponse(html_info=html_info, image=image)


@router.post(
    "/extra-batch-images",
    response_model=ExtrasBatchImagesResponse,
    summary="A1111's Extras upscale of several pictures, answered in the order sent",
)
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request) -> ExtrasBatchImagesResponse:
    svc = service(request)
    texts = [(item.data, f"imageList[{i}].data") for i, item in enumerate(body.imageList)]
    images, html_info = await extras(svc, request, body, texts)
    return ExtrasBatchImagesResponse(html_info=html_info, images=images)


def plan_spec(body: ExtrasBase, size: tuple[int, int], model: str | None) -> dict[str, Any]:
    """The settings of a width x height picture's upscale (`model`: the model's name where it runs)."""
    first, second = body.upscaler_1 or post.NONE, body.upscaler_2 or post.NONE
    visibility = body.extras_upscaler_2_visibility or 0.0
    mode = int(body.resize_mode or 0)
    by = body.upscaling_resize if body.upscaling_resize is not None else 2.0
    target = (body.upscaling_resize_w or 512, body.upscaling_resize_h or 512)
    crop = body.upscaling_crop is None or bool(body.upscaling_crop)  # true, 1 (A1111's web UI's) or unset
    sizes = post.sizing(*size, mode, by, *target, crop)
    return post.extras_spec((first, second), visibility, sizes, model, mode, by, target)
