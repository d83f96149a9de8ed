"""A job's stored settings (its `params`) as the pipeline's requests, and which jobs may share one sampler
run. Uploads (an edit's image and mask, a reference picture, a Kontext context image, a Canny / Depth control
picture, a Redux picture) are kept in the store under ids; the requests get their paths."""

from __future__ import annotations

from typing import Any

from pictor.editing import EditRequest
from pictor.hires import HIRES_FIELDS
from pictor.pipeline import GenerationRequest
from pictor.serve.store import Store

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
    "reference",  # an upload id: new for every request, so jobs with a reference never merge
    "context_image",  # likewise
    "control_image",  # likewise
    "control_canny",
    "redux_image",  # an upload id too
    "redux_strength",
    *HIRES_FIELDS,
    "cache_threshold",
)


# Edits also need the same source image: upload ids are new for every request, so edits never merge.
# The chosen LoRAs (not a request field: the worker applies them to the model before the run) likewise.
MERGE_KEYS = (*BATCH_KEYS, "kind", "image", "mask", "strength", "loras")


def batch_key(params: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(params.get(k) for k in MERGE_KEYS)


def _reference(params: dict[str, Any], store: Store | None, key: str = "reference") -> Any:
    """A job's reference (or context, control or Redux) picture: the kept upload's path (None without one, or
    without a store to ask)."""
    upload = params.get(key)
    return store.upload_path(upload) if upload and store is not None else None


def generation_request(
    params: dict[str, Any], store: Store | None = None, **overrides: Any
) -> GenerationRequest:
    """A job's settings as the pipeline's request (``seed``, ``num_images``... may be overridden); its
    reference picture comes from the store's uploads."""
    fields: dict[str, Any] = {k: params.get(k) for k in BATCH_KEYS}
    fields["negative_prompt"] = fields["negative_prompt"] or ""
    fields.update(
        seed=params.get("seed"),
        num_images=int(params.get("n", 1)),
        reference=_reference(params, store),
        context_image=_reference(params, store, "context_image"),
        control_image=_reference(params, store, "control_image"),
        redux_image=_reference(params, store, "redux_image"),
    )
    return GenerationRequest(**{**fields, **overrides})


def edit_request(params: dict[str, Any], store: Store, **overrides: Any) -> EditRequest:
    """An edit job's settings as the pipeline's EditRequest; the images come from the store's uploads."""
    fields = {k: params.get(k) for k in BATCH_KEYS if k not in ("width", "height", *HIRES_FIELDS)}
    fields["negative_prompt"] = fields["negative_prompt"] or ""
    fields["reference"] = _reference(params, store)
    fields["context_image"] = _reference(params, store, "context_image")
    fields["control_image"] = _reference(params, store, "control_image")
    fields["redux_image"] = _reference(params, store, "redux_image")
    fields.update(
        seed=params.get("seed"), num_images=int(params.get("n", 1)), strength=params.get("strength")
    )
    mask = store.upload_path(params["mask"]) if params.get("mask") else None
    return EditRequest(image=store.upload_path(params["image"]), mask=mask, **{**fields, **overrides})
