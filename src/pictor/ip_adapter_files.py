"""XLabs' FLUX.1 IP-Adapter (XLabs-AI/flux-ip-adapter ``ip_adapter.safetensors``) and CLIP's image encoder.

The picture is encoded as diffusers' ``FluxPipeline.encode_image`` does with the image encoder and feature
extractor that ``FluxIPAdapterMixin.load_ip_adapter`` gives it: CLIP's (slow, PIL) image processor resizes
the shortest side to the vision tower's size and center-crops it, and ``CLIPVisionModelWithProjection``'s
``image_embeds`` [1, image_dim] go to the adapter (`pictor.models.ip_adapter`). Under true classifier-free
guidance the negative half reads the embedding of a black picture, as diffusers' pipeline gives it.

The adapter file is read in XLabs' own key layout or in the prefixes diffusers' loader also accepts
(``image_proj.*``, ``ip_adapter.N.to_k_ip.*``), mapped to XLabs' names as that loader maps both, and then
checked strictly (every key read, none missing). The CLIP folder is the user's, local only; both are
safetensors (nothing unpickled or downloaded).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from pictor.checkpoint import sha256_file, state_dict_hash
from pictor.editing import EditError, ImageSource, eight_bit, image_info, load_image, rgb_picture
from pictor.generation_request import GenerationError
from pictor.hf_folders import load_pretrained_strict
from pictor.models.flux import FluxParams
from pictor.models.ip_adapter import IPAdapter, ip_adapter_shapes

__all__ = [
    "MAX_SCALE",
    "IPAdapterError",
    "IPAdapterModel",
    "blank_pixels",
    "clip_image_embeds",
    "ip_adapter_fields",
    "ip_adapter_file_summary",
    "ip_adapter_pixels",
    "ip_adapter_problem",
    "open_ip_adapter",
]

# XLabs suggest 0.6 to 1; a scale beyond this drowns the prompt many times over: a typo rather than a wish.
MAX_SCALE = 10.0

_CLIP = "openai/clip-vit-large-patch14"
_ADAPTER = "XLabs-AI/flux-ip-adapter's ip_adapter.safetensors"
# The prefixes diffusers' FluxIPAdapterMixin.load_ip_adapter sorts a .safetensors file's keys by.
_PROJ_PREFIXES = ("ip_adapter_proj_model.", "image_proj.")
_BLOCK_PREFIXES = ("double_blocks.", "ip_adapter.")
_PROJ_NAMES = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
# Block numbers as diffusers looks them up (f"{key_id}.to_k_ip.weight"): "01" would never be found there.
_BLOCK_NAME = re.compile(r"(0|[1-9][0-9]*)\.to_([kv])_ip\.(weight|bias)")


class IPAdapterError(GenerationError):
    """An IP-Adapter picture, file or CLIP folder that cannot be used; the message says what to change."""


@dataclass
class IPAdapterModel:
    """The adapter, CLIP's vision tower with its projection, its image processor, and what records name."""

    adapter: IPAdapter
    clip: nn.Module
    processor: Any
    info: dict[str, Any]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> IPAdapterModel:
        self.adapter = self.adapter.to(device, dtype).eval().requires_grad_(False)
        self.clip = self.clip.to(device, dtype).eval().requires_grad_(False)
        return self


def _xlabs_name(key: str) -> str | None:
    """A file key's XLabs name, after diffusers' load_ip_adapter renaming; None for a key it cannot place."""
    if key.startswith(_PROJ_PREFIXES):
        # Only proj and norm: diffusers' _convert_ip_adapter_image_proj_to_diffusers needs "proj.weight".
        name = key.split(".", 1)[1]
        return f"ip_adapter_proj_model.{name}" if name in _PROJ_NAMES else None
    if key.startswith(_BLOCK_PREFIXES):
        name = (
            key.split(".", 1)[1]
            .replace("ip_adapter_double_stream_k_proj", "to_k_ip")
            .replace("ip_adapter_double_stream_v_proj", "to_v_ip")
            .replace("processor.", "")
        )
        m = _BLOCK_NAME.fullmatch(name)
        return f"double_blocks.{m[1]}.processor.ip_adapter_double_stream_{m[2]}_proj.{m[3]}" if m else None
    return None


def _xlabs_names(keys: list[str]) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """{file key: XLabs name}, the keys no IP-Adapter holds, and pairs of keys that name the same weight."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    foreign: list[str] = []
    twice: list[tuple[str, str]] = []
    for key in sorted(keys):
        name = _xlabs_name(key)
        if name is None:
            foreign.append(key)
        elif name in seen:
            twice.append((seen[name], key))  # diffusers would silently keep one of the two
        else:
            names[key], seen[name] = name, key
    return names, foreign, twice


def _incomplete(names: set[str]) -> list[str]:
    """XLabs names an adapter with these blocks would also need (for the "not an IP-Adapter" message)."""
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("double_blocks.")}
    want = {f"ip_adapter_proj_model.{n}" for n in _PROJ_NAMES}
    for i in range(max(blocks, default=-1) + 1):
        want |= {
            f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{p}"
            for kv in "kv"
            for p in ("weight", "bias")
        }
    return sorted(want - names)


def _not_an_adapter(path: Path, keys: list[str], why: str) -> IPAdapterError:
    return IPAdapterError(
        f"{path}: not a FLUX.1 IP-Adapter ({why}); it holds {len(keys)} tensors: {sorted(keys)[:6]}. "
        "Expected XLabs' ip_adapter_proj_model.proj/norm and "
        "double_blocks.N.processor.ip_adapter_double_stream_k/v_proj weights and biases (or diffusers' "
        f"image_proj. and ip_adapter.N.to_k_ip names): give {_ADAPTER}"
    )


def _read_layout(path: Path, f: Any) -> tuple[dict[str, str], dict[str, Tensor]]:
    """{file key: XLabs name} and the XLabs names' shapes as meta tensors, read without loading a weight
    (a 23 GB transformer given by mistake is refused from its header)."""
    keys = list(f.keys())
    if not keys:
        raise _not_an_adapter(path, keys, "the file holds no tensors")
    names, foreign, twice = _xlabs_names(keys)
    if twice:
        raise _not_an_adapter(path, keys, f"{twice[0][0]} and {twice[0][1]} are the same weight")
    if foreign:
        raise _not_an_adapter(path, keys, f"{len(foreign)} keys are no IP-Adapter's, such as {foreign[0]}")
    shapes = {name: torch.empty(f.get_slice(key).get_shape(), device="meta") for key, name in names.items()}
    return names, shapes


def _adapter_dims(path: Path, names: dict[str, str], shapes: dict[str, Tensor]) -> tuple[int, ...]:
    dims = ip_adapter_shapes(shapes)
    if dims is None:
        missing = _incomplete(set(shapes))
        why = f"missing {missing[:4]}" if missing else "the weights' shapes do not fit together"
        raise _not_an_adapter(path, list(names), why)
    return dims


def _check_against(path: Path, dims: tuple[int, ...], params: FluxParams) -> None:
    _, context, hidden, _, depth = dims
    if depth != params.depth:
        raise IPAdapterError(
            f"{path}: this IP-Adapter was made for a transformer with {depth} double blocks, this one has "
            f"{params.depth}; XLabs' flux-ip-adapter is for FLUX.1 [dev] (19 double blocks)"
        )
    if context != params.context_in_dim:
        raise IPAdapterError(
            f"{path}: its picture tokens are {context} wide, but this transformer reads "
            f"{params.context_in_dim}-wide text tokens; XLabs' flux-ip-adapter is for FLUX.1 (T5's 4096)"
        )
    if hidden != params.hidden_size:
        raise IPAdapterError(
            f"{path}: its keys and values are {hidden} wide, but this transformer's hidden size is "
            f"{params.hidden_size}; give the IP-Adapter made for this model"
        )
    if hidden % params.num_heads:
        raise IPAdapterError(
            f"{path}: its {hidden}-wide keys and values do not split into this transformer's "
            f"{params.num_heads} heads; give the IP-Adapter made for this model"
        )


def _read_adapter(path: Path, params: FluxParams) -> IPAdapter:
    if not path.is_file():
        raise IPAdapterError(f"IP-Adapter file {path}: no such file; give {_ADAPTER}")
    if path.suffix.lower() != ".safetensors":
        raise IPAdapterError(
            f"IP-Adapter file {path}: pictor reads .safetensors only (never pickles, which can run code when "
            f"loaded); give {_ADAPTER}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            names, shapes = _read_layout(path, f)
            dims = _adapter_dims(path, names, shapes)
            _check_against(path, dims, params)
            state = {name: f.get_tensor(key) for key, name in names.items()}
    except (SafetensorError, OSError) as exc:
        raise IPAdapterError(f"IP-Adapter file {path}: not a readable safetensors file ({exc})") from None
    if bad := sorted(k for k, v in state.items() if not v.is_floating_point()):
        raise _not_an_adapter(path, list(names), f"{bad[0]} holds {state[bad[0]].dtype}, not weights")
    with torch.device("meta"):
        adapter = IPAdapter(*dims)
    # assign: the meta module takes the file's tensors (made float32, as every pictor load) without an init
    adapter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return adapter.eval().requires_grad_(False)


def _clip_config(folder: Path, image_dim: int) -> Any:
    """CLIP's vision config as CLIPVisionModelWithProjection reads it, checked before any weight is read."""
    from transformers import CLIPVisionConfig

    if not folder.is_dir():
        raise IPAdapterError(f"CLIP folder {folder}: no such folder; give a local copy of {_CLIP}")
    path = folder / "config.json"
    if not path.is_file():
        raise IPAdapterError(
            f"{folder}: not a CLIP model folder (no config.json); give CLIP's vision tower as "
            f"save_pretrained writes it ({_CLIP} for XLabs' IP-Adapter)"
        )
    try:
        raw = json.loads(path.read_text())
        model_type = raw.get("model_type")
    except (ValueError, AttributeError) as exc:
        raise IPAdapterError(f"{path}: not a readable model config ({exc})") from None
    if model_type not in ("clip", "clip_vision_model"):
        raise IPAdapterError(
            f"{folder}: its config.json says model_type {model_type!r}, not a CLIP model; give CLIP's vision "
            f"tower ({_CLIP} for XLabs' IP-Adapter)"
        )
    # A whole CLIPModel (openai/clip-vit-large-patch14 is saved so) projects to its top-level projection_dim,
    # but CLIPVisionModelWithProjection reads its vision_config's, as diffusers' loader does: when they
    # differ the projection would not load, so say which number is wrong.
    top, inner = raw.get("projection_dim", 512), (raw.get("vision_config") or {}).get("projection_dim", 512)
    if model_type == "clip" and top != inner:
        raise IPAdapterError(
            f"{path}: the CLIP model projects to {top} but its vision_config says projection_dim {inner}, "
            "which CLIPVisionModelWithProjection reads; correct vision_config.projection_dim"
        )
    try:
        config = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; name the folder in every case
        raise IPAdapterError(f"{path}: not a usable CLIP vision config ({exc})") from exc
    if int(config.projection_dim) != image_dim:
        raise IPAdapterError(
            f"{folder}: CLIP's image embeddings are {config.projection_dim} wide, but the IP-Adapter reads "
            f"{image_dim}; give the CLIP model it was made with ({_CLIP} for XLabs' IP-Adapter)"
        )
    if not isinstance(config.image_size, int):
        raise IPAdapterError(f"{path}: image_size {config.image_size!r} is not one number, as CLIP's is")
    if not any(folder.glob("*.safetensors")):
        raise IPAdapterError(
            f"{folder}: no .safetensors weights (pictor never unpickles pytorch_model.bin); save the model "
            "with save_pretrained(safe_serialization=True) or give a folder that has model.safetensors"
        )
    return config


def _image_processor(folder: Path, size: int) -> Any:
    """The folder's CLIP image processor, else the one diffusers' load_ip_adapter builds from the size."""
    import transformers

    # The PIL backend: transformers >= 5 makes CLIPImageProcessor torchvision's where that is installed,
    # which resizes differently; before 5 CLIPImageProcessor is the PIL one (there is no ...Pil).
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    if (folder / "preprocessor_config.json").is_file():
        try:
            processor = cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds; name the folder in every case
            raise IPAdapterError(f"{folder}: unreadable preprocessor_config.json ({exc})") from exc
    else:
        processor = cls(size=size, crop_size=size)  # diffusers: CLIPImageProcessor(size=..., crop_size=...)
    # A non-square probe: whatever the processor does with a picture must come out at the size CLIP reads.
    probe = Image.new("RGB", (2 * size + 3, size + 1))
    try:
        shape = tuple(processor(images=probe, return_tensors="pt").pixel_values.shape)
    except Exception as exc:  # a config transformers accepts may still fail on a picture
        raise IPAdapterError(f"{folder}: its image processor fails on a picture ({exc})") from exc
    if shape[1:] != (3, size, size):
        raise IPAdapterError(
            f"{folder}: its preprocessor_config.json makes {shape[-1]}x{shape[-2]} pictures, but CLIP's "
            f"vision tower reads {size}x{size}; the folder mixes two models"
        )
    return processor


def open_ip_adapter(
    path: str | os.PathLike[str], clip_folder: str | os.PathLike[str], params: FluxParams
) -> IPAdapterModel:
    """XLabs' FLUX.1 IP-Adapter file and a CLIP folder, checked against each other and against the
    transformer `params` describes.

    The CLIP folder is a ``save_pretrained`` folder of ``CLIPVisionModelWithProjection`` or of a whole
    ``CLIPModel`` (as openai/clip-vit-large-patch14 is published): its vision tower and projection are read,
    the text tower's weights are left unread (allowed, as for SigLIP), and missing vision weights refused."""
    from transformers import CLIPVisionModelWithProjection

    path, folder = Path(path), Path(clip_folder)
    adapter = _read_adapter(path, params)
    config = _clip_config(folder, adapter.image_dim)
    processor = _image_processor(folder, config.image_size)
    clip = load_pretrained_strict(
        CLIPVisionModelWithProjection, folder, "CLIP's vision tower", IPAdapterError
    )
    info = {
        "name": path.stem,
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "clip": str(folder.resolve()),
        # The vision tower's weights (not the folder's files: a whole CLIPModel's text tower is not read).
        "clip_sha256": state_dict_hash(clip.state_dict()),
        # How pictures are prepared for it (the folder's preprocessor_config.json, else diffusers' default):
        # the same weights behind another size, crop or mean see another picture.
        "clip_processor_sha256": processor_hash(processor),
        "tokens": adapter.num_tokens,
    }
    return IPAdapterModel(adapter=adapter, clip=clip, processor=processor, info=info)


def processor_hash(processor: Any) -> str:
    """SHA-256 of an image processor's settings (`to_dict`, keys sorted), to record and compare."""
    settings = json.dumps(processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()


def ip_adapter_file_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What `pictor info` says of an IP-Adapter file (either layout), or None for any other safetensors
    file. Only the header is read before the file's hash."""
    try:
        with safe_open(str(path), framework="pt") as f:
            _, shapes = _read_layout(Path(path), f)
    except (SafetensorError, OSError, IPAdapterError):
        return None
    dims = ip_adapter_shapes(shapes)
    if dims is None:
        return None
    image_dim, context, hidden, tokens, depth = dims
    return {
        "kind": "FLUX.1 IP-Adapter (XLabs)",
        "image_dim": image_dim,
        "context_dim": context,
        "hidden_size": hidden,
        "tokens": tokens,
        "double_blocks": depth,
        "use": "pictor generate --ip-adapter IMAGE --ip-adapter-model THIS_FILE --clip-vision CLIP_FOLDER",
        "sha256": sha256_file(path),
    }


def ip_adapter_pixels(source: ImageSource | np.ndarray) -> np.ndarray:
    """The IP-Adapter picture as uint8 [H, W, 3] at its own size (CLIP's processor resizes it): any mode
    made RGB, and transparency composited onto white, as CLIP's image processor does. Idempotent."""
    what = "IP-Adapter picture"
    try:
        if isinstance(source, np.ndarray) or not isinstance(source, Image.Image | str | os.PathLike):
            return rgb_picture(source, what)  # an array as it is; anything else refused there
        image = eight_bit(load_image(source, what))
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # transformers' convert_to_rgb (>= 5; 4.x dropped alpha, as Redux's convert("RGB")): what shows
            # through the transparent parts is white, not the hidden colours there, as diffusers' pipeline
            # encodes a picture handed to it with its alpha.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return rgb_picture(image, what)
    except EditError as exc:
        raise IPAdapterError(str(exc)) from exc


@torch.inference_mode()
def clip_image_embeds(model: IPAdapterModel, pixels: np.ndarray) -> Tensor:
    """CLIP's projected image embedding [1, image_dim] of a picture, on the vision tower's device and in its
    dtype, as diffusers' ``FluxPipeline.encode_image``."""
    pixels = ip_adapter_pixels(pixels)
    param = next(model.clip.parameters())
    # A PIL picture, not the array: transformers guesses an array's channel axis from its shape, and would
    # read a picture 3 pixels high as channels-first. For any other array the result is the same.
    x = model.processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
    return model.clip(pixel_values=x.to(param.device, param.dtype)).image_embeds


def blank_pixels(height: int, width: int) -> np.ndarray:
    """The picture diffusers' FluxPipeline encodes for the negative half under true CFG: all black."""
    # diffusers writes np.zeros((width, height, 3)), rows and columns swapped; CLIP's processor resizes and
    # crops any black picture to the same black input, so the swap changes nothing, and keeping it keeps
    # the input exactly diffusers'.
    return np.zeros((width, height, 3), dtype=np.uint8)


def ip_adapter_problem(r: Any, model: IPAdapterModel | None) -> str | None:
    """Why a request's IP-Adapter picture or scale cannot be used, or None."""
    scale = getattr(r, "ip_adapter_scale", None)
    if getattr(r, "ip_adapter_image", None) is None:
        if scale is not None:
            return "an IP-Adapter scale without an IP-Adapter picture; add --ip-adapter IMAGE or drop it"
        return None
    if model is None:
        return (
            "an IP-Adapter picture needs --ip-adapter-model FILE and --clip-vision FOLDER (XLabs' "
            f"ip_adapter.safetensors and a local copy of {_CLIP})"
        )
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or not 0 <= scale <= MAX_SCALE
    ):
        return f"the IP-Adapter scale must be a number from 0 to {MAX_SCALE:g}, got {scale!r}"
    return None


def ip_adapter_fields(pixels: np.ndarray, scale: float, info: dict[str, Any]) -> dict[str, Any]:
    """What an IP-Adapter picture adds to a record: the picture's hash and size, the files and the scale."""
    return {"ip_adapter_image": image_info(pixels), "ip_adapter": {**info, "scale": float(scale)}}
