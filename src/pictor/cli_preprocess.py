"""`pictor preprocess canny|depth PICTURE -o OUT`: the control pictures ControlNets and FLUX.1 Canny / Depth
read, drawn from a photo (ComfyUI's preprocessor nodes, diffusers' docs' OpenCV and transformers snippets).

canny: OpenCV's Canny edges (`pictor.edge_maps`, equal to cv2.Canny bit for bit), white on black; the
thresholds default to 100 and 200 as diffusers' ControlNet examples use (BFL's FLUX.1 Canny [dev] uses 50
and 200, and `--control --canny` draws those itself). depth: a Depth Anything / DPT model from a local
folder (`pictor.depth_maps`), near = bright, as transformers' depth-estimation pipeline draws it.
The picture keeps its size: pictor fits a control picture to the image's size when it is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pictor.edge_maps import CONTROLNET_CANNY
from pictor.editing import EditError, rgb_picture


def _thresholds(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 100,200), got '{text}'") from None


def add_preprocess_parser(sub: Any) -> None:
    p = sub.add_parser(
        "preprocess",
        help="draw a control picture (Canny edges, a depth map) of a photo for ControlNets and FLUX.1 "
        "Canny / Depth",
    )
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    c = kinds.add_parser("canny", help="OpenCV's Canny edges, white on black")
    c.add_argument("picture")
    c.add_argument("-o", "--out", required=True, help="the PNG to write")
    c.add_argument(
        "--thresholds",
        type=_thresholds,
        default=CONTROLNET_CANNY,
        metavar="LOW,HIGH",
        help="OpenCV's hysteresis thresholds (default 100,200)",
    )
    d = kinds.add_parser("depth", help="a depth map (near = bright) by a local Depth Anything / DPT model")
    d.add_argument("picture")
    d.add_argument("-o", "--out", required=True, help="the PNG to write")
    d.add_argument(
        "--depth-model",
        required=True,
        metavar="DIR",
        help="a local Depth Anything (v1/v2) or DPT folder as save_pretrained writes it (safetensors)",
    )
    d.add_argument(
        "--rule",
        choices=("pipeline", "bfl"),
        default="pipeline",
        help="pipeline: scaled to 0..255 as transformers' depth-estimation pipeline (default); bfl: BFL's "
        "DepthImageEncoder's unscaled depth, for FLUX.1 Depth [dev]",
    )


def _target(out: str) -> Path:
    """The PNG to write, checked before any model loads."""
    target = Path(out)
    if target.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: the control picture is written as PNG; name the file .png")
    if target.is_dir():
        raise ValueError(f"-o {out} is a folder; give a file name ending in .png")
    return target


def _write_png(image: Image.Image, target: Path) -> None:
    """Written beside the target and renamed into place (with the umask's mode, as every output pictor
    writes): an interrupted run leaves no half-written file."""
    from pictor.checkpoint import staged_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(target) as tmp:
            image.save(tmp, format="PNG")
    except OSError as exc:
        raise ValueError(f"-o {target}: cannot write the picture there ({exc.strerror or exc})") from None


def cmd_preprocess(args: argparse.Namespace) -> int:
    target = _target(args.out)
    try:
        pixels = rgb_picture(args.picture, "picture")
    except EditError as exc:
        raise ValueError(str(exc)) from exc
    if args.kind == "canny":
        from pictor.edge_maps import canny_control_picture

        low, high = args.thresholds
        image = Image.fromarray(canny_control_picture(np.ascontiguousarray(pixels), low, high))
    else:
        from pictor.depth_maps import depth_map, load_depth_model

        model = load_depth_model(args.depth_model)
        image = depth_map(Image.fromarray(pixels), model, rule=args.rule)
    _write_png(image, target)
    print(args.out)
    return 0
