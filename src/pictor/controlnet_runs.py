"""FLUX.1 ControlNets at run time: loaded beside the transformer, and when they speak during a run.

A ControlNet (InstantX's, Shakker-Labs' Union, XLabs'; `pictor.models.controlnet`) is loaded beside an
unchanged FLUX.1 [dev] / [schnell]-type transformer (`Pipeline.add_controlnet`). Each request then gives one
control picture per loaded ControlNet, fitted to the image's size with Lanczos as diffusers' image processor
and ComfyUI do (the request's ControlNet fields are checked, resolved and recorded in
`pictor.controlnet_requests`). The convention is diffusers' ``FluxControlNetPipeline``:

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.checkpoint import CheckpointError, sha256_file
from pictor.control_images import control_tokens
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import FluxParams
from pictor.models.offload import bring_in

if TYPE_CHECKING:
    from pictor.models.controlnet import FluxControlNet

__all__ = [
    "ControlNetError",
    "ControlNetRun",
    "ControlNetUnit",
    "controlnet_summary",
    "kept_steps",
    "open_controlnet",
]


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


def controlnet_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `pictor info` says of a ControlNet file or diffusers folder, or None for anything else."""
    import json

    from safetensors import SafetensorError, safe_open

    from pictor.controlnet_files import describe_controlnet, read_controlnet
    from pictor.controlnet_keys import DIFFUSERS_CLASS

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
