"""FLUX.1 Redux [dev]: a picture as extra prompt tokens, read by an unchanged FLUX.1 transformer.

The convention is BFL's (flux ``ReduxImageEncoder`` and ``sampling.prepare_redux``; diffusers'
``FluxPriorReduxPipeline``): the picture, made RGB, is prepared as SigLIP's image processor does (resized
to its size with its filter, scaled to [0, 1], normalised by its mean and std), SigLIP's vision tower gives
one feature per patch (729 x 1152 for so400m-patch14-384), the Redux embedder projects them into the T5 space
(`pictor.models.redux`), and those tokens follow the prompt's T5 tokens; the pooled CLIP vector stays the
prompt's. pictor scales the picture's tokens by a strength (ComfyUI's "multiply"; 1 is BFL's and diffusers').

Redux is made for guidance-distilled FLUX.1 [dev] (one conditional pass); with real classifier-free guidance
there is no agreed unconditional half for the picture, so such a run is refused. The SigLIP folder and the
Redux file are the user's, read from local paths only (safetensors; nothing unpickled or downloaded).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from pictor.checkpoint import sha256_file, state_dict_hash
from pictor.editing import EditError, ImageSource, image_info, rgb_picture
from pictor.generation_request import GenerationError
from pictor.hf_folders import load_pretrained_strict
from pictor.models.redux import ReduxEncoder, redux_shapes

__all__ = [
    "MAX_STRENGTH",
    "ReduxError",
    "ReduxModel",
    "open_redux",
    "redux_fields",
    "redux_file_summary",
    "redux_pixels",
    "redux_problem",
    "redux_tokens",
    "siglip_inputs",
]

# A strength beyond this drowns the prompt many times over: a typo rather than a wish.
MAX_STRENGTH = 10.0


class ReduxError(GenerationError):
    """A Redux picture, file or SigLIP folder that cannot be used; the message says what to change."""


@dataclass
class SiglipPreprocess:
    """SigLIP's image processor settings (its preprocessor_config.json): resize, rescale, normalise."""

    width: int
    height: int
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class ReduxModel:
    """The Redux embedder, SigLIP's vision tower and its preprocessing, and the entry records name."""

    encoder: ReduxEncoder
    siglip: nn.Module
    preprocess: SiglipPreprocess
    info: dict[str, Any]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ReduxModel:
        self.encoder = self.encoder.to(device, dtype).eval().requires_grad_(False)
        self.siglip = self.siglip.to(device, dtype).eval().requires_grad_(False)
        return self


def _preprocess_config(folder: Path) -> SiglipPreprocess:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise ReduxError(
            f"{folder}: no preprocessor_config.json; give the SigLIP folder as save_pretrained writes it "
            "(google/siglip-so400m-patch14-384 for FLUX.1 Redux)"
        )
    try:
        d = json.loads(path.read_text())
        size = d.get("size") or {}
        cfg = SiglipPreprocess(
            width=int(size["width"]),
            height=int(size["height"]),
            resample=int(d.get("resample", Image.Resampling.BICUBIC)),
            rescale=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
            mean=[float(v) for v in d.get("image_mean", [0.5] * 3)]
            if d.get("do_normalize", True)
            else [0.0] * 3,
            std=[float(v) for v in d.get("image_std", [0.5] * 3)]
            if d.get("do_normalize", True)
            else [1.0] * 3,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ReduxError(f"{path}: not a SigLIP image processor config ({exc!r})") from None
    if cfg.width < 1 or cfg.height < 1 or len(cfg.mean) != 3 or len(cfg.std) != 3 or 0 in cfg.std:
        raise ReduxError(f"{path}: unusable size, mean or std ({cfg})")
    return cfg


def _load_siglip(folder: Path) -> nn.Module:
    from transformers import SiglipVisionModel

    if not (folder / "config.json").is_file():
        raise ReduxError(f"{folder}: not a SigLIP model folder (no config.json); give a local folder")
    return load_pretrained_strict(SiglipVisionModel, folder, "SigLIP's vision tower", ReduxError)


def open_redux(path: str | os.PathLike[str], siglip: str | os.PathLike[str], context_dim: int) -> ReduxModel:
    """A Redux file (flux1-redux-dev.safetensors) and a SigLIP folder, checked against each other and
    against a transformer that reads `context_dim`-wide text tokens."""
    path, folder = Path(path), Path(siglip)
    if not path.is_file():
        raise ReduxError(f"Redux file {path}: no such file")
    if path.suffix != ".safetensors":
        raise ReduxError(f"Redux file {path}: pictor reads .safetensors only (never pickles)")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ReduxError(f"Redux file {path}: not a readable safetensors file ({exc})") from None
    dims = redux_shapes(state)
    if dims is None:
        raise ReduxError(
            f"{path}: not a FLUX.1 Redux embedder (expected redux_up and redux_down weights and biases, the "
            f"first 3 x as wide as the second's output); it holds {sorted(state)[:6]}"
        )
    siglip_dim, width = dims
    if width != context_dim:
        raise ReduxError(
            f"{path}: its tokens are {width} wide, but this model reads {context_dim}-wide text tokens; "
            "FLUX.1 Redux [dev] is for FLUX.1 [dev] (T5's 4096)"
        )
    preprocess = _preprocess_config(folder)
    vision = _load_siglip(folder)
    size = getattr(vision.config, "image_size", None)
    if isinstance(size, int) and (preprocess.width, preprocess.height) != (size, size):
        raise ReduxError(
            f"{folder}: its preprocessor_config.json resizes pictures to {preprocess.width}x"
            f"{preprocess.height}, but the model reads {size}x{size}; the folder mixes two models"
        )
    hidden = int(vision.config.hidden_size)
    if hidden != siglip_dim:
        raise ReduxError(
            f"{folder}: SigLIP's features are {hidden} wide, but {path.name} reads {siglip_dim}; give the "
            "SigLIP model it was made with (google/siglip-so400m-patch14-384 for FLUX.1 Redux [dev])"
        )
    encoder = ReduxEncoder(siglip_dim, width)
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    info = {
        "name": path.stem,
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "siglip": str(folder.resolve()),
        # The vision tower's weights (not the folder's files: a whole SiglipModel's text tower is not read).
        "siglip_sha256": state_dict_hash(vision.state_dict()),
    }
    return ReduxModel(encoder=encoder.eval(), siglip=vision, preprocess=preprocess, info=info)


def redux_file_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `pictor info` says of a FLUX.1 Redux file, or None for any other safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}:
                return None
            dims = redux_shapes({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    except (SafetensorError, OSError):
        return None
    if dims is None:
        return None
    return {
        "kind": "FLUX.1 Redux image embedder",
        "siglip_dim": dims[0],
        "context_dim": dims[1],
        "use": "pictor generate --redux IMAGE --redux-model THIS_FILE --siglip SIGLIP_FOLDER",
        "sha256": sha256_file(path),
    }


def redux_pixels(source: ImageSource | np.ndarray) -> np.ndarray:
    """The Redux picture as uint8 [H, W, 3] at its own size (SigLIP's processor resizes it): any mode made
    RGB, as BFL's ``convert("RGB")``. Idempotent."""
    try:
        return rgb_picture(source, "Redux picture")
    except EditError as exc:
        raise ReduxError(str(exc)) from exc


def siglip_inputs(pixels: np.ndarray, preprocess: SiglipPreprocess) -> Tensor:
    """pixel_values [1, 3, h, w] as SigLIP's (PIL) image processor makes them."""
    im = Image.fromarray(pixels).resize((preprocess.width, preprocess.height), preprocess.resample)
    x = np.asarray(im, dtype=np.float32) * np.float32(preprocess.rescale)
    x = (x - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


@torch.inference_mode()
def redux_tokens(redux: ReduxModel, pixels: np.ndarray, strength: float, dtype: torch.dtype) -> Tensor:
    """The picture's tokens [1, N, context_dim], times `strength`, to follow the prompt's T5 tokens."""
    param = next(redux.encoder.parameters())
    x = siglip_inputs(pixels, redux.preprocess).to(param.device, param.dtype)
    features = redux.siglip(pixel_values=x).last_hidden_state
    return (redux.encoder(features) * strength).to(dtype)


def redux_problem(r: Any, redux: ReduxModel | None, guidance_mode: str) -> str | None:
    """Why a request's Redux picture cannot be used, or None."""
    if getattr(r, "redux_image", None) is None:
        if getattr(r, "redux_strength", None) is not None:
            return "a Redux strength was given without a Redux picture; add --redux IMAGE or drop it"
        return None
    if getattr(r, "reference", None) is not None:
        # A reference adapter adds one residual per prompt token; Redux's tokens are not prompt tokens.
        return "a Redux picture and a reference picture cannot be combined; give one of them"
    if redux is None:
        return (
            "a Redux picture needs the Redux embedder and SigLIP's vision tower: pass --redux-model "
            "flux1-redux-dev.safetensors --siglip SIGLIP_FOLDER"
        )
    strength = getattr(r, "redux_strength", None)
    if strength is not None and (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not math.isfinite(strength)
        or not 0 <= strength <= MAX_STRENGTH
    ):
        return f"the Redux strength must be a number from 0 to {MAX_STRENGTH:g}, got {strength!r}"
    if guidance_mode == "cfg" and (r.guidance or 0.0) != 1.0:
        return (
            "FLUX.1 Redux is made for guidance-distilled models (one conditional pass); this model uses "
            "classifier-free guidance, which has no unconditional half for the picture: use guidance 1, or "
            "a FLUX.1 [dev] model"
        )
    return None


def redux_fields(pixels: np.ndarray, strength: float, info: dict[str, Any]) -> dict[str, Any]:
    """What a Redux picture adds to a record: the picture's hash and size, the files and the strength."""
    return {"redux_image": image_info(pixels), "redux": {**info, "strength": float(strength)}}
