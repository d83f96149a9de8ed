"""A request's FLUX.1 ControlNet settings: checked, resolved, recorded, and read back for a reproduction.

A request gives one control picture per loaded ControlNet (`pictor.controlnet_runs`, which holds the
convention), a scale (one, or one per ControlNet; up to ``MAX_SCALE``), a Union ControlNet's mode (canny,
tile, depth, blur, pose, gray, lq) and the ``start`` / ``end`` window of steps. Here those fields are
checked against the loaded ControlNets, spelled out one per ControlNet with the pictures fitted to the
image, written into a record, and, for a reproduction, read back from one and compared with what is given.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from pictor.control_images import ControlImageError, fit_control
from pictor.controlnet_runs import ControlNetError, ControlNetUnit, kept_steps
from pictor.editing import image_info
from pictor.generation_request import GenerationRequest

__all__ = [
    "MAX_SCALE",
    "NO_MODE",
    "UNION_MODES",
    "check_controlnet_pixels",
    "check_recorded_controlnets",
    "controlnet_fields",
    "controlnet_problem",
    "recorded_controlnet_paths",
    "recorded_controlnet_settings",
    "resolve_controlnets",
]

# InstantX's FLUX.1-dev-Controlnet-Union and Shakker-Labs' Union-Pro number their control types so.
UNION_MODES: dict[str, int] = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
_MODE_NAMES = {number: name for name, number in UNION_MODES.items()}
# A scale past this drowns the image in the ControlNet many times over: a typo rather than a wish.
MAX_SCALE = 10.0
FIELDS = ("controlnet_images", "controlnet_scales", "controlnet_modes", "controlnet_start", "controlnet_end")


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list | tuple) else [value]


# What a per-ControlNet list of modes holds for a ControlNet that is not a Union one.
NO_MODE = ("", "-", "none")


class _ModeProblem(Exception):
    """A Union mode that cannot be used; the message says why."""


def _mode_id(mode: Any, modes: int | None, which: str) -> int | None:
    """A Union mode as its number (None for a ControlNet without modes); _ModeProblem says what is wrong."""
    if isinstance(mode, str) and mode.strip().lower() in NO_MODE:
        mode = None
    if modes is None:
        if mode is None:
            return None
        raise _ModeProblem(
            f"{which} is not a Union ControlNet, so it takes no mode; leave --controlnet-mode out for it "
            "(or give 'none' in its place)"
        )
    if mode is None:
        names = ", ".join(k for k, v in UNION_MODES.items() if v < modes)
        raise _ModeProblem(
            f"{which} is a Union ControlNet: say what its picture is with --controlnet-mode ({names})"
        )
    if isinstance(mode, str) and mode.strip().lower() in UNION_MODES:
        number = UNION_MODES[mode.strip().lower()]
    elif isinstance(mode, str) and mode.strip().isdigit():
        number = int(mode.strip())
    elif isinstance(mode, int) and not isinstance(mode, bool):
        number = mode
    else:
        raise _ModeProblem(f"{which}: mode {mode!r} is not one of {', '.join(UNION_MODES)} or a number")
    if not 0 <= number < modes:
        raise _ModeProblem(
            f"{which}: mode {mode!r} is number {number}, but the ControlNet knows modes 0 to {modes - 1}"
        )
    return number


def _mode_ids(modes: list[Any] | None, units: list[ControlNetUnit]) -> list[int | None]:
    """Each ControlNet's mode number. One mode for several ControlNets is the Union ones' (the others take
    none); a list gives one per ControlNet, 'none' for a ControlNet without modes."""
    if modes is not None and len(modes) == 1 and len(units) > 1:
        modes = [modes[0] if u.model.params.num_modes else None for u in units]
    picked = modes if modes is not None else [None] * len(units)
    return [
        _mode_id(mode, unit.model.params.num_modes, f"ControlNet '{unit.info['name']}'")
        for mode, unit in zip(picked, units, strict=True)
    ]


def controlnet_problem(r: GenerationRequest, units: list[ControlNetUnit]) -> str | None:
    """Why a request's ControlNet settings cannot run on these loaded ControlNets, or None."""
    images = _as_list(r.controlnet_images)
    given = [name for name in FIELDS if getattr(r, name) is not None]
    if not units:
        if given:
            return f"{given[0]} was given but no ControlNet is loaded; load one with --controlnet MODEL"
        return None
    n = len(units)
    if not images:
        each = "one control picture each" if n > 1 else "its control picture"
        return (
            f"{n} ControlNet{'s are' if n > 1 else ' is'} loaded: give {each} with --controlnet-image IMAGE "
            "(in the order of --controlnet)"
        )
    if len(images) != n:
        return (
            f"{len(images)} control pictures for {n} ControlNets; give exactly one per ControlNet, in order"
        )
    scales = _as_list(r.controlnet_scales) or [1.0]
    if len(scales) not in (1, n):
        return f"{len(scales)} ControlNet scales for {n} ControlNets; give one, or one per ControlNet"
    for s in scales:
        if not _number(s) or not math.isfinite(float(s)) or not 0 <= float(s) <= MAX_SCALE:
            return f"a ControlNet scale must be a number from 0 to {MAX_SCALE:g}, got {s!r}"
    modes = _as_list(r.controlnet_modes)
    if modes is not None and len(modes) not in (1, n):
        return f"{len(modes)} ControlNet modes for {n} ControlNets; give one, or one per ControlNet"
    try:
        _mode_ids(modes, units)
    except _ModeProblem as exc:
        return str(exc)
    start = 0.0 if r.controlnet_start is None else r.controlnet_start
    end = 1.0 if r.controlnet_end is None else r.controlnet_end
    if not (_number(start) and _number(end) and 0.0 <= float(start) < float(end) <= 1.0):
        return (
            "the ControlNet's start and end are fractions of the steps with 0 <= start < end <= 1, got "
            f"start {start!r} and end {end!r}"
        )
    # An edit's schedule starts lower but has as many steps, so the request's count is the run's.
    if r.steps and not any(kept_steps(r.steps, float(start), float(end))):  # else records name silent nets
        return (
            f"the ControlNet window {float(start):g} to {float(end):g} holds none of this run's {r.steps} "
            "steps (step i of N runs them unless i/N < start or (i+1)/N > end); widen it or take more steps"
        )
    for field, what in (
        ("reference", "a reference picture"),
        ("context_image", "a context image (FLUX.1 Kontext)"),
        ("control_image", "a control picture for a FLUX.1 Canny / Depth model"),
    ):
        if getattr(r, field, None) is not None:
            return f"ControlNets are not combined with {what} here; leave one of them out"
    if getattr(r, "hires_scale", None):
        return (
            "the hires fix is not offered with ControlNets (their pictures are fitted to the first pass); "
            "leave --hires out"
        )
    return None


def resolve_controlnets(r: GenerationRequest, units: list[ControlNetUnit]) -> GenerationRequest:
    """The request (size resolved) with its ControlNet pictures fitted to the image and its scales, modes
    and window spelled out, one per ControlNet; errors say what to change."""
    problem = controlnet_problem(r, units)
    if problem:
        raise ControlNetError(problem)
    if not units:
        return r
    assert r.width and r.height
    n = len(units)
    images = _as_list(r.controlnet_images) or []
    try:
        fitted = [fit_control(source, r.width, r.height) for source in images]
    except ControlImageError as exc:
        raise ControlNetError(str(exc).replace("control picture", "ControlNet picture")) from exc
    scales = _as_list(r.controlnet_scales) or [1.0]
    mode_ids = _mode_ids(_as_list(r.controlnet_modes), units)
    return replace(
        r,
        controlnet_images=fitted,
        controlnet_scales=[float(scales[0 if len(scales) == 1 else i]) for i in range(n)],
        controlnet_modes=mode_ids,
        controlnet_start=float(r.controlnet_start or 0.0),
        controlnet_end=1.0 if r.controlnet_end is None else float(r.controlnet_end),
    )


def controlnet_fields(r: GenerationRequest, units: list[ControlNetUnit]) -> dict[str, Any]:
    """What ControlNets add to a record: per ControlNet its file's entry, picture hash, scale and mode; the
    window when it is not the whole run."""
    images = r.controlnet_images or []
    entries = [
        {
            **unit.info,
            "image": image_info(np.asarray(pixels)),
            "scale": float(scale),
            **({"mode": mode, "mode_name": _MODE_NAMES.get(mode, str(mode))} if mode is not None else {}),
        }
        for unit, pixels, scale, mode in zip(
            units, images, r.controlnet_scales or [], r.controlnet_modes or [], strict=True
        )
    ]
    window = (float(r.controlnet_start or 0.0), 1.0 if r.controlnet_end is None else float(r.controlnet_end))
    return {
        "controlnets": entries,
        **({"controlnet_start": window[0], "controlnet_end": window[1]} if window != (0.0, 1.0) else {}),
    }


# -- reproduction ----------------------------------------------------------------------------------------


def recorded_controlnet_settings(record: dict[str, Any], images: list[Any] | None) -> dict[str, Any]:
    """The request fields a record's ControlNets give a reproduction, with the pictures passed again."""
    entries = record.get("controlnets") or []
    if not entries:
        return {"controlnet_images": images} if images else {}
    return {
        "controlnet_images": images,
        "controlnet_scales": [float(e["scale"]) for e in entries],
        "controlnet_modes": [e.get("mode") for e in entries],
        "controlnet_start": record.get("controlnet_start"),
        "controlnet_end": record.get("controlnet_end"),
    }


def recorded_controlnet_paths(record: dict[str, Any]) -> list[str] | None:
    """The ControlNet files a record names, where all of them still are; else None."""
    paths = [str(e.get("path")) for e in record.get("controlnets") or [] if isinstance(e, dict)]
    if not paths or not all(Path(p).exists() for p in paths):
        return None
    return paths


def check_recorded_controlnets(
    units: list[ControlNetUnit], record: dict[str, Any], images: list[Any] | None
) -> None:
    """The ControlNets loaded and the pictures given are the ones the record names, in order."""
    entries = record.get("controlnets") or []
    if not entries:
        if units:
            raise ControlNetError("this image was made without ControlNets; drop --controlnet")
        if images:
            raise ControlNetError("this image was made without ControlNets; drop --controlnet-image")
        return
    names = ", ".join(str(e.get("name")) for e in entries)
    if [u.info["sha256"] for u in units] != [e.get("sha256") for e in entries]:
        raise ControlNetError(
            f"this image was made with the ControlNets [{names}], but the loaded ones are "
            f"[{', '.join(str(u.info['name']) for u in units)}]; pass the same files, in order, with "
            "--controlnet"
        )
    if not images or len(images) != len(entries):
        raise ControlNetError(
            f"this image was made with {len(entries)} ControlNet picture(s) ([{names}]); pass them with "
            "--controlnet-image IMAGE, in order"
        )


def check_controlnet_pixels(record: dict[str, Any], r: GenerationRequest) -> None:
    """Each ControlNet picture, as fitted for this run, is the one the record names."""
    for i, (entry, pixels) in enumerate(
        zip(record.get("controlnets") or [], r.controlnet_images or [], strict=False)
    ):
        want = (entry.get("image") or {}).get("sha256")
        got = image_info(np.asarray(pixels))["sha256"]
        if want != got:
            raise ControlNetError(
                f"ControlNet picture {i + 1} is not the one this image was made from (its fitted pixels hash "
                f"to {got[:10]}, the record says {str(want)[:10]}); pass the original picture"
            )
