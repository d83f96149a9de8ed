"""ComfyUI's upscaling nodes between a hires fix's two passes, and the size they give the second pass, by
ComfyUI's own arithmetic (comfy nodes.py): LatentUpscaleBy rounds latent sides (Python's round) times
scale_by; LatentUpscale takes width // 8 (at least 64 pixels a side); ImageScaleBy rounds pixel sides times
scale_by; ImageScale keeps the aspect where a side is 0; VAEEncode crops the picture to whole latents (a
multiple of 8). How each enlarges, where pictor's hires fix (Lanczos, or an upscale model then Lanczos) does
otherwise, is said in a notice. Read by `pictor.comfy_passes`.
"""

from __future__ import annotations

import re

from pictor.comfy_graph import ComfyGraph, shortened

LATENT_SCALERS = {"LatentUpscale", "LatentUpscaleBy"}
IMAGE_SCALERS = {"ImageScale", "ImageScaleBy", "ImageUpscaleWithModel"}
DECODERS = {"VAEDecode", "VAEDecodeTiled"}
ENCODERS = {"VAEEncode", "VAEEncodeTiled"}
LATENT_FACTOR = 8  # ComfyUI's latents for FLUX.1 (and SD) are the picture's size / 8
# Sides past this are no picture pictor or ComfyUI draws (ComfyUI's MAX_RESOLUTION is 16,384, an upscale
# model may enlarge it 8x): a graph asking for more is not worked out further (its numbers may overflow)
MAX_SIDE = 1 << 17
# An upscale model's scale, from its file name ("4x-UltraSharp", "RealESRGAN_x4plus", "2xNomos"): the
# graph does not hold it
MODEL_SCALE = re.compile(r"(?<![0-9a-z])([1-8])x|x([1-8])(?![0-9])", re.IGNORECASE)


def second_size(
    graph: ComfyGraph, size: tuple[int, int] | None, between: list[str], notices: list[str]
) -> tuple[tuple[int, int] | None, float | None, str | None]:
    """The second pass's size as ComfyUI works it out, the product of the scale factors on the way (None
    where a node sets a size instead), and an upscale model's file name; the upscaling said in notices."""
    if size is None:
        return None, None, None
    if max(size) > MAX_SIDE:
        notices.append(
            "the graph's first pass is larger than any picture pictor draws: its hires fix is not taken"
        )
        return None, None, None
    f = LATENT_FACTOR
    lat = (size[0] // f, size[1] // f)
    pix = (lat[0] * f, lat[1] * f)
    factor: float | None = 1.0
    model_file = None
    for node in between:
        name = graph.name(node)
        try:
            lat, pix, factor, found, known = _through(graph, node, lat, pix, factor, notices)
        except OverflowError:  # a size or scale past any float: larger than any picture
            lat, pix, found, known = (MAX_SIDE + 1, 1), (1, 1), None, True
        model_file = found or model_file
        if not known:
            return None, None, model_file
        if min(lat) < 1 or min(pix) < 1:
            notices.append(f"{name} leaves no picture: the second pass's size is not known, nor taken")
            return None, None, model_file
        if max(lat) * f > MAX_SIDE or max(pix) > MAX_SIDE:
            notices.append(
                f"{name} makes a picture larger than any pictor draws: the second pass's size is not known, "
                "nor taken"
            )
            return None, None, model_file
    return (lat[0] * f, lat[1] * f), factor, model_file


def _through(
    graph: ComfyGraph,
    node: str,
    lat: tuple[int, int],
    pix: tuple[int, int],
    factor: float | None,
    notices: list[str],
) -> tuple[tuple[int, int], tuple[int, int], float | None, str | None, bool]:
    """One node on the way: the latent's and the picture's sides after it, the scale factor so far, an
    upscale model's file name, and whether its scale is known."""
    f, cls, model_file = LATENT_FACTOR, graph.cls(node), None
    if cls in DECODERS:
        pix = (lat[0] * f, lat[1] * f)
    elif cls in ENCODERS:  # VAEEncode crops the picture to whole latents (comfy/sd.py)
        lat = (pix[0] // f, pix[1] // f)
    elif cls == "LatentUpscaleBy":
        s = graph.value(node, "scale_by", float, notices) or 0.0
        lat = (round(lat[0] * s), round(lat[1] * s))
        factor = None if factor is None else factor * s
        _method_notice(graph, node, notices, latent=True)
    elif cls == "LatentUpscale":
        w, h = _target(graph, node, lat, notices, latent=True)
        lat, factor = (w // f, h // f), None
        _method_notice(graph, node, notices, latent=True)
    elif cls == "ImageScaleBy":
        s = graph.value(node, "scale_by", float, notices) or 0.0
        pix = (round(pix[0] * s), round(pix[1] * s))
        factor = None if factor is None else factor * s
        _method_notice(graph, node, notices)
    elif cls == "ImageScale":
        pix, factor = _target(graph, node, pix, notices, latent=False), None
        _method_notice(graph, node, notices)
    else:  # ImageUpscaleWithModel
        model_file, m = _upscale_model(graph, node, notices)
        if m is None:
            return lat, pix, factor, model_file, False
        pix = (pix[0] * m, pix[1] * m)
        factor = None if factor is None else factor * m
    return lat, pix, factor, model_file, True


def _target(
    graph: ComfyGraph, node: str, current: tuple[int, int], notices: list[str], latent: bool
) -> tuple[int, int]:
    """LatentUpscale's or ImageScale's width and height in pixels (0 keeps the aspect; both 0 keeps the
    size). LatentUpscale is given the latent's sides and makes each at least 64 pixels, ImageScale 1."""
    w = graph.value(node, "width", int, notices) or 0
    h = graph.value(node, "height", int, notices) or 0
    f, least = (LATENT_FACTOR, 64) if latent else (1, 1)
    if w == 0 and h == 0:
        return current[0] * f, current[1] * f
    if w == 0:
        h = max(least, h)
        return max(least, round(current[0] * h / current[1])), h
    if h == 0:
        w = max(least, w)
        return w, max(least, round(current[1] * w / current[0]))
    return max(least, w), max(least, h)


def _method_notice(graph: ComfyGraph, node: str, notices: list[str], latent: bool = False) -> None:
    method = graph.value(node, "upscale_method", str, notices)
    if latent:
        notices.append(
            f"the graph's hires fix enlarges the latent ({graph.name(node)}, {method}), which pictor does "
            "not: pictor's enlarges the decoded picture with Lanczos"
        )
    elif method is not None and method != "lanczos":
        notices.append(f"{graph.name(node)} resizes with {method}, where pictor's hires fix uses Lanczos")


def _upscale_model(graph: ComfyGraph, node: str, notices: list[str]) -> tuple[str | None, int | None]:
    """The upscale model's file name and its scale, read from that name (the graph does not hold it)."""
    ref = graph.follow(graph.inputs(node).get("upscale_model"))
    if ref is None or graph.cls(ref[0]) != "UpscaleModelLoader":
        notices.append(
            f"{graph.name(node)}'s upscale model is not loaded by UpscaleModelLoader, so its scale is not "
            "known: the hires fix is not taken"
        )
        return None, None
    raw = graph.value(ref[0], "model_name", str, notices) or ""
    file = shortened(raw.replace("\\", "/").rsplit("/", 1)[-1])
    match = MODEL_SCALE.search(file)
    if match is None:
        notices.append(
            f"the graph's upscale model '{file}' does not say its scale in its name, and the graph does not "
            "hold it: its hires fix is not taken (give --hires SCALE and --hires-upscaler FILE)"
        )
        return file, None
    scale = int(match[1] or match[2])
    notices.append(f"the graph's upscale model '{file}' is taken to enlarge {scale}x, as its name says")
    return file, scale
