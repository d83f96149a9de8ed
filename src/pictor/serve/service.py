"""The service behind the routes: request validation against limits, policy and model; job views."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from fastapi import Request
from PIL import Image

from pictor.editing import eight_bit
from pictor.hires import hires_size
from pictor.ip_adapter_files import ip_adapter_pixels
from pictor.serve.api_models import Job, JobProgress, JobResult
from pictor.serve.controlnets import decode_pictures, resolved_settings
from pictor.serve.errors import APIError, not_found
from pictor.serve.generation_body import ImageGenerationRequest
from pictor.serve.guidance_fields import checked_guidance_method
from pictor.serve.job_requests import generation_request
from pictor.serve.jobs import JobManager
from pictor.serve.lora_library import LoraLibrary
from pictor.serve.metrics import Metrics
from pictor.serve.pipeline_errors import HIRES_UPSCALER_HELP, REQUEST_ERRORS, request_error
from pictor.serve.regional_fields import FIELDS as REGIONAL_FIELDS
from pictor.serve.regional_fields import checked_regional_options
from pictor.serve.request_checks import (
    check_names,
    check_regional_attention,
    checked_layout,
    checked_regions,
    require_prompt,
)
from pictor.serve.security import PromptPolicy, check_limits, check_policy, check_text, signed_query
from pictor.serve.settings import Limits, ServeSettings
from pictor.serve.store import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobRow, Store
from pictor.serve.upload_retention import delete_uploads, upload_ids
from pictor.serve.uploads import decode_base64_image


def _picture(
    text: str | None,
    what: str,
    limits: Limits,
    flatten: Callable[[Image.Image], np.ndarray] | None = None,
) -> Image.Image | None:
    """A base64 reference, context, control, Redux or IP-Adapter picture as 8-bit RGB (16-bit scaled, not
    clipped to white, as the CLI reads it); None when absent. `flatten`: how the picture is made RGB where
    that is not dropping its alpha (the IP-Adapter's: transparency on white, as the CLI takes it)."""
    if text is None:
        return None
    picture = eight_bit(decode_base64_image(text, what, limits, fitted=True))
    return Image.fromarray(flatten(picture)) if flatten is not None else picture.convert("RGB")


def _within(width: int, height: int, max_pixels: int, multiple: int) -> str:
    """A size of about width:height that keeps under max_pixels, in multiples of `multiple`."""
    scale = (max_pixels / (width * height)) ** 0.5
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return f"{w}x{h}"


@dataclass
class Service:
    settings: ServeSettings
    store: Store
    manager: JobManager
    metrics: Metrics
    policy: PromptPolicy | None = None
    library: LoraLibrary = field(default_factory=LoraLibrary)
    started: float = field(default_factory=time.time)

    def model_names(self) -> set[str]:
        pipe = self.manager.pipeline
        names = {"pictor"}
        if pipe is not None:
            names |= {n for n in (pipe.name, pipe.ref, pipe.config.preset) if n}
        if self.settings.model:
            names.add(self.settings.model)
        return names

    def served(self) -> str:
        return ", ".join(sorted(self.model_names()))

    def check_model(self, model: str | None) -> None:
        if model and model not in self.model_names():
            served = self.served()
            raise APIError(
                400,
                f"model '{model}' is not served here; use one of: {served} (or omit it)",
                param="model",
                code="model_not_found",
            )

    def params(self, body: ImageGenerationRequest, redux: Image.Image | None = None) -> dict[str, Any]:
        """Validate a request against the limits, the policy and the model; return the job's settings.
        `redux`: a Redux picture already decoded (a variation's), in place of body.redux_image."""
        self.check_model(body.model)
        width = height = None
        if body.size and body.size != "auto":
            width, height = (int(v) for v in body.size.split("x"))
        n = body.n or 1
        negative = body.negative_prompt or ""
        limits = self.settings.limits
        check_limits(limits, body.prompt, n, width, height, body.steps)
        check_text(limits, prompt=body.prompt, negative_prompt=negative, user=body.user)
        check_names(body.sampler, body.schedule)
        layout = checked_layout([b.model_dump() for b in body.layout] if body.layout is not None else None)
        # An absent strength is left out, not sent as null: parse_regions then gives the default.
        sent = [r.model_dump(exclude_none=True) for r in body.regions] if body.regions is not None else None
        regions = checked_regions(sent, limits)
        check_regional_attention(body.regional_attention, regions)
        # RPF's controls of regional attention: by the pipeline's rules, each None where absent
        sent_rpf = {name: getattr(body, name) for name in REGIONAL_FIELDS}
        rpf = checked_regional_options(sent_rpf, body.regional_attention, regions)
        # checked by the dataclass (a 400 naming guidance_method.<field>); the model's refusals come below
        sent_method = body.guidance_method
        method = checked_guidance_method(
            sent_method.model_dump(exclude_unset=True) if sent_method is not None else None
        )
        check_policy(self.policy, body.prompt, negative, [box["phrase"] for box in layout or []], regions)
        # Each of these pictures says what to draw by itself, so the prompt may then be empty.
        pictured = (body.reference_image, body.redux_image, redux, body.ip_adapter_image)
        has_picture = any(picture is not None for picture in pictured)
        require_prompt(body.prompt, has_picture)
        # A request refused anyway (shutting down, the model failed to load) is refused before its pictures
        # are decoded and written. The pipeline is read once: it never goes away once loaded.
        self.manager.check_intake()
        pipe = self.manager.pipeline
        if pipe is None and body.hires_scale is not None:
            self._check_hires_while_loading(body, n, width, height)
        if pipe is None:
            self._check_hires_upscaler_while_loading(body.hires_upscaler)
        # Kept as sent, made 8-bit RGB (their fitting is the pipeline's, and recorded).
        reference = _picture(body.reference_image, "reference_image", limits)
        context = _picture(body.context_image, "context_image", limits)
        control = _picture(body.control_image, "control_image", limits)
        if redux is None:
            redux = _picture(body.redux_image, "redux_image", limits)
        ip_adapter = _picture(body.ip_adapter_image, "ip_adapter_image", limits, flatten=ip_adapter_pixels)
        nets = decode_pictures(body.controlnet_images, limits)
        resize_from = [int(v) for v in body.seed_resize_from.split("x")] if body.seed_resize_from else None
        if resize_from and resize_from[0] * resize_from[1] > limits.max_pixels:  # noise is drawn that large
            raise APIError(
                400,
                f"seed_resize_from {body.seed_resize_from} is {resize_from[0] * resize_from[1]} pixels; the "
                f"limit is {limits.max_pixels}, as for size",
                param="seed_resize_from",
                code="size_too_large",
            )
        # a strength of 0 is no variation: its seed would only keep the job from sharing a run
        varied = body.variation_strength != 0
        params: dict[str, Any] = {
            "prompt": body.prompt,
            "negative_prompt": negative,
            "width": width,
            "height": height,
            "steps": body.steps,
            "guidance": body.guidance,
            "sampler": body.sampler,
            "schedule": body.schedule,
            "seed": body.seed,
            "n": n,
            # Variation seeds: the variation seed as sent (absent: drawn when the job runs, as the seed is).
            "variation_seed": body.variation_seed if varied else None,
            "variation_strength": body.variation_strength if varied else None,
            "seed_resize_from": resize_from,  # [width, height] (the pattern checked), or None
            "layout": layout,
            "regions": regions,  # checked and normalised (each with its strength), as the records keep them
            "hires_scale": body.hires_scale,
            "hires_strength": body.hires_strength,
            "hires_steps": body.hires_steps,
            # "lanczos", the loaded upscale model's name, or None; resolved below: None for Lanczos
            "hires_upscaler": body.hires_upscaler,
            "cache_threshold": body.cache_threshold or None,
            "prompt_weights": body.prompt_weights,
            "prompt_editing": body.prompt_editing,
            "composable": body.composable,  # the prompt's AND parts as passes of their own
            "regional_attention": body.regional_attention,  # the regions as one masked pass (checked above)
            **rpf,  # regional_steps, regional_double_interval, regional_single_interval, regional_base_ratio
            "guidance_method": method,  # its record, or None for plain CFG (guidance_fields)
            # Denoise tiles (pixels); the overlap's default is filled in below once the model resolved it.
            "denoise_tile": body.denoise_tile,
            "denoise_tile_overlap": body.denoise_tile_overlap,
            "loras": self.library.choose([c.model_dump() for c in body.loras] if body.loras else None),
            # FLUX.1 Canny: [low, high] (`true` made the default thresholds by the schema), or None.
            "control_canny": body.control_canny,
            "redux_strength": body.redux_strength,
            "ip_adapter_scale": body.ip_adapter_scale,
            # FLUX.1 ControlNets: as sent (lists, words checked), spelled out once the model resolved them.
            "controlnet_scales": body.controlnet_scales,
            "controlnet_modes": body.controlnet_modes,
            "controlnet_start": body.controlnet_start,
            "controlnet_end": body.controlnet_end,
        }
        pictures = (reference, context, control, redux, nets, ip_adapter)
        if pipe is None:  # still loading: the worker checks the rest when the job runs
            return self._keep_reference(params, *pictures)
        request = generation_request(
            params,
            reference=reference,
            context_image=context,
            control_image=control,
            redux_image=redux,
            ip_adapter_image=ip_adapter,
            controlnet_images=nets,
        )
        try:
            r = pipe.resolve_request(request)
        except REQUEST_ERRORS as exc:
            message, param = request_error(exc)
            raise APIError(400, message, code="invalid_parameters", param=param) from None
        assert r.width is not None and r.height is not None
        if context is not None and width is None and r.width * r.height > limits.max_pixels:
            # The size came from the context picture (FLUX.1 Kontext's resolutions reach 1568x672), not
            # from the client, so say that rather than blame a size it never sent.
            raise APIError(
                400,
                f"context_image is fitted to {r.width}x{r.height} = {r.width * r.height} pixels, which the "
                f"output would take, over this server's limit of {limits.max_pixels}: give a size (e.g. "
                f"{_within(r.width, r.height, limits.max_pixels, pipe.patch)}), or raise the server's "
                "--max-pixels",
                param="context_image",
                code="size_too_large",
            )
        check_limits(self.settings.limits, body.prompt, n, r.width, r.height, r.steps)
        if r.hires_scale is not None:  # the second pass is the larger and may take more steps
            assert r.hires_steps is not None
            self._check_hires(
                body, n, *hires_size(r.width, r.height, r.hires_scale, pipe.patch), r.hires_steps
            )
        # Defaults filled in, so equal requests batch together whether or not they spelled them out.
        params.update(
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance=r.guidance,
            sampler=r.sampler,
            schedule=r.schedule,
            layout=r.layout,
            regions=r.regions,
            hires_strength=r.hires_strength,
            hires_steps=r.hires_steps,
            hires_upscaler=r.hires_upscaler if r.hires_scale is not None else None,
            redux_strength=r.redux_strength,
            ip_adapter_scale=r.ip_adapter_scale,
            denoise_tile=r.denoise_tile,
            denoise_tile_overlap=r.denoise_tile_overlap,
            variation_strength=r.variation_strength,
            **resolved_settings(r),
        )
        return self._keep_reference(params, *pictures)

    def _check_hires(self, body: ImageGenerationRequest, n: int, width: int, height: int, steps: int) -> None:
        """The server's limits on the hires fix's second pass, named as such."""
        try:
            check_limits(self.settings.limits, body.prompt, n, width, height, steps)
        except APIError as exc:
            param = "hires_steps" if exc.param == "steps" else "hires_scale"
            raise APIError(400, f"the hires pass: {exc.message}", code=exc.code, param=param) from None

    def _check_hires_while_loading(
        self, body: ImageGenerationRequest, n: int, width: int | None, height: int | None
    ) -> None:
        """Before the model is there, its pixel multiple and default size are not known: bound the second
        pass from above (every model rounds to a multiple of 16 or a divisor of it), or ask to come back."""
        assert body.hires_scale is not None
        if width is None or height is None:
            self.need_model(
                "a hires request without a size can only be checked against the limits once it has",
                "or give a size",
            )
        bound = [math.ceil(side * body.hires_scale / 16) * 16 for side in (width, height)]
        self._check_hires(body, n, bound[0], bound[1], body.hires_steps or body.steps or 1)

    def _check_hires_upscaler_while_loading(self, name: str | None) -> None:
        """Before the model is there, the upscale model it loads with is known by its file (--upscaler): a
        hires_upscaler that names another is refused now, as the loaded model would refuse it."""
        if name is None or name.lower() == "lanczos":
            return
        path = self.settings.upscaler
        if path is None or name != path.stem:
            loaded = f"'{path.stem}' is" if path is not None else "none is"
            raise APIError(
                400,
                f"hires_upscaler '{name}' is not loaded ({loaded}); {HIRES_UPSCALER_HELP}",
                param="hires_upscaler",
                code="invalid_parameters",
            )

    def need_model(self, why: str, instead: str = "") -> NoReturn:
        """Refuse a request that cannot be checked without the model, which is not there: 503
        model_unavailable while a failed load is not to be tried again yet, else 503 model_loading, having
        asked the worker for the model (after a failed load nothing else would: no job is queued).
        `why`: why the request needs the model; `instead`: what else the client may do."""
        refusal = self.manager.unavailable()
        if refusal is not None:
            raise refusal
        self.manager.request_load()
        retry = self.settings.retry_after
        raise APIError(
            503,
            f"the model is still loading, and {why}; retry after {retry} s{' ' + instead if instead else ''}",
            "server_error",
            "model_loading",
            headers={"Retry-After": str(retry)},
        )

    def _keep_reference(
        self,
        params: dict[str, Any],
        reference: Image.Image | None,
        context: Image.Image | None = None,
        control: Image.Image | None = None,
        redux: Image.Image | None = None,
        controlnets: list[Image.Image] | None = None,
        ip_adapter: Image.Image | None = None,
    ) -> dict[str, Any]:
        """The reference, context, control, Redux, ControlNet and IP-Adapter pictures, once the request is
        valid, kept as uploads the job names."""
        pictures = {"reference": reference, "context_image": context, "control_image": control}
        pictures |= {"redux_image": redux, "ip_adapter_image": ip_adapter}
        return {**params, **self.keep_uploads({**pictures, "controlnet_images": controlnets})}

    def keep_uploads(
        self, pictures: dict[str, Image.Image | list[Image.Image] | None]
    ) -> dict[str, str | list[str] | None]:
        """Write a request's pictures as uploads: {job setting: upload id (a list of them for a list of
        pictures), or None without a picture}. All or none: when one cannot be written (a full disk) those
        written before it are deleted."""
        ids: dict[str, str | list[str] | None] = {}
        try:
            for key, picture in pictures.items():
                if isinstance(picture, list):
                    written: list[str] = []
                    ids[key] = written
                    for one in picture:  # each id noted as soon as it is written, so a failure deletes it
                        written.append(self.store.write_upload(one))
                else:
                    ids[key] = self.store.write_upload(picture) if picture is not None else None
        except BaseException:
            delete_uploads(self.store, upload_ids(ids))
            raise
        return ids

    def submit(self, params: dict[str, Any], user: str | None) -> JobRow:
        """Queue a job; one not queued (queue full, draining, the store failing) leaves no upload behind."""
        try:
            return self.manager.submit(params, user)
        except BaseException:
            delete_uploads(self.store, upload_ids(params))
            raise

    def forget(self, job_id: str) -> JobRow:
        """Delete a finished job from the history: its row, its images (rows and files) and its uploads."""
        if self.manager.busy(job_id):
            raise APIError(
                409,
                f"job '{job_id}' has not finished, or its cancelled run has not stopped yet; cancel it "
                f"(DELETE /v1/jobs/{job_id}) and delete it once its status is final",
                code="job_unfinished",
                headers={"Retry-After": str(self.settings.retry_after)},
            )
        # A finished job is never queued again, so nothing can start using its files from here on.
        gone = self.store.delete_job(job_id)
        if gone is None:
            if self.store.get_job(job_id) is None:
                raise not_found("job", job_id)
            raise APIError(409, f"job '{job_id}' has not finished; cancel it first", code="job_unfinished")
        job, images = gone
        for image_id in images:
            self.store.image_path(image_id).unlink(missing_ok=True)
        delete_uploads(self.store, upload_ids(job.params))
        return job

    def image_url(self, request: Request, image_id: str) -> str:
        url = str(request.url_for("get_image", image_id=image_id))
        return url + signed_query(self.settings.api_key, image_id, self.settings.url_ttl)

    def view(self, request: Request, job: JobRow) -> Job:
        step, total = (0, 0)
        if job.status == RUNNING:
            step, total = self.manager.progress(job.id) or (0, 0)
        elif job.status == SUCCEEDED and job.params.get("kind") == "upscale":
            total = step = int(job.params.get("tiles") or 1)  # an upscale's steps are its model's tiles
        elif job.status == SUCCEEDED:
            steps = int(job.params.get("steps") or 0)
            hires = int(job.params.get("hires_steps") or steps) if job.params.get("hires_scale") else 0
            total = step = steps + hires  # a hires job's second pass counts too, as while it runs
        return Job(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            created=job.created,
            started_at=job.started,
            finished_at=job.finished,
            request=job.params,
            user=job.user,
            progress=JobProgress(step=step, total=total, fraction=step / total if total else 0.0),
            queue_position=self.manager.queue_position(job.id) if job.status == QUEUED else None,
            attempts=job.attempts,
            results=[
                JobResult(image_id=r["image_id"], seed=r["seed"], url=self.image_url(request, r["image_id"]))
                for r in job.results
            ],
            error=job.error,  # type: ignore[arg-type]
            warnings=job.warnings,
        )


def service(request: Request) -> Service:
    return request.app.state.service


def job_or_404(svc: Service, job_id: str) -> JobRow:
    job = svc.store.get_job(job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def failure(job: JobRow, settings: ServeSettings) -> APIError:
    """The error answer of a synchronous request whose job did not succeed."""
    if job.status == CANCELLED:
        return APIError(409, f"job '{job.id}' was cancelled", code="job_cancelled")
    error = job.error or {}
    kind, code = error.get("type", "server_error"), error.get("code")
    status = {"invalid_request_error": 400, "timeout_error": 504}.get(kind, 500)
    headers = {}
    if code == "model_unavailable":  # the model did not load: unavailable, not a fault of this request
        status, headers = 503, {"Retry-After": str(math.ceil(settings.load_retry))}
    message = error.get("message", "generation failed")
    return APIError(status, message, kind, code, param=error.get("param"), headers=headers)
