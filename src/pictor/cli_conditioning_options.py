"""The options that condition generate's and edit's images on more than the prompt: layouts and regional
prompts, reference pictures, FLUX.1 Kontext's context, Canny / Depth control pictures, ControlNets, FLUX.1
Redux and the IP-Adapter, and the adapter files they load (which reproduce, eval and serve take too).
Separate from :mod:`pictor.cli_options` because each is a family of its own beside the sampling settings."""

from __future__ import annotations

import argparse
from typing import Any


def add_layout_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layout-adapter",
        default=None,
        metavar="FILE",
        help="layout adapter (.safetensors from `pictor train layout`); "
        "default: the bundle's layout.safetensors",
    )


def add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layout",
        default=None,
        metavar="FILE|JSON",
        help='boxes with phrases, e.g. \'[{"box": [0.05, 0.3, 0.45, 0.7], "phrase": "a red circle"}]\' '
        "(fractions of the image; y grows downward); needs a layout adapter",
    )
    add_layout_adapter(p)
    p.add_argument(
        "--regions",
        default=None,
        metavar="FILE|JSON",
        help='regional prompts: boxes each with a prompt of its own, e.g. \'[{"box": [0, 0, 0.5, 1], '
        '"prompt": "a red circle", "strength": 1}]\' (fractions of the image; any model, no adapter; '
        "each region is one more transformer pass a step; a layout file reads as regions)",
    )
    p.add_argument(
        "--regional-attention",
        action="store_true",
        help="run --regions as one transformer pass whose attention lets each region's prompt reach only its "
        "box (Regional-Prompting-FLUX's mask), not a pass per region",
    )
    p.add_argument(
        "--regional-steps",
        type=float,
        default=None,
        metavar="N|SHARE",
        help="with --regional-attention: the mask in the first N steps only (a share below 1: that share of "
        "the steps; RPF's mask_inject_steps); the later steps run the prompt alone. Default: every step",
    )
    p.add_argument(
        "--regional-double-interval",
        type=int,
        default=None,
        metavar="K",
        help="with --regional-attention: the mask in every K-th double block only (RPF's "
        "double_inject_blocks_interval); the others see no region's words. Default: 1, every block",
    )
    p.add_argument(
        "--regional-single-interval",
        type=int,
        default=None,
        metavar="K",
        help="with --regional-attention: the mask in every K-th single block only (RPF's "
        "single_inject_blocks_interval). Default: 1, every block",
    )
    p.add_argument(
        "--regional-base-ratio",
        type=float,
        default=None,
        metavar="R",
        help="with --regional-attention: the share (0 to 1) of the image's attention in masked blocks taken "
        "from the prompt alone's, unmasked (RPF's base_ratio, e.g. 0.2). Default: 0",
    )


def regional_option_args(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of --regional-steps, --regional-double-interval, --regional-single-interval and
    --regional-base-ratio (`GenerationRequest.regional_steps` and the like; None where not given). A whole
    --regional-steps is a count of steps."""
    steps = getattr(args, "regional_steps", None)
    if steps is not None and steps >= 1 and float(steps).is_integer():
        steps = int(steps)
    return {
        "regional_steps": steps,
        "regional_double_interval": getattr(args, "regional_double_interval", None),
        "regional_single_interval": getattr(args, "regional_single_interval", None),
        "regional_base_ratio": getattr(args, "regional_base_ratio", None),
    }


def add_reference_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference-adapter",
        default=None,
        metavar="FILE",
        help="reference adapter (.safetensors from `pictor train reference`); "
        "default: the bundle's reference.safetensors",
    )


def add_reference(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference",
        default=None,
        metavar="IMAGE",
        help="an image prompt: a picture whose content the images take (fitted to the image size; an "
        "empty prompt leaves it all to the picture); needs a reference adapter",
    )
    add_reference_adapter(p)


def add_context(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--context",
        action="append",
        default=None,
        metavar="IMAGE",
        help='FLUX.1 Kontext: the picture the prompt\'s instruction edits (e.g. "make the circle blue"); '
        "resized to the model's preferred size, which the output takes unless --size is given; needs a "
        "Kontext model (`pictor convert flux --kontext`)",
    )


def _thresholds(text: str) -> tuple[float, float]:
    """--canny LOW,HIGH: two numbers (the range is checked with the request)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 50,200), got '{text}'") from None


def add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        default=None,
        metavar="IMAGE",
        help="FLUX.1 Canny / Depth [dev]: the control picture whose structure the images follow (an edge "
        "map for Canny, a depth map for Depth, near = bright); resized to the image size; needs such a model",
    )
    p.add_argument(
        "--canny",
        action="store_true",
        help="draw the --control picture's Canny edges first (a photo for a Canny model), as BFL's reference "
        "code does (OpenCV's Canny, thresholds 50 and 200)",
    )
    p.add_argument(
        "--canny-thresholds",
        type=_thresholds,
        default=None,
        metavar="LOW,HIGH",
        help="--canny with these thresholds instead of 50,200",
    )


def add_controlnet_models(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="MODEL",
        help="a FLUX.1 ControlNet (InstantX, Union or XLabs: a diffusers folder or a .safetensors file); "
        "repeat for several, each with its --controlnet-image",
    )
    p.add_argument(
        "--controlnet-image",
        action="append",
        default=None,
        metavar="IMAGE",
        help="the control picture of each --controlnet, in order (an edge map, depth map, pose, ...; "
        "`pictor preprocess` draws edges and depth maps of a photo)",
    )


def add_controlnets(p: argparse.ArgumentParser) -> None:
    add_controlnet_models(p)
    p.add_argument(
        "--controlnet-scale",
        action="append",
        type=float,
        default=None,
        metavar="S",
        help="how strongly the ControlNets speak (their residuals times S): one for all, or one each "
        "(default 1)",
    )
    p.add_argument(
        "--controlnet-mode",
        action="append",
        default=None,
        metavar="MODE",
        help="a Union ControlNet's picture kind: canny, tile, depth, blur, pose, gray, lq (one each)",
    )
    p.add_argument(
        "--controlnet-start",
        type=float,
        default=None,
        metavar="F",
        help="the share of the steps before the ControlNets start (default 0)",
    )
    p.add_argument(
        "--controlnet-end",
        type=float,
        default=None,
        metavar="F",
        help="the share of the steps after which the ControlNets stop (default 1)",
    )


def add_redux_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redux-model",
        default=None,
        metavar="FILE",
        help="FLUX.1 Redux's embedder (flux1-redux-dev.safetensors), with --siglip",
    )
    p.add_argument(
        "--siglip",
        default=None,
        metavar="DIR",
        help="a local SigLIP folder for FLUX.1 Redux (google/siglip-so400m-patch14-384 as saved)",
    )


def add_redux(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redux",
        default=None,
        metavar="IMAGE",
        help="FLUX.1 Redux: a picture whose content and style the images take (its SigLIP features follow "
        "the prompt's tokens); needs --redux-model and --siglip",
    )
    p.add_argument(
        "--redux-strength",
        type=float,
        default=None,
        metavar="S",
        help="how strongly the Redux picture speaks (its tokens times S; default 1, BFL's)",
    )
    add_redux_model(p)


def add_ip_adapter_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ip-adapter-model",
        default=None,
        metavar="FILE",
        help="XLabs' FLUX.1 IP-Adapter (ip_adapter.safetensors), with --clip-vision",
    )
    p.add_argument(
        "--clip-vision",
        default=None,
        metavar="DIR",
        help="a local CLIP vision folder for the IP-Adapter (openai/clip-vit-large-patch14 as saved)",
    )


def add_ip_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ip-adapter",
        default=None,
        metavar="IMAGE",
        help="IP-Adapter: a picture whose look the images take (its CLIP embedding is attended to in the "
        "double blocks); needs --ip-adapter-model and --clip-vision",
    )
    p.add_argument(
        "--ip-adapter-scale",
        type=float,
        default=None,
        metavar="S",
        help="how strongly the IP-Adapter picture speaks (default 1; XLabs suggest 0.5 to 1)",
    )
    add_ip_adapter_model(p)
