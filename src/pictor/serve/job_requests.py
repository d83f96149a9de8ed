"""A job's stored settings (its `params`) as the pipeline's requests, and which jobs share one sampler run.
Uploads (an edit's image and mask, a reference picture, a Kontext context image, a Canny / Depth control
picture, a Redux picture, an IP-Adapter picture, the ControlNets' pictures) are kept in the store under ids;
the requests get their paths."""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

from pictor.editing import EditRequest
from pictor.generation_request import DENOISE_TILING_FIELDS
from pictor.hires import HIRES_FIELDS
from pictor.pipeline import GenerationRequest
from pictor.regional_attention import REGIONAL_OPTION_FIELDS
from pictor.serve.guidance_fields import guidance_method_of
from pictor.serve.store import JobRow, Store

# Settings that must be equal for two jobs to share one sampler run.
BATCH_KEYS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "sampler",
    "schedule",
    "layout",
    # regional prompts (`pictor.regional_prompts`), normalised when the job was taken: equal lists merge,
    # and a job without them (or queued before they existed) reads None
    "regions",
    "reference",  # an upload id: new for every request, so jobs with a reference never merge
    "context_image",  # likewise
    "control_image",  # likewise
    "control_canny",
    "redux_image",  # an upload id too
    "redux_strength",
    "ip_adapter_image",  # an upload id too
    "ip_adapter_scale",
    "controlnet_images",  # a list of upload ids, new for every request too
    "controlnet_scales",
    "controlnet_modes",
    "controlnet_start",
    "controlnet_end",
    *HIRES_FIELDS,
    "cache_threshold",
    "prompt_weights",
    "prompt_editing",  # scheduled texts (`pictor.prompt_editing`)
    # AND parts as passes of their own (`pictor.composable_prompts`): with it the same prompt is other passes
    "composable",
    # the regions as one pass with masked attention (`pictor.regional_attention`): other passes, other images
    "regional_attention",
    # its Regional-Prompting-FLUX controls (`serve.regional_fields`): other masks, other images; None where
    # absent (and for jobs queued before they existed), the pipeline's defaults
    *REGIONAL_OPTION_FIELDS,
    # how guidance combines the predictions (`pictor.guidance_methods`): the method's record, None for plain
    # CFG (and for jobs queued before it existed); another method is another run
    "guidance_method",
    # the transformer in windows (pixels): the whole run takes them, so jobs that differ never merge
    *DENOISE_TILING_FIELDS,
    # variation seeds (`pictor.noise_variation`): a job with a strength runs alone (see take_batch)
    "variation_seed",
    "variation_strength",
    "seed_resize_from",  # [width, height], or None
)


# Edits also need the same source image: upload ids are new for every request, so edits never merge.
# The chosen LoRAs (not a request field: the worker applies them to the model before the run) likewise.
# An edit's own settings beside the generation's (pictor.editing.EditRequest's names): upscaling, inpainting
# only the masked area, outpainting and the mask's feather.
EDIT_KEYS = (
    "upscale",
    "upscaler",
    "inpaint_area",
    "mask_padding",
    "inpaint_size",
    "expand",
    "fill",
    "feather",
)
# Those EditRequest takes as tuples, which the job's params (JSON) keep as lists.
TUPLE_KEYS = ("inpaint_size", "expand")
MERGE_KEYS = (*BATCH_KEYS, *EDIT_KEYS, "kind", "image", "mask", "strength", "loras")


def batch_key(params: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(params.get(k) for k in MERGE_KEYS)


def _reference(params: dict[str, Any], store: Store | None, key: str = "reference") -> Any:
    """A job's reference (or context, control, Redux or IP-Adapter) picture: the kept upload's path (None
    without one, or without a store to ask)."""
    upload = params.get(key)
    return store.upload_path(upload) if upload and store is not None else None


def _controlnet_pictures(params: dict[str, Any], store: Store | None) -> list[Any] | None:
    """A job's ControlNet pictures: the kept uploads' paths, in order (None without any, or without a store
    to ask)."""
    uploads = params.get("controlnet_images")
    return [store.upload_path(u) for u in uploads] if uploads and store is not None else None


def generation_request(
    params: dict[str, Any], store: Store | None = None, **overrides: Any
) -> GenerationRequest:
    """A job's settings as the pipeline's request (``seed``, ``num_images``... may be overridden); its
    reference picture comes from the store's uploads."""
    fields: dict[str, Any] = {k: params.get(k) for k in BATCH_KEYS}
    fields["negative_prompt"] = fields["negative_prompt"] or ""
    # absent from jobs queued before they existed
    fields["prompt_weights"] = bool(fields["prompt_weights"])
    fields["prompt_editing"] = bool(fields["prompt_editing"])
    fields["composable"] = bool(fields["composable"])
    fields["regional_attention"] = bool(fields["regional_attention"])
    fields["guidance_method"] = guidance_method_of(params)  # the record as the request's GuidanceMethod
    fields.update(
        seed=params.get("seed"),
        num_images=int(params.get("n", 1)),
        reference=_reference(params, store),
        context_image=_reference(params, store, "context_image"),
        control_image=_reference(params, store, "control_image"),
        redux_image=_reference(params, store, "redux_image"),
        ip_adapter_image=_reference(params, store, "ip_adapter_image"),
        controlnet_images=_controlnet_pictures(params, store),
    )
    return GenerationRequest(**{**fields, **overrides})


def edit_request(params: dict[str, Any], store: Store, **overrides: Any) -> EditRequest:
    """An edit job's settings as the pipeline's EditRequest; the images come from the store's uploads."""
    fields = {k: params.get(k) for k in BATCH_KEYS if k not in ("width", "height", *HIRES_FIELDS)}
    fields["negative_prompt"] = fields["negative_prompt"] or ""
    fields["prompt_weights"] = bool(fields["prompt_weights"])
    fields["prompt_editing"] = bool(fields["prompt_editing"])
    fields["composable"] = bool(fields["composable"])
    fields["regional_attention"] = bool(fields["regional_attention"])
    fields["guidance_method"] = guidance_method_of(params)
    # absent from jobs queued before they existed: EditRequest's defaults
    fields |= {k: params[k] for k in EDIT_KEYS if params.get(k) is not None}
    fields |= {k: tuple(fields[k]) for k in TUPLE_KEYS if fields.get(k) is not None}
    fields["reference"] = _reference(params, store)
    fields["context_image"] = _reference(params, store, "context_image")
    fields["control_image"] = _reference(params, store, "control_image")
    fields["redux_image"] = _reference(params, store, "redux_image")
    fields["ip_adapter_image"] = _reference(params, store, "ip_adapter_image")
    fields["controlnet_images"] = _controlnet_pictures(params, store)
    fields.update(
        seed=params.get("seed"), num_images=int(params.get("n", 1)), strength=params.get("strength")
    )
    mask = store.upload_path(params["mask"]) if params.get("mask") else None
    return EditRequest(image=store.upload_path(params["image"]), mask=mask, **{**fields, **overrides})


@dataclass
class Live:
    """A job in the running batch: its in-memory progress and cancel flag."""

    job: JobRow
    seed: int
    step: int = 0
    total: int = 0
    cancelled: bool = False
    # The newest live preview (JPEG bytes) and the step it shows; None before the first (`serve.previews`).
    preview: bytes | None = None
    preview_step: int = 0


def take_batch(queue: deque[JobRow], max_batch: int) -> list[Live]:
    """The next sampler run: the queue's first job and the queued jobs that may share its run (equal
    settings, up to `max_batch` images), taken off the queue. Image i of a run gets the seed ``seed + i``,
    so a merged job must take the next seeds: one without a seed gets them (behind a head without a seed,
    whose start seed is random), one with a seed joins only when its seed is the next one. A job with a
    variation strength runs alone: its images all keep its seed and count its variation seed instead, which
    a merged job's images would take from the run's first (its variation strength is in the batch key, so
    no job without one joins it either)."""
    head = queue.popleft()
    fixed = head.params.get("seed") is not None
    start = int(head.params["seed"]) if fixed else secrets.randbelow(2**32)
    batch = [Live(head, start)]
    if head.params.get("variation_strength"):
        return batch
    cursor, total = start + head.n, head.n
    key = batch_key(head.params)
    for job in list(queue):
        if total >= max_batch:
            break
        seed = job.params.get("seed")
        fits = batch_key(job.params) == key and total + job.n <= max_batch
        if fits and (seed == cursor if fixed else seed is None):
            queue.remove(job)
            batch.append(Live(job, cursor))
            cursor, total = cursor + job.n, total + job.n
    return batch
