"""Depth maps of photos, for FLUX.1 Depth [dev] and depth ControlNets (near = bright).

Users make these with ComfyUI's preprocessors, with ``transformers.pipeline("depth-estimation")`` as
diffusers' ControlNet docs do, or with BFL's ``DepthImageEncoder`` (Depth Anything,
LiheYoung/depth-anything-large-hf). pictor reads a Depth Anything (v1/v2) or DPT model from a local Hugging
Face folder (config.json, model.safetensors, preprocessor_config.json; nothing downloaded, nothing
unpickled) and draws the map with one of two rules:

``"pipeline"`` (default): what ``pipeline("depth-estimation", model=folder)(picture)["depth"]`` returns,
as an RGB picture (three equal channels, as diffusers' docs stack it), pixel for pixel:

1. the picture upright (EXIF orientation applied) and made RGB (alpha dropped, as ``convert("RGB")``);
2. DPT's image processor from preprocessor_config.json, done here with PIL and numpy as transformers' PIL
   backend does it (its fast processor needs torchvision, which pictor does not install): resize with
   the configured filter to ``size``, keeping the aspect ratio by the smaller change of scale if asked and
   rounding each side to ``ensure_multiple_of``; ``x * rescale_factor`` in float64 stored as float32;
   ``(x - mean) / std`` in float32; centre zero-padding to ``size_divisor`` when ``do_pad``;
3. the model's ``predicted_depth`` resized to the picture's size (torch bicubic, align_corners=False);
4. min-max normalised in float32 and ``(d * 255)`` truncated to uint8. A flat prediction (max == min),
   where transformers divides by zero, gives an all-black map.

``"bfl"``: BFL's ``DepthImageEncoder``, whose output FLUX.1 Depth [dev] was trained on. It does not
normalise: the model's raw depth, resized to the picture's size with torch's antialiased bicubic, is
scaled by ``depth / 127.5 - 1`` straight into the autoencoder. Its input is the picture after BFL's float
round trip (``/ 127.5 - 1``, then ``(x + 1) * 127.5`` truncated to uint8, as `prepare_control` makes it).
pictor returns ``round(depth)`` clipped to 0..255 as grey levels, so that the control path's ``/ 127.5 - 1``
gives BFL's tensor to within 0.5 / 127.5 wherever 0 <= depth <= 255 (outside, BFL's goes past [-1, 1]
and pictor's stops at the ends). Give the picture at the generation size, as BFL computes depth after its
resize; then the control path's own resize leaves the map as it is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from pictor.checkpoint import state_dict_hash
from pictor.editing import to_rgb
from pictor.generation_request import GenerationError
from pictor.hf_folders import load_pretrained_strict

__all__ = [
    "DEPTH_RULES",
    "DepthMapError",
    "DepthModel",
    "DepthPreprocess",
    "depth_map",
    "depth_pixel_values",
    "load_depth_model",
    "predicted_depth",
]

DepthRule = Literal["pipeline", "bfl"]
DEPTH_RULES: tuple[str, ...] = ("pipeline", "bfl")

# Model types whose depth-estimation pipeline is "DPT processor + predicted_depth + min-max": Depth
# Anything v1 and v2 both say "depth_anything"; MiDaS / DPT-hybrid / DPT-DINOv2 say "dpt". ZoeDepth, GLPN
# and Prompt Depth Anything preprocess or post-process differently, so they are refused, not guessed at.
_MODEL_TYPES = ("depth_anything", "dpt")
_PROCESSOR_TYPES = (
    "DPTImageProcessor",
    "DPTImageProcessorPil",
    "DPTImageProcessorFast",
    "DPTFeatureExtractor",
)
_SUGGESTION = "LiheYoung/depth-anything-large-hf, as BFL's FLUX.1 Depth code uses"


class DepthMapError(GenerationError):
    """A depth model folder or a picture that cannot be used; the message says what to change."""


@dataclass
class DepthPreprocess:
    """DPT's image processor settings (preprocessor_config.json); defaults are DPTImageProcessor's."""

    do_resize: bool = True
    height: int = 384
    width: int = 384
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    resample: int = Image.Resampling.BICUBIC
    rescale: float | None = 1 / 255  # None: do_rescale false
    mean: list[float] | None = field(default_factory=lambda: [0.5, 0.5, 0.5])  # None: do_normalize false
    std: list[float] | None = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pad_divisor: int | None = None  # do_pad with size_divisor

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the picture is resized to: transformers' DPT ``get_resize_output_image_size``."""
        if not self.do_resize:
            return height, width
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            # "scale as little as possible": the side whose scale is nearer 1 sets both
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h

        def multiple(value: float) -> int:
            # Python's round (half to even), as transformers; its max_val branch is never used there.
            return round(value / self.ensure_multiple_of) * self.ensure_multiple_of

        return multiple(scale_h * height), multiple(scale_w * width)


@dataclass
class DepthModel:
    """A transformers depth-estimation model, its preprocessing, and what records name it by."""

    model: nn.Module
    preprocess: DepthPreprocess
    info: dict[str, Any]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> DepthModel:
        # Only float32 on the CPU is what the pipeline reference computes; others differ in low bits.
        self.model = self.model.to(device, dtype).eval().requires_grad_(False)
        return self


def _flag(d: dict[str, Any], key: str, default: bool, path: Path) -> bool:
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DepthMapError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def _three(d: dict[str, Any], key: str, default: list[float], path: Path) -> list[float]:
    value = d.get(key, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * 3  # transformers repeats a single number per channel
    if not isinstance(value, list) or len(value) != 3:
        raise DepthMapError(f"{path}: {key} must be 3 numbers (one per RGB channel), got {value!r}")
    out = [float(v) for v in value]
    if not all(math.isfinite(v) for v in out):
        raise DepthMapError(f"{path}: {key} must be finite numbers, got {value!r}")
    return out


def _preprocess_config(folder: Path) -> DepthPreprocess:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise DepthMapError(
            f"{folder}: no preprocessor_config.json; give the whole model folder as the Hub has it or "
            f"save_pretrained writes it (e.g. {_SUGGESTION})"
        )
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepthMapError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(d, dict):
        raise DepthMapError(f"{path}: not an image processor config (a JSON object)")
    kind = d.get("image_processor_type") or d.get("feature_extractor_type")
    if kind is not None and kind not in _PROCESSOR_TYPES:
        raise DepthMapError(
            f"{path}: a {kind}; pictor reproduces DPT's image processor only (Depth Anything and DPT "
            "models use it): give such a model's folder"
        )
    try:
        size = d.get("size", {"height": 384, "width": 384})
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}  # old configs: one number means a square
        if not isinstance(size, dict) or set(size) - {"height", "width"} or len(size) != 2:
            raise ValueError(f"size must be {{'height': H, 'width': W}} for DPT's processor, got {size}")
        rescale = d.get("rescale_factor", 1 / 255)
        pad = _flag(d, "do_pad", False, path)
        cfg = DepthPreprocess(
            do_resize=_flag(d, "do_resize", True, path),
            height=int(size["height"]),
            width=int(size["width"]),
            keep_aspect_ratio=_flag(d, "keep_aspect_ratio", False, path),
            ensure_multiple_of=int(d.get("ensure_multiple_of") or 1),
            resample=int(d.get("resample", Image.Resampling.BICUBIC)),
            rescale=float(rescale) if _flag(d, "do_rescale", True, path) else None,
            mean=_three(d, "image_mean", [0.5] * 3, path) if _flag(d, "do_normalize", True, path) else None,
            std=_three(d, "image_std", [0.5] * 3, path) if _flag(d, "do_normalize", True, path) else None,
            # transformers pads only when both are set
            pad_divisor=int(d["size_divisor"]) if pad and d.get("size_divisor") is not None else None,
        )
    except (ValueError, TypeError) as exc:
        raise DepthMapError(f"{path}: not a usable DPT image processor config ({exc})") from None
    if cfg.height < 1 or cfg.width < 1 or cfg.ensure_multiple_of < 1:
        raise DepthMapError(f"{path}: size and ensure_multiple_of must be positive ({cfg})")
    if cfg.resample not in {int(r) for r in Image.Resampling}:
        raise DepthMapError(f"{path}: resample {cfg.resample} is not a PIL filter (0 to 5; 3 is bicubic)")
    if cfg.std is not None and 0.0 in cfg.std:
        raise DepthMapError(f"{path}: image_std must not hold a 0 (it divides)")
    if cfg.rescale is not None and not math.isfinite(cfg.rescale):
        raise DepthMapError(f"{path}: rescale_factor must be a finite number")
    if cfg.pad_divisor is not None and cfg.pad_divisor < 1:
        raise DepthMapError(f"{path}: size_divisor must be positive, got {cfg.pad_divisor}")
    return cfg


def _model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise DepthMapError(
            f"{folder}: no config.json; give a local Hugging Face depth model folder (e.g. {_SUGGESTION})"
        )
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepthMapError(f"{path}: not readable JSON ({exc})") from None
    kind = d.get("model_type") if isinstance(d, dict) else None
    if kind not in _MODEL_TYPES:
        raise DepthMapError(
            f"{path}: a {kind or 'unknown'} model, not Depth Anything or DPT; give a Depth Anything (v1/v2) "
            f"or DPT depth model folder (e.g. {_SUGGESTION})"
        )
    arches = d.get("architectures") or []
    if arches and not any(str(a).endswith("ForDepthEstimation") for a in arches):
        raise DepthMapError(f"{path}: a {', '.join(map(str, arches))}, not a depth-estimation model")
    if d.get("depth_estimation_type", "relative") != "relative":
        # Metric depth is far = bright once min-max normalised: the opposite of what depth control reads.
        raise DepthMapError(
            f"{path}: a metric depth model (far = large); depth control reads relative depth (near = "
            "bright): give a relative Depth Anything or DPT model"
        )
    return d


def _check_weights(folder: Path) -> None:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    if any((folder / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise DepthMapError(
            f"{folder}: its weights are a pickle (pytorch_model.bin), which pictor never loads; convert them "
            "once where you trust the file: AutoModelForDepthEstimation.from_pretrained(folder)"
            ".save_pretrained(folder, safe_serialization=True), or download model.safetensors"
        )
    raise DepthMapError(f"{folder}: no model.safetensors; give the folder with the model's safetensors file")


def load_depth_model(folder: str | os.PathLike[str]) -> DepthModel:
    """A Depth Anything (v1/v2) or DPT depth model from a local folder, float32 on the CPU, eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DepthMapError(
            f"depth model folder {folder}: no such folder; give a local Hugging Face folder (pictor "
            f"downloads nothing; e.g. {_SUGGESTION})"
        )
    config = _model_config(folder)
    _check_weights(folder)
    preprocess = _preprocess_config(folder)

    from transformers import AutoModelForDepthEstimation

    model = load_pretrained_strict(AutoModelForDepthEstimation, folder, "the depth model", DepthMapError)
    record = {
        "name": folder.resolve().name,
        "path": str(folder.resolve()),
        "model_type": config["model_type"],
        "sha256": state_dict_hash(model.state_dict()),
    }
    return DepthModel(model=model, preprocess=preprocess, info=record)


def depth_pixel_values(pixels: np.ndarray, preprocess: DepthPreprocess) -> Tensor:
    """pixel_values [1, 3, h, w] float32 of uint8 [H, W, 3], as DPT's PIL image processor makes them."""
    height, width = pixels.shape[:2]
    new_h, new_w = preprocess.resized_size(height, width)
    if new_h < 1 or new_w < 1:
        raise DepthMapError(
            f"a {width}x{height} picture is too thin for this depth model (it would be resized to "
            f"{new_w}x{new_h}); crop or pad it to a less extreme shape"
        )
    if preprocess.do_resize:
        pixels = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), preprocess.resample))
    x = pixels
    if preprocess.rescale is not None:
        # transformers' rescale: float64 product, stored as float32
        x = (x.astype(np.float64) * preprocess.rescale).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if preprocess.mean is not None and preprocess.std is not None:
        x = (x - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, h, w]
    if preprocess.pad_divisor is not None:
        d = preprocess.pad_divisor
        pad_h, pad_w = -new_h % d, -new_w % d
        x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    return torch.from_numpy(x)[None]


@torch.inference_mode()
def predicted_depth(model: DepthModel, pixels: np.ndarray) -> Tensor:
    """The model's raw depth [h, w] float32 on the CPU, at its own resolution (the resized picture's)."""
    param = next(model.model.parameters())
    x = depth_pixel_values(pixels, model.preprocess).to(param.device, param.dtype)
    out = model.model(pixel_values=x).predicted_depth  # [1, h, w]
    return out[0].float().cpu()


def _bfl_round_trip(pixels: np.ndarray) -> np.ndarray:
    # BFL's prepare_control hands its encoders the picture as float32 in [-1, 1]; DepthImageEncoder takes
    # it back with ((x + 1) * 127.5).byte(), which truncates. Same as control_images.bfl_canny_input,
    # repeated here so that control_images may import this module.
    x = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    x = np.clip(x, np.float32(-1.0), np.float32(1.0))
    return ((x + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8)


def _picture_pixels(picture: Image.Image) -> np.ndarray:
    if not isinstance(picture, Image.Image):
        raise DepthMapError(f"depth_map: the picture must be a PIL image, got {type(picture).__name__}")
    if picture.width < 1 or picture.height < 1:
        raise DepthMapError(f"depth_map: the picture is empty ({picture.width}x{picture.height})")
    # The pipeline turns a camera JPEG upright first (load_image's exif_transpose); so does pictor, so the
    # map fits the picture as viewers show it. 16-bit grey is scaled to 8 bits (pictor's to_rgb) where
    # convert("RGB") would clip it to near white: the one place pictor departs from the pipeline.
    return to_rgb(ImageOps.exif_transpose(picture))


def depth_map(picture: Image.Image, model: DepthModel, *, rule: DepthRule = "pipeline") -> Image.Image:
    """The depth map of `picture` as an RGB picture of its (upright) size, grey level = nearness.

    ``rule="pipeline"``: equal to transformers' depth-estimation pipeline's ``["depth"]`` (min-max to 0..255);
    ``rule="bfl"``: BFL's DepthImageEncoder's raw depth as grey levels (see the module's docstring).
    """
    if rule not in DEPTH_RULES:
        raise DepthMapError(f"depth_map: rule must be one of {', '.join(DEPTH_RULES)}, got {rule!r}")
    pixels = _picture_pixels(picture)  # [H, W, 3]
    height, width = pixels.shape[:2]
    if rule == "bfl":
        pixels = _bfl_round_trip(pixels)
    depth = predicted_depth(model, pixels)[None, None]  # [1, 1, h, w]
    if not torch.isfinite(depth).all():
        raise DepthMapError("depth_map: the depth model returned NaN or infinite depths; run it in float32")
    if rule == "pipeline":
        # post_process_depth_estimation, then the pipeline's normalisation, in the same dtypes
        d = torch.nn.functional.interpolate(depth, size=(height, width), mode="bicubic", align_corners=False)
        d = d[0, 0].numpy()
        lo, hi = d.min(), d.max()
        if hi == lo:
            grey = np.zeros((height, width), np.uint8)  # transformers would divide 0 by 0 here
        else:
            grey = (((d - lo) / (hi - lo)) * 255).astype(np.uint8)
    else:
        d = torch.nn.functional.interpolate(depth, size=(height, width), mode="bicubic", antialias=True)
        grey = np.clip(np.rint(d[0, 0].numpy()), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
