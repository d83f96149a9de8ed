"""The models and pictures given for a reproduction are the ones its record names: the LoRAs, adapters,
upscale model and the files of Redux, IP-Adapter, reference, context and control pictures, checked by hash
before the sampler runs, each error naming the option that gives the right one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pictor.editing import ImageSource, pixel_sha256
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.record_checks import ENLARGED, recorded_upscaler


def check_upscaler(pipe: Pipeline, record: dict[str, Any]) -> None:
    """The upscale model an image was made with (hires fix, upscaling edit) must be the one loaded: its
    hash, not only its name."""
    name, entry = recorded_upscaler(record)
    if entry is None:
        return
    if pipe.upscaler is None or pipe.upscaler.sha256 != entry["sha256"]:
        got = f"{pipe.upscaler.path} (SHA-256 {pipe.upscaler.sha256[:10]})" if pipe.upscaler else "none"
        what, flag = next(ENLARGED[key] for key in ENLARGED if key in record)
        raise GenerationError(
            f"the image's {what} with upscale model '{name}' (SHA-256 {entry['sha256'][:10]}), but the "
            f"loaded one is {got}; pass that file with {flag}"
        )


def check_reference(pipe: Pipeline, record: dict[str, Any], reference: ImageSource | None) -> None:
    """The reference adapter and picture the image was made with, before anything runs."""
    if not record.get("reference_image"):
        if reference is not None:
            raise GenerationError("this image was made without a reference image; drop --reference")
        return
    if reference is None:
        raise GenerationError("this image was made from a reference image; pass it with --reference IMAGE")
    want = (record.get("reference_adapter") or {}).get("sha256")
    have = (pipe.reference_info or {}).get("sha256")
    if have is None:
        raise GenerationError(
            "the image was made with a reference; load its reference adapter with --reference-adapter FILE"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with reference adapter {want[:10]}, but the loaded one is {have[:10]}; "
            "pass the same file with --reference-adapter"
        )


def check_picture_pixels(record: dict[str, Any], r: GenerationRequest) -> None:
    """The reference and context pictures, as fitted for this run, are the ones the record names."""
    for key, pixels, what in (
        ("reference_image", r.reference, "reference image"),
        ("context_image", r.context_image, "context image"),
        ("control_image", r.control_image, "control picture"),
        ("redux_image", r.redux_image, "Redux picture"),
        ("ip_adapter_image", r.ip_adapter_image, "IP-Adapter picture"),
    ):
        if not record.get(key):
            continue
        want = record[key]["sha256"]
        got = pixel_sha256(pixels) if isinstance(pixels, np.ndarray) else ""
        if want != got:
            raise GenerationError(
                f"the {what} is not the one this image was made from (its fitted pixels hash to "
                f"{got[:10]}, the record says {want[:10]}); pass the original {what}"
            )


def check_context(record: dict[str, Any], context: ImageSource | None) -> None:
    """A FLUX.1 Kontext image's context picture is given exactly when the record has one."""
    if record.get("context_image") and context is None:
        raise GenerationError(
            "this image was made from a context image (FLUX.1 Kontext); pass it with --context IMAGE"
        )
    if context is not None and not record.get("context_image"):
        raise GenerationError("this image was made without a context image; drop --context")


def check_control(record: dict[str, Any], control: ImageSource | None) -> None:
    """A FLUX.1 Canny / Depth image's control picture is given exactly when the record has one."""
    if record.get("control_image") and control is None:
        raise GenerationError(
            "this image was made from a control picture (FLUX.1 Canny / Depth); pass it with --control IMAGE"
        )
    if control is not None and not record.get("control_image"):
        raise GenerationError("this image was made without a control picture; drop --control")


def check_redux(pipe: Pipeline, record: dict[str, Any], redux: ImageSource | None) -> None:
    """A FLUX.1 Redux image's picture is given exactly when the record has one, and the Redux file loaded
    is the one it was made with."""
    if not record.get("redux_image"):
        if redux is not None:
            raise GenerationError("this image was made without a Redux picture; drop --redux")
        return
    if redux is None:
        raise GenerationError("this image was made from a Redux picture; pass it with --redux IMAGE")
    want = (record.get("redux") or {}).get("sha256")
    have = pipe.redux.info["sha256"] if pipe.redux is not None else None
    if have is None:
        raise GenerationError(
            "the image was made with FLUX.1 Redux; load it with --redux-model FILE --siglip FOLDER"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with Redux file {want[:10]}, but the loaded one is {have[:10]}; pass the "
            "same file with --redux-model"
        )
    want = (record.get("redux") or {}).get("siglip_sha256")
    assert pipe.redux is not None
    have = pipe.redux.info.get("siglip_sha256")
    if want and want != have:
        raise GenerationError(
            f"the image was made with SigLIP weights {want[:10]}, but the loaded ones (--siglip "
            f"{pipe.redux.info['siglip']}) are {str(have)[:10]}; pass the SigLIP folder it was made with"
        )


def check_ip_adapter(pipe: Pipeline, record: dict[str, Any], picture: ImageSource | None) -> None:
    """An IP-Adapter image's picture is given exactly when the record has one, and the IP-Adapter file and
    CLIP weights loaded are the ones it was made with."""
    if not record.get("ip_adapter_image"):
        if picture is not None:
            raise GenerationError("this image was made without an IP-Adapter picture; drop --ip-adapter")
        return
    if picture is None:
        raise GenerationError(
            "this image was made from an IP-Adapter picture; pass it with --ip-adapter IMAGE"
        )
    if pipe.ip_adapter is None:
        raise GenerationError(
            "the image was made with an IP-Adapter; load it with --ip-adapter-model FILE --clip-vision FOLDER"
        )
    entry, info = record.get("ip_adapter") or {}, pipe.ip_adapter.info
    for key, what, flag in (
        ("sha256", "IP-Adapter file", "--ip-adapter-model FILE"),
        ("clip_sha256", "CLIP vision weights", "--clip-vision FOLDER"),
        ("clip_processor_sha256", "CLIP image processor settings", "--clip-vision FOLDER"),
    ):
        want, have = entry.get(key), info.get(key)
        if want and want != have:
            raise GenerationError(
                f"the image was made with {what} {str(want)[:10]}, but the loaded ones are "
                f"{str(have)[:10]}; pass the ones it was made with ({flag})"
            )


def check_layout_adapter(pipe: Pipeline, record: dict[str, Any]) -> None:
    if not record.get("layout"):
        return
    want = (record.get("layout_adapter") or {}).get("sha256")
    have = (pipe.layout_info or {}).get("sha256")
    if have is None:
        raise GenerationError(
            "the image was made with a layout; load its layout adapter with --layout-adapter FILE"
        )
    if want and want != have:
        raise GenerationError(
            f"the image was made with layout adapter {want[:10]}, but the loaded one is {have[:10]}; "
            "pass the same file with --layout-adapter"
        )


def check_loras(pipe: Pipeline, record: dict[str, Any]) -> None:
    want = [(lo["sha256"], float(lo["scale"])) for lo in record.get("loras") or []]
    have = [(lo["sha256"], lo["scale"]) for lo in pipe.loras]
    if want != have:

        def names(loras: list[dict[str, Any]]) -> str:
            return ", ".join(f"{lo['name']}:{lo['scale']:g}" for lo in loras) or "none"

        raise GenerationError(
            f"the image was made with LoRAs [{names(record.get('loras') or [])}] but the loaded model "
            f"has [{names(pipe.loras)}]; pass the same files and scales with --lora FILE:SCALE"
        )
