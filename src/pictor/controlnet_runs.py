"""FLUX.1 ControlNets at run time: which pictures they read, when they speak and what records keep.

A ControlNet (InstantX's, Shakker-Labs' Union, XLabs'; `pictor.models.controlnet`) is loaded beside an
unchanged FLUX.1 [dev] / [schnell]-type transformer (`Pipeline.add_controlnet`). Each request then gives one
control picture per loaded ControlNet, fitted to the image's size with Lanczos as diffusers' image processor
and ComfyUI do. The convention is diffusers' ``FluxControlNetPipeline``:

- a latent ControlNet (InstantX, Union) reads the picture's packed latents (pictor takes the encoder's
  mean, as ComfyUI does, where diffusers draws a sample: their difference is the encoder's tiny posterior
  noise); XLabs' reads the picture's pixels in [-1, 1] through its own convolutions;
- at every model call the ControlNet runs on the noisy latents with the prompt, and its residuals times the
  picture's scale are added after the transformer's blocks; several ControlNets add up;
- under classifier-free guidance the negative half reuses the positive half's residuals;
- a Union ControlNet is told what its picture is by a mode (canny, tile, depth, blur, pose, gray, lq);
- ``start`` / ``end`` (fractions of the steps) leave the ControlNets out of the steps outside them: step i
  of N is kept unless ``i / N < start`` or ``(i + 1) / N > end``. A sampler that calls the model between
  steps (Heun, ...) counts a call at time t as part of the last step that starts at or before it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.checkpoint import CheckpointError, sha256_file
from pictor.control_images import ControlImageError, control_tokens, fit_control
from pictor.editing import image_info
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import FluxParams
from pictor.models.offload import bring_in

if TYPE_CHECKING:
    from pictor.models.controlnet import FluxControlNet

__all__ = [
    "MAX_SCALE",
    "UNION_MODES",
    "ControlNetError",
    "ControlNetRun",
    "ControlNetUnit",
    "check_controlnet_pixels",
    "check_recorded_controlnets",
    "controlnet_fields",
    "controlnet_problem",
    "controlnet_summary",
    "open_controlnet",
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


class ControlNetError(GenerationError):
    """A ControlNet file, picture or setting that cannot be used; the message says what to change."""


@dataclass
class ControlNetUnit:
    """A loaded ControlNet and the entry records name it by (name, path, sha256, kind, blocks)."""

    model: FluxControlNet
    info: dict[str, Any]


def _weights_sha256(path: Path) -> str:
    """A single file's SHA-256; for a diffusers folder, one over the names and hashes of the files it is
    read from (config.json, whose RoPE split counts, and the weights or shards; no other file)."""
    from pictor.controlnet_files import controlnet_files

    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in controlnet_files(path):
        digest.update(f"{f.name}|{sha256_file(f)}|".encode())
    return digest.hexdigest()


def open_controlnet(
    path: str | os.PathLike[str], flux: FluxParams, device: torch.device, dtype: torch.dtype
) -> ControlNetUnit:
    """Load a ControlNet for a transformer with `flux`'s params, refusing one made for another model."""
    from pictor.controlnet_files import load_controlnet  # the file formats only when one is loaded

    where = Path(path)
    try:
        # A single file's shapes do not tell its RoPE split; it is the transformer's, whose tokens it reads.
        model = load_controlnet(where, dtype=dtype, axes_dim=None if where.is_dir() else flux.axes_dim)
    except (CheckpointError, ValueError, OSError) as exc:
        raise ControlNetError(str(exc)) from exc
    p = model.params
    theirs = (p.hidden_size, p.context_in_dim, p.vec_in_dim, p.in_channels)
    ours = (flux.hidden_size, flux.context_in_dim, flux.vec_in_dim, flux.out_channels)
    if flux.in_channels != flux.out_channels:
        raise ControlNetError(
            f"{where}: ControlNets work beside a plain FLUX.1 transformer (noise in, velocity out); this "
            f"model reads {flux.in_channels} channels per token (a Fill, Canny or Depth model), so none can "
            "be added"
        )
    if theirs != ours:
        raise ControlNetError(
            f"{where}: the ControlNet was made for a transformer of width {p.hidden_size}, text "
            f"{p.context_in_dim}, pooled text {p.vec_in_dim} and {p.in_channels} latent channels per token, "
            "but this model has "
            f"{ours[0]}, {ours[1]}, {ours[2]} and {ours[3]}; use a ControlNet made for this model"
        )
    if p.depth > flux.depth or p.depth_single_blocks > flux.depth_single_blocks:
        raise ControlNetError(
            f"{where}: the ControlNet has {p.depth} double and {p.depth_single_blocks} single blocks, more "
            f"than this model's {flux.depth} and {flux.depth_single_blocks}; it was made for a larger model"
        )
    info = {
        "name": where.stem if where.is_file() else where.name,
        "path": str(where.resolve()),
        "sha256": _weights_sha256(where),
        "kind": p.kind,
        "double_blocks": p.depth,
        "single_blocks": p.depth_single_blocks,
        **({"modes": p.num_modes} if p.num_modes else {}),
    }
    return ControlNetUnit(model.to(device).eval().requires_grad_(False), info)


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


def kept_steps(steps: int, start: float, end: float) -> list[bool]:
    """diffusers' ``controlnet_keep``: step i of N runs the ControlNets unless i/N < start, (i+1)/N > end."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


class ControlNetRun:
    """The ControlNets of one sampler run: their conditioning, computed once, and the residuals for a call.

    ``ts``: the run's schedule (its N + 1 times, from its start down to 0)."""

    def __init__(
        self,
        units: list[ControlNetUnit],
        r: GenerationRequest,
        autoencoder: Any,
        dtype: torch.dtype,
        ts: torch.Tensor,
        flux: FluxParams,
    ) -> None:
        self.units = units
        self.depths = (flux.depth, flux.depth_single_blocks)
        self.scales = [float(s) for s in r.controlnet_scales or []]
        self.modes = list(r.controlnet_modes or [])
        self.dtype = dtype
        self.conds: list[torch.Tensor] = []
        for unit, pixels in zip(units, r.controlnet_images or [], strict=True):
            assert isinstance(pixels, np.ndarray)
            if unit.model.takes_pixels:  # XLabs: the picture through its hint net, once per run
                # its run device; under CPU offload its group (the transformer's) is brought in first
                device = bring_in(unit.model)
                x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
                self.conds.append(unit.model.cond_tokens(x.to(device, dtype)))
            else:  # the picture's packed latents, [1, N, 4 C], on the device the autoencoder ran on,
                # which is the ControlNet's too (not its parameters' CPU memory under offload)
                tokens = control_tokens(autoencoder, pixels, None, dtype, r.vae_tile, r.vae_tile_overlap)
                self.conds.append(tokens)
        self.times = [float(t) for t in ts.tolist()][:-1]  # each step's start; the last time is the end
        start, end = float(r.controlnet_start or 0.0), _end(r)
        self.keep = kept_steps(len(self.times), start, end)  # not all False: `controlnet_problem` checked
        # Residuals of ControlNets of one shape add as they are; others are spread over the blocks first.
        shapes = {
            (u.model.params.depth, u.model.params.depth_single_blocks, u.model.params.hint) for u in units
        }
        self.spread = len(shapes) > 1

    def active(self, t: float) -> bool:
        """Whether the model call at time t belongs to a step the ControlNets run in."""
        steps = [i for i, start in enumerate(self.times) if start >= t]
        return bool(steps) and self.keep[steps[-1]]

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        vec: torch.Tensor,
        guidance: float,
        index: torch.Tensor | None = None,
    ) -> ControlResiduals | None:
        """The summed, scaled residuals of every ControlNet for the noisy tokens x [B, N, C] at time t
        ([B] or a scalar) with the prompt's tokens and pooled vector, or None in a step left out. `index`:
        where x's tokens lie in the image's (a denoise window, `pictor.denoise_tiles`), so each ControlNet
        reads the control tokens of the same place; None: x is the whole image."""
        if not self.active(float(t.reshape(-1)[0])):
            return None
        n = x.shape[0]
        t = t.to(self.dtype)  # as the transformer gets it, so both embed the same time
        total: ControlResiduals | None = None
        for unit, cond, scale, mode in zip(self.units, self.conds, self.scales, self.modes, strict=True):
            if scale == 0.0:  # it would add zeros
                continue
            p = unit.model.params
            g = torch.full((n,), guidance, device=x.device, dtype=self.dtype) if p.guidance_embed else None
            m = torch.full((n,), int(mode), device=x.device, dtype=torch.long) if mode is not None else None
            if index is not None:  # every ControlNet's cond is tokens [1, N, C] here
                cond = cond[:, index]
            batch_cond = cond.expand(n, *cond.shape[1:])
            out = unit.model(
                x,
                img_ids,
                batch_cond,
                txt,
                txt_ids,
                t,
                vec,
                guidance=g,
                mode=m,
                hint_tokens=unit.model.takes_pixels,
            ).scaled(scale)
            if self.spread:  # ControlNets of different sizes add block by block
                out = out.spread(*self.depths)
            total = out if total is None else total + out
        return total


def _end(r: GenerationRequest) -> float:
    return 1.0 if r.controlnet_end is None else float(r.controlnet_end)


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


def controlnet_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `pictor info` says of a ControlNet file or diffusers folder, or None for anything else."""
    import json

    from safetensors import SafetensorError, safe_open

    from pictor.controlnet_files import DIFFUSERS_CLASS, describe_controlnet, read_controlnet

    where = Path(path)
    if where.is_dir():
        try:
            config = json.loads((where / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or config.get("_class_name") != DIFFUSERS_CLASS:
            return None
    else:
        try:
            with safe_open(str(where), framework="pt") as f:
                if not any(k.startswith("controlnet_blocks.") for k in f.keys()):  # noqa: SIM118
                    return None
        except (SafetensorError, OSError):
            return None
    try:
        params, _ = read_controlnet(where)
    except (CheckpointError, ValueError, OSError) as exc:
        return {"model": "FLUX.1 ControlNet", "error": str(exc)}
    return {
        "model": "FLUX.1 ControlNet",
        **describe_controlnet(params),
        "use": "pictor generate PROMPT --controlnet THIS --controlnet-image PICTURE"
        + (" --controlnet-mode MODE" if params.num_modes else ""),
        "sha256": _weights_sha256(where),
    }
