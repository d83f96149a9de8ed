"""Image featurizers for the distribution metrics of `pictor.eval.distribution`, and reading image folders.

An extractor maps a batch of 8-bit RGB images (numpy [H, W, 3], any size) to features [N, D]:

- "shapes": no weights. For the shapes world (benchmarks/SHAPES.md): what the scorer's detector finds in
  the image, as 19 numbers: objects per shape class (and unclassified), per colour, their count, covered
  area, mean object size, and the mean and spread of their centroids. FD on these says whether a model's
  scenes have the counts, colours, shapes, sizes and layouts of real ones, in units a person can read.
- "clip:PATH": a CLIP vision tower from a local folder (a CLIPModel or CLIPVisionModelWithProjection
  saved with save_pretrained): its projected image embedding, as clean-fid's "clip_vit_b_32" features.
- "dinov2:PATH": a DINOv2 model from a local folder: its normalised CLS token, the features that Stein et
  al. (2023) found to rank generative models closest to human judgement (FD_DINOv2).

Inception-v3, the network of the classic FID, is distributed as pickled PyTorch files, which pictor never
loads; use clip: or dinov2: with safetensors weights instead, and compare numbers only within one extractor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from pictor.data.folder import IMAGE_EXTENSIONS, to_rgb
from pictor.data.shapes_render import COLORS, SHAPES
from pictor.eval.shapes_detect import detect_objects
from pictor.models.text_encoder import model_folder_config

SHAPES_FEATURE_NAMES: tuple[str, ...] = (
    *(f"n_{s}" for s in SHAPES),
    "n_unclassified",
    *(f"n_{c}" for c in COLORS),
    "n_objects",
    "area_fraction",
    "mean_size",
    "mean_x",
    "mean_y",
    "spread_x",
    "spread_y",
)
# Preprocessing when a model folder has no preprocessor_config.json: what the original models were
# trained with (CLIP: OpenAI's mean/std at the tower's input size; DINOv2: ImageNet's, 256 -> crop 224).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "dinov2": ("dinov2",)}


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: Sequence[np.ndarray]) -> Tensor: ...  # [N, D] float32


def shapes_features(image: np.ndarray) -> np.ndarray:
    """The 19 numbers of SHAPES_FEATURE_NAMES for one image."""
    h, w = image.shape[:2]
    objects = detect_objects(image)
    counts = [sum(o.shape == s for o in objects) for s in SHAPES]
    counts.append(sum(o.shape is None for o in objects))
    counts += [sum(o.color == c for o in objects) for c in COLORS]
    xs = np.array([o.x / w for o in objects])
    ys = np.array([o.y / h for o in objects])
    areas = np.array([o.area / (w * h) for o in objects])
    some = len(objects) > 0
    return np.array(
        [
            *counts,
            len(objects),
            areas.sum(),
            np.sqrt(areas).mean() if some else 0.0,
            xs.mean() if some else 0.5,  # an empty image has its "layout" at the centre
            ys.mean() if some else 0.5,
            xs.std() if some else 0.0,
            ys.std() if some else 0.0,
        ],
        dtype=np.float32,
    )


class ShapesFeatures:
    name = "shapes"

    def __call__(self, images: Sequence[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack([shapes_features(im) for im in images]))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _preprocessor_config(folder: Path) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json, or where a processor was saved whole
    (transformers 5's ``CLIPProcessor.save_pretrained``) processor_config.json's "image_processor"."""
    pre = _read_json(folder / "preprocessor_config.json")
    if not pre:
        nested = _read_json(folder / "processor_config.json").get("image_processor")
        pre = nested if isinstance(nested, dict) else {}
    return pre


def _side(value: Any) -> tuple[int, int] | None:
    """(height, width) from a preprocessor size entry: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


class VisionModelFeatures:
    """A CLIP or DINOv2 vision model from a local folder; preprocessing as transformers' image processors
    (PIL bicubic resize of the shorter side, centre crop, scale to [0, 1], normalise)."""

    def __init__(self, kind: str, path: str | Path, device: str = "cpu") -> None:
        folder = Path(path)
        # The same folder checks as the text encoders': config.json, safetensors only, the model type.
        config = model_folder_config(folder, set(_MODEL_TYPES[kind]), f"{kind} features")
        self.name = f"{kind}:{folder}"
        self.kind = kind
        self.device = torch.device(device)
        self.model = self._load(kind, folder).to(self.device)
        pre = _preprocessor_config(folder)
        if kind == "clip":
            vision = config.get("vision_config", config)
            side = int(vision.get("image_size", 224))
            short, crop = side, (side, side)
            mean, std = _CLIP_MEAN, _CLIP_STD
        else:
            short, crop, mean, std = 256, (224, 224), _IMAGENET_MEAN, _IMAGENET_STD
        size = pre.get("size")
        if isinstance(size, int):  # the legacy form (OpenAI's CLIP configs): both processors read it
            size = {"shortest_edge": size}  # as the shorter side, not a square (default_to_square=False)
        short = int(size["shortest_edge"]) if isinstance(size, dict) and "shortest_edge" in size else short
        self.resize_to: tuple[int, int] | None = _side(size)  # a fixed (h, w) resize instead of shortest
        self.short = short
        self.crop = (_side(pre.get("crop_size")) or crop) if pre.get("do_center_crop", True) else None
        self.resample = int(pre.get("resample", Image.Resampling.BICUBIC))
        self.mean = torch.tensor(pre.get("image_mean", mean), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(pre.get("image_std", std), dtype=torch.float32)[:, None, None]

    @staticmethod
    def _load(kind: str, folder: Path) -> torch.nn.Module:
        from transformers import CLIPVisionModelWithProjection, Dinov2Model

        cls = CLIPVisionModelWithProjection if kind == "clip" else Dinov2Model
        try:
            model = cls.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32
            )
        except Exception as e:  # transformers raises many kinds; name the folder in every case
            raise ValueError(f"{kind} features: could not load the model in {folder}: {e}") from e
        return model.eval().requires_grad_(False)

    def preprocess(self, image: np.ndarray) -> Tensor:
        """uint8 [H, W, 3] -> float32 [3, h, w], normalised."""
        pil = Image.fromarray(image)
        if self.resize_to is not None:
            pil = pil.resize((self.resize_to[1], self.resize_to[0]), resample=self.resample)
        else:
            w, h = pil.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.short * long / short)
            pil = pil.resize(
                (self.short, new_long) if w <= h else (new_long, self.short), resample=self.resample
            )
        arr = np.asarray(pil, dtype=np.float32) * np.float32(1 / 255)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
            arr = arr[max(top, 0) : max(top, 0) + ch, max(left, 0) : max(left, 0) + cw]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> Tensor:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        out = self.model(pixel_values=x)
        feats = out.image_embeds if self.kind == "clip" else out.pooler_output
        return feats.float().cpu()


def build_extractor(spec: str, device: str = "cpu") -> FeatureExtractor:
    """ "shapes", "clip:PATH" or "dinov2:PATH"."""
    if spec == "shapes":
        return ShapesFeatures()
    kind, sep, path = spec.partition(":")
    if sep and kind in _MODEL_TYPES and path:
        return VisionModelFeatures(kind, path, device)
    raise ValueError(
        f"unknown features {spec!r}: use 'shapes' (no weights; the shapes world), 'clip:PATH' or "
        "'dinov2:PATH' (a local model folder with safetensors weights)"
    )


def image_files(folder: str | Path) -> list[Path]:
    """The image files under folder (recursively), sorted, so that a run is repeatable."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_images(
    paths: Sequence[Path], batch_size: int, skipped: list[tuple[str, str]]
) -> Iterator[list[np.ndarray]]:
    """Batches of 8-bit RGB arrays (EXIF orientation applied); an unreadable file is appended to skipped
    with its reason and left out, so one bad file does not end an evaluation of thousands."""
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            with Image.open(path) as im:
                batch.append(np.asarray(to_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8))
        except Exception as e:  # Pillow raises many kinds on a bad file
            skipped.append((str(path), f"unreadable: {e}"))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def featurize_folder(
    folder: str | Path,
    extractor: FeatureExtractor,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, list[tuple[str, str]]]:
    """Features [N, D] of the readable images under folder, and the (path, reason) of those skipped."""
    paths = image_files(folder)
    skipped: list[tuple[str, str]] = []
    parts: list[Tensor] = []
    done = 0
    for batch in read_images(paths, batch_size, skipped):
        parts.append(extractor(batch))
        done += len(batch)
        if progress is not None:
            progress(done + len(skipped), len(paths))
    if done < 2:
        raise ValueError(
            f"{folder}: {done} readable images ({len(paths)} files with an image extension, "
            f"{len(skipped)} unreadable); distribution metrics need at least 2 per set, and thousands "
            "for numbers that mean much"
        )
    return torch.cat(parts), skipped
