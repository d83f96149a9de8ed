"""Running an upscale model (`upscaler_files`) on a picture, as A1111's Extras tab and ComfyUI's "Upscale
Image (using Model)" do: in tiles, so that a large picture fits in memory, and to any factor (the model
runs until the picture is at least that large, then Lanczos brings it to the exact size).

Tiles are cut with `overlap` pixels of context on each side that are computed and thrown away, so seams
vanish once the overlap covers the net's reach; the tile and overlap are kept in the record, since they are
part of what made the pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pictor.editing import eight_bit, image_info
from pictor.models.upscalers import Upscaler
from pictor.upscaler_files import UpscalerFile

# Input pixels per tile side. RRDBNet x4 on a whole 256x256 picture peaks near 0.9 GiB above its weights
# (bench_upscaler_memory.py, CPU fp32), so a 512 tile is about four times that: within any GPU's memory.
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
MAX_SCALE = 16.0  # a x2 model runs four times for it
ALPHA_MODES = ("RGBA", "LA", "PA")  # not "A" in getbands(): a LAB picture's "a" is a colour channel


def upscaled_size(width: int, height: int, scale: float, model_scale: int) -> tuple[int, int, int]:
    """(width, height) of a width x height picture upscaled by `scale` as `upscale_image` makes it, and the
    pixels of the largest picture on the way (the model's last run, before Lanczos; or the result)."""
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return w, h, max(width * height * model_scale ** (2 * passes_for(scale, model_scale)), w * h)


def size_problem(width: int, height: int, scale: float, model_scale: int) -> str | None:
    """An upscale whose result, or the model's last run before Lanczos, holds more pixels than Pillow reads
    back without a decompression-bomb error (so pictor could not read what it wrote)."""
    passes = passes_for(scale, model_scale)
    largest = upscaled_size(width, height, scale, model_scale)[2]
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and largest > limit:
        return (
            f"a {width}x{height} picture at x{scale:g} ({passes} run(s) of the x{model_scale} model) makes "
            f"{largest / 1e6:.0f} million pixels, more than the {limit / 1e6:.0f} million a picture may "
            "have; use a smaller scale"
        )
    return None


def upscale_problem(scale: float | None, tile: int, overlap: int) -> str | None:
    """What is wrong with upscale settings, in words that say what to change; None when fine."""
    if scale is not None and not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        return f"the upscale factor must be above 0 and at most {MAX_SCALE:g} (e.g. 2 or 4), got {scale}"
    if tile < 32:
        return f"the tile size must be at least 32 pixels (0 is not 'no tiles': give a large one), got {tile}"
    if not 0 <= overlap < tile // 2:
        return f"the tile overlap must be at least 0 and under half the tile ({tile // 2}), got {overlap}"
    return None


def _multiple(net: Upscaler) -> int:
    """Tile edges must fall on the pixel-unshuffle grid of nets that start with one."""
    return getattr(net.params, "unshuffle", 1)


def _tile_starts(net: Upscaler, height: int, width: int, tile: int) -> tuple[range, range, int]:
    """Where `run_tiled` starts its tiles (rows, columns) and their side, on the net's unshuffle grid."""
    k = _multiple(net)
    step = -(-tile // k) * k
    return range(0, height, step), range(0, width, step), step


def tile_count(net: Upscaler, width: int, height: int, scale: float, tile: int) -> int:
    """How many net calls (tiles, over all its runs) `upscale_image` makes for a width x height picture: a
    job's progress total."""
    total = 0
    for _ in range(passes_for(scale, net.scale)):
        rows, columns, _ = _tile_starts(net, height, width, tile)
        total += 1 if width <= tile and height <= tile else len(rows) * len(columns)
        width, height = width * net.scale, height * net.scale
    return total


def run_tiled(net: Upscaler, pixels: Tensor, tile: int, overlap: int) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, H*s, W*s] (unclamped), `tile`-pixel squares at a time."""
    h, w = pixels.shape[-2:]
    if h <= tile and w <= tile:
        return net(pixels)
    k, s = _multiple(net), net.scale
    rows, columns, tile = _tile_starts(net, h, w, tile)
    overlap = -(-overlap // k) * k
    out = pixels.new_empty(*pixels.shape[:-2], h * s, w * s)
    for y0 in rows:
        for x0 in columns:
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            cy0, cx0 = max(0, y0 - overlap), max(0, x0 - overlap)
            part = net(pixels[..., cy0 : min(h, y1 + overlap), cx0 : min(w, x1 + overlap)])
            dy, dx = (y0 - cy0) * s, (x0 - cx0) * s
            kept = part[..., dy : dy + (y1 - y0) * s, dx : dx + (x1 - x0) * s]
            out[..., y0 * s : y1 * s, x0 * s : x1 * s] = kept
    return out


def passes_for(scale: float, model_scale: int) -> int:
    """How many times the model runs to reach at least `scale` (once for any factor it covers)."""
    return max(1, math.ceil(math.log(scale) / math.log(model_scale) - 1e-9)) if model_scale > 1 else 1


def upscale_image(
    upscaler: UpscalerFile,
    image: Image.Image,
    scale: float | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> Image.Image:
    """`image` enlarged by `scale` (the model's own factor when None) through the model; alpha by Lanczos."""
    problem = upscale_problem(scale, tile, overlap)
    if problem:
        raise ValueError(problem)
    scale = float(upscaler.scale) if scale is None else scale
    passes = passes_for(scale, upscaler.scale)
    image = with_alpha(image)
    problem = size_problem(image.width, image.height, scale, upscaler.scale)
    if problem:
        raise ValueError(problem)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    param = next(upscaler.net.parameters())
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = pixels.permute(2, 0, 1)[None].to(param.device, param.dtype)
    with torch.inference_mode():
        for _ in range(passes):
            x = run_tiled(upscaler.net, x, tile, overlap).clamp_(0, 1)
        x = x[0].float().mul_(255.0).round_().to(torch.uint8)  # in place: no more float copies of the picture
    array = x.permute(1, 2, 0).cpu().numpy()
    out = Image.fromarray(array)
    if out.size != size:
        out = out.resize(size, Image.LANCZOS)
    if image.mode in ALPHA_MODES:
        out.putalpha(image.getchannel("A").resize(size, Image.LANCZOS))
    return out


def upscale_record(upscaler: UpscalerFile, scale: float | None, tile: int, overlap: int) -> dict[str, Any]:
    """What an image's record keeps of the upscale that made it (the rest of the record: its source's)."""
    return {
        "upscaler": upscaler.name,
        "architecture": upscaler.architecture,
        "file": str(upscaler.path),
        "sha256": upscaler.sha256,
        "model_scale": upscaler.scale,
        "scale": float(upscaler.scale) if scale is None else scale,
        "tile": tile,
        "overlap": overlap,
    }


def upscaled_record(
    source_record: dict[str, Any] | None, source: Image.Image, upscale: dict[str, Any], version: str
) -> dict[str, Any]:
    """The record of an upscaled picture. A picture pictor generated keeps its own record, which `pictor
    reproduce` reruns before the upscale; any other picture (an upscale of an upscale too) is named by its
    pixels' hash, so that a reproduction can check the source it is given."""
    if isinstance(source_record, dict) and "prompt" in source_record and "upscale" not in source_record:
        return {**source_record, "upscale": upscale}
    return {"upscale": upscale, "source_image": image_info(picture_pixels(source)), "pictor_version": version}


def with_alpha(image: Image.Image) -> Image.Image:
    """The picture in 8 bits a channel (16-bit grey scaled, not clipped white as Pillow's conversion does),
    and one whose transparency is a colour key ("transparency" in its info) as RGBA, so that the upscale
    keeps it as it keeps an alpha band."""
    if image.mode == "F":
        raise ValueError(
            "a floating-point (mode F) picture has no 0-255 range to upscale; save it with 8 or 16 bits"
        )
    image = eight_bit(image)
    return image.convert("RGBA") if "transparency" in image.info else image


def upscale_input(image: Image.Image) -> Image.Image:
    """The picture as an upscale reads it: 8-bit RGB, or RGBA where it has transparency (kept)."""
    image = with_alpha(image)
    return image.convert("RGBA" if image.mode in ALPHA_MODES else "RGB")


def picture_pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3], or [H, W, 4] for a picture with alpha (the upscale keeps it): what its hash covers."""
    return np.asarray(upscale_input(image))
