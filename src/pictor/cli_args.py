"""The command line's grammar: every `pictor` subcommand and its arguments (`pictor train` adds its own,
from :mod:`pictor.train.command`). :mod:`pictor.cli` runs what is parsed here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from pictor import __version__
from pictor.cli_caption import add_caption_parser
from pictor.cli_grid import add_grid_parser
from pictor.cli_guidance import add_guidance_options
from pictor.cli_merge import add_merge_parser
from pictor.cli_preprocess import add_preprocess_parser
from pictor.cli_preview import add_preview_options
from pictor.cli_upscale import add_upscale_parser
from pictor.sampling import SAMPLERS, SCHEDULES, STOCHASTIC_SAMPLERS
from pictor.train import command as train_command

SIZE_RE = re.compile(r"^(\d+)[xX](\d+)$")


def _size(text: str) -> tuple[int, int]:
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 64x64; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def _expand(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(
            f"expand must be four pixel counts LEFT,TOP,RIGHT,BOTTOM, e.g. 0,0,16,0; got '{text}'"
        )
    if not any(values):  # else the "outpainting" would quietly be an img2img of the whole picture
        raise argparse.ArgumentTypeError("expand 0,0,0,0 adds nothing; give the pixels to add, e.g. 0,0,16,0")
    return values  # type: ignore[return-value]


def _add_sampler(p: argparse.ArgumentParser) -> None:
    stochastic = ", ".join(n for n in SAMPLERS if n in STOCHASTIC_SAMPLERS)
    p.add_argument(
        "--sampler",
        default=None,
        choices=list(SAMPLERS),
        help=f"{', '.join(SAMPLERS)} (default: the model's); {stochastic} add fresh noise every step, "
        "drawn from each image's seed",
    )


def _add_sampling(p: argparse.ArgumentParser) -> None:
    """The settings generate and edit share."""
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler run (default: all)")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    add_preview_options(p)
    p.add_argument(
        "--variation-strength",
        type=float,
        default=None,
        metavar="S",
        help="variation seeds (A1111's): every image keeps --seed and blends its noise with that of "
        "variation seed V+i by S (0-1; 0.1-0.3: small variations of one picture)",
    )
    p.add_argument(
        "--variation-seed",
        type=int,
        default=None,
        metavar="V",
        help="the first variation seed, with --variation-strength (default: random)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", "--cfg", type=float, default=None, dest="guidance")
    add_guidance_options(p)
    _add_sampler(p)
    p.add_argument(
        "--schedule",
        default=None,
        help=f"{', '.join(SCHEDULES)} (default: the model's)",
    )
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--prompt-weights",
        action="store_true",
        help="read A1111's weights in the prompt and negative prompt: (words:1.5), (words) = "
        "1.1, [words] = 1/1.1, nesting multiplies; \\( \\) are brackets (default: brackets are text)",
    )
    p.add_argument(
        "--prompt-editing",
        action="store_true",
        help="A1111's prompt editing too (implies --prompt-weights): [from:to:when] reads from until step "
        "when (below 1: a share of the steps) and to after it, [to:when] adds, [from::when] drops, [a|b] "
        "alternates every step",
    )
    p.add_argument(
        "--composable",
        action="store_true",
        help="A1111's composable diffusion: the prompt's parts joined by AND, each with an optional :weight "
        "('a red circle AND a blue square:0.8'), each one transformer pass a step, guided together",
    )
    p.add_argument("-o", "--out", default="outputs", help="output folder (default: outputs)")
    _add_cache_threshold(p)
    _add_vae_tiling(p)
    _add_denoise_tiling(p)


def _add_cache_threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        metavar="X",
        help="first-block cache: skip the transformer's later blocks on steps where its first block changed "
        "by at most X (0.05-0.2: fewer full passes, small changes to the picture; default: off)",
    )


def _add_vae_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vae-tile",
        type=int,
        default=None,
        metavar="PX",
        help="decode (and encode) through the autoencoder in tiles of PX pixels: less memory for large "
        "images; each tile is normalized on its own, so colours can shift a little between tiles "
        "(default: whole)",
    )
    p.add_argument(
        "--vae-tile-overlap",
        type=int,
        default=None,
        metavar="PX",
        help="pixels tiles blend over (default: tile/4)",
    )


def _add_denoise_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--denoise-tile",
        type=int,
        default=None,
        metavar="PX",
        help="run the transformer over windows of PX pixels a side at each step and blend them "
        "(MultiDiffusion, A1111's Tiled Diffusion): less memory for large images (faster only at very "
        "large sizes); it applies to every pass, but windows do not coordinate a composition, so it is for "
        "refining (edits, --hires's second pass); a pass no larger than one window runs whole (default: "
        "whole)",
    )
    p.add_argument(
        "--denoise-tile-overlap",
        type=int,
        default=None,
        metavar="PX",
        help="pixels windows blend over (default: tile/4)",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="bundle folder, local bundle name, preset, or 'default' (default)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def _lora_spec(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            if not Path(text).exists():  # else a file whose name holds a colon
                raise argparse.ArgumentTypeError(
                    f"{text}: the scale after ':' must be a number, got '{scale}' (FILE or FILE:SCALE)"
                ) from None
    return text, 1.0


def _add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        type=_lora_spec,
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (pictor, diffusers/PEFT or kohya .safetensors); repeatable",
    )


def _add_layout_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layout-adapter",
        default=None,
        metavar="FILE",
        help="layout adapter (.safetensors from `pictor train layout`); "
        "default: the bundle's layout.safetensors",
    )


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layout",
        default=None,
        metavar="FILE|JSON",
        help='boxes with phrases, e.g. \'[{"box": [0.05, 0.3, 0.45, 0.7], "phrase": "a red circle"}]\' '
        "(fractions of the image; y grows downward); needs a layout adapter",
    )
    _add_layout_adapter(p)
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


def _add_reference_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference-adapter",
        default=None,
        metavar="FILE",
        help="reference adapter (.safetensors from `pictor train reference`); "
        "default: the bundle's reference.safetensors",
    )


def _add_reference(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference",
        default=None,
        metavar="IMAGE",
        help="an image prompt: a picture whose content the images take (fitted to the image size; an "
        "empty prompt leaves it all to the picture); needs a reference adapter",
    )
    _add_reference_adapter(p)


def _add_context(p: argparse.ArgumentParser) -> None:
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


def _add_control(p: argparse.ArgumentParser) -> None:
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


def _add_controlnet_models(p: argparse.ArgumentParser) -> None:
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


def _add_controlnets(p: argparse.ArgumentParser) -> None:
    _add_controlnet_models(p)
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


def _add_redux_model(p: argparse.ArgumentParser) -> None:
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


def _add_redux(p: argparse.ArgumentParser) -> None:
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
    _add_redux_model(p)


def _add_ip_adapter_model(p: argparse.ArgumentParser) -> None:
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


def _add_ip_adapter(p: argparse.ArgumentParser) -> None:
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
    _add_ip_adapter_model(p)


def _add_prompt_variants(p: argparse.ArgumentParser) -> None:
    """generate's prompt files and variants (`pictor.prompt_variants`)."""
    p.add_argument(
        "--from-file",
        default=None,
        metavar="FILE",
        help="one prompt per line instead of PROMPT (blank and # lines skipped); each runs with the other "
        "options",
    )
    p.add_argument(
        "--variants",
        default=None,
        choices=("random", "all"),
        help="read {a|b} and __wildcard__ in the prompts: random: each image draws its own variant from its "
        "seed; all: every combination, -n images each (default: off, prompts as written)",
    )
    p.add_argument(
        "--wildcards",
        default=None,
        metavar="DIR",
        help="with --variants: the folder of the wildcard files (__colours__ is one line of DIR/colours.txt)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pictor", description="pictor: text-to-image generation")
    parser.add_argument("--version", action="version", version=f"pictor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (or --from-file, or --settings-from)")
    g.add_argument(
        "--settings-from",
        default=None,
        metavar="IMAGE",
        help="take the prompt and settings of IMAGE (its pictor record, or A1111's parameters text of A1111, "
        "Forge, ComfyUI...; A1111's send to txt2img) for every option not given here",
    )
    _add_model(g)
    _add_lora(g)
    _add_sampling(g)
    _add_layout(g)
    _add_reference(g)
    _add_context(g)
    _add_control(g)
    _add_controlnets(g)
    _add_redux(g)
    _add_ip_adapter(g)
    g.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT")
    g.add_argument(
        "--seed-resize-from",
        type=_size,
        default=None,
        metavar="WxH",
        help="draw each image's noise as for a WxH image and centre it (A1111's resize seed from): the "
        "composition of a seed at WxH carries over to a nearby --size",
    )
    g.add_argument(
        "--hires",
        type=float,
        default=None,
        metavar="SCALE",
        help="hires fix: generate at --size, upscale by SCALE (e.g. 2) and redraw details at that size",
    )
    g.add_argument(
        "--hires-strength",
        type=float,
        default=None,
        help="share of the upscaled picture redrawn (default 0.3)",
    )
    g.add_argument(
        "--hires-steps", type=int, default=None, help="steps of the second pass (default: --steps)"
    )
    g.add_argument(
        "--hires-upscaler",
        default=None,
        metavar="FILE",
        help="enlarge the first pass with this upscale model (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... as "
        ".safetensors) instead of Lanczos",
    )
    g.add_argument(
        "--best-of",
        type=int,
        default=None,
        metavar="N",
        help="generate N candidates (seeds seed..seed+N-1), save all best first with their scores",
    )
    g.add_argument("--scorer", default=None, help="scorer for --best-of (default: shapes)")
    _add_prompt_variants(g)

    ed = sub.add_parser("edit", help="img2img, inpainting (--mask) or outpainting (--expand) of an image")
    ed.add_argument(
        "image", help="the source image, or a folder: each picture directly in it is edited (a batch)"
    )
    ed.add_argument("prompt")
    _add_model(ed)
    _add_lora(ed)
    _add_sampling(ed)
    _add_layout(ed)
    _add_reference(ed)
    _add_context(ed)
    _add_control(ed)
    _add_controlnets(ed)
    _add_redux(ed)
    _add_ip_adapter(ed)
    ed.add_argument(
        "--mask",
        default=None,
        help="white = repaint, black = keep; the image's size or its aspect ratio (resized to fit); for a "
        "folder of pictures, one mask for all or a folder with the mask of each picture's name",
    )
    ed.add_argument(
        "--strength",
        type=float,
        default=None,
        help="0 keeps the image, 1 ignores it (default: 0.75 for img2img, 0.3 with --upscale, 1 with a mask "
        "(with --upscale too) or --expand)",
    )
    ed.add_argument(
        "--upscale",
        type=float,
        default=None,
        metavar="SCALE",
        help="enlarge the image (and mask) by SCALE (above 1, at most 4; rounded up to the model's pixel "
        "multiple) and redraw its details at that size (A1111's SD upscale); add --denoise-tile and "
        "--vae-tile for large results",
    )
    ed.add_argument(
        "--upscaler",
        default=None,
        metavar="FILE",
        help="enlarge with this upscale model (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... as .safetensors) "
        "instead of Lanczos",
    )
    ed.add_argument(
        "--expand", type=_expand, default=None, metavar="L,T,R,B", help="grow the canvas by these pixels"
    )
    ed.add_argument("--fill", default=None, help="how --expand's new area starts: edge (default), noise")
    ed.add_argument(
        "--feather", type=int, default=None, help="pixels of blending inside the mask edge (default: 2)"
    )
    ed.add_argument(
        "--inpaint-area",
        choices=("whole", "masked"),
        default=None,
        help="with --mask: 'whole' repaints on the whole image (default); 'masked' cuts out the mask's "
        "box, draws it at the model's own resolution and blends it back (A1111's 'Only masked'): for small "
        "areas of large images",
    )
    ed.add_argument(
        "--mask-padding",
        type=int,
        default=None,
        metavar="PX",
        help="--inpaint-area masked: pixels of context around the mask's box (default 32)",
    )
    ed.add_argument(
        "--inpaint-size",
        type=_size,
        default=None,
        metavar="WxH",
        help="--inpaint-area masked: the size the area is drawn at (default: the model's default number "
        "of pixels, in the box's aspect ratio)",
    )

    r = sub.add_parser("reproduce", help="regenerate an image from its own metadata")
    r.add_argument("image")
    _add_model(r)
    _add_lora(r)
    _add_layout_adapter(r)
    r.add_argument("--reference", default=None, help="for an image made from a reference: that picture")
    _add_reference_adapter(r)
    r.add_argument(
        "--source",
        default=None,
        help="for an edit: the image it was made from; for an upscale of a picture pictor did not make: "
        "that picture",
    )
    r.add_argument(
        "--upscaler",
        default=None,
        metavar="FILE",
        help="for an upscaled image (`pictor upscale`): its upscale model, if not where its record says",
    )
    r.add_argument(
        "--hires-upscaler",
        default=None,
        metavar="FILE",
        help="for a hires image enlarged by an upscale model: that file, if not at the path its record names",
    )
    r.add_argument(
        "--source-upscaler",
        default=None,
        metavar="FILE",
        help="for an upscaling edit (pictor edit --upscale) whose source an upscale model enlarged: that "
        "file, if not at the path its record names",
    )
    r.add_argument(
        "--context", default=None, metavar="IMAGE", help="for a FLUX.1 Kontext image: its context image"
    )
    r.add_argument(
        "--control",
        default=None,
        metavar="IMAGE",
        help="for a FLUX.1 Canny / Depth image: its control picture",
    )
    r.add_argument("--redux", default=None, metavar="IMAGE", help="for a FLUX.1 Redux image: its picture")
    _add_redux_model(r)
    r.add_argument("--ip-adapter", default=None, metavar="IMAGE", help="for an IP-Adapter image: its picture")
    _add_ip_adapter_model(r)
    _add_controlnet_models(r)
    r.add_argument("--mask", default=None, help="for an inpaint/outpaint edit with a mask: that mask")
    r.add_argument("-o", "--out", default="outputs")

    i = sub.add_parser("info", help="show an image's provenance or a model's config")
    i.add_argument("target", help="a PNG, a bundle folder, a preset name, a LoRA or a GGUF file")
    i.add_argument("--json", action="store_true", help="print JSON only")

    sub.add_parser("models", help="list presets and local bundles")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="suite", required=True)
    es = esub.add_parser("shapes", help="exact prompt adherence on the shapes world (SHAPES.md)")
    _add_model(es)
    _add_lora(es)
    es.add_argument("--prompts", default=None, help="JSONL benchmark file (default: packaged shapes-dev)")
    es.add_argument("--images-per-prompt", "-k", type=int, default=4)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--steps", type=int, default=None)
    es.add_argument("--guidance", type=float, default=None)
    _add_sampler(es)
    _add_cache_threshold(es)
    es.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    es.add_argument("--out", default=None, help="report.json (a contact sheet .png is written beside it)")
    es.add_argument("--ground-truth", action="store_true", help="score renders of the specs themselves")
    es.add_argument(
        "--through-autoencoder",
        action="store_true",
        help="with --ground-truth: score the renders after an encode/decode by the model's autoencoder",
    )
    es.add_argument(
        "--save-images",
        default=None,
        metavar="DIR",
        help="also write every image to DIR (new or image-free), e.g. for `pictor eval distribution`",
    )
    es.add_argument(
        "--layouts",
        action="store_true",
        help="condition each image on the boxes of a ground-truth scene of its prompt (needs a layout "
        "adapter); the report adds the fraction of boxes that hold their object",
    )
    _add_layout_adapter(es)
    es.add_argument(
        "--references",
        action="store_true",
        help="give each image the ground-truth render of its prompt that --ground-truth would score as "
        "its reference picture (needs a reference adapter)",
    )
    es.add_argument(
        "--empty-prompts",
        action="store_true",
        help='generate from the prompt "" (the specs still score the images): with --references, what '
        "the pictures alone carry",
    )
    _add_reference_adapter(es)

    ed = esub.add_parser(
        "distribution",
        help="FD, KID, precision and recall between two image folders (generated vs real)",
    )
    ed.add_argument("real", help="folder of reference images (searched recursively)")
    ed.add_argument("fake", help="folder of generated images")
    ed.add_argument(
        "--features",
        default="shapes",
        help="shapes (no weights; the shapes world), clip:PATH or dinov2:PATH (local model folder)",
    )
    ed.add_argument("--device", default="cpu", help="where the feature model runs (cpu, cuda, ...)")
    ed.add_argument("--batch-size", type=int, default=32)
    ed.add_argument("--kid-subsets", type=int, default=100)
    ed.add_argument("--kid-subset-size", type=int, default=1000)
    ed.add_argument("--nearest-k", type=int, default=3, help="k of the precision/recall manifolds")
    ed.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    ed.add_argument("--out", default=None, help="report.json")

    ec = esub.add_parser(
        "clip-score",
        help="CLIP score of each image against the prompt it was made from (its record, A1111 text or "
        "caption)",
    )
    ec.add_argument("folder", help="folder of images (searched recursively)")
    ec.add_argument("--clip", required=True, metavar="DIR", help="a local CLIPModel folder (safetensors)")
    ec.add_argument("--device", default="cpu", help="where CLIP runs (cpu, cuda, ...)")
    ec.add_argument("--batch-size", type=int, default=32)
    ec.add_argument("--out", default=None, help="report.json (the mean, and each image's score)")

    c = sub.add_parser("convert", help="make a pictor bundle from other formats")
    csub = c.add_subparsers(dest="format", required=True)
    cf = csub.add_parser("flux", help="FLUX.1 original single files (or a GGUF transformer) -> bundle")
    cf.add_argument(
        "--transformer",
        required=True,
        help="flux1-dev.safetensors or flux1-schnell.safetensors, or a GGUF file of one (e.g. "
        "flux1-dev-Q4_K_S.gguf): its quantized layers stay quantized in memory",
    )
    cf.add_argument("--ae", required=True, help="ae.safetensors")
    cf.add_argument("--t5", required=True, help="local folder of a T5 encoder (save_pretrained layout)")
    cf.add_argument("--clip", required=True, help="local folder of a CLIP text model")
    cf.add_argument("--out", required=True)
    cf.add_argument("--name", default=None)
    cf.add_argument(
        "--kontext",
        action="store_true",
        help="the transformer is FLUX.1 Kontext [dev] (flux1-kontext-dev.safetensors): the bundle edits a "
        "--context image by instruction",
    )
    cf.add_argument(
        "--control",
        choices=("canny", "depth"),
        default=None,
        help="for FLUX.1 Canny / Depth [dev] (known by their input width): which control pictures the "
        "transformer reads; default: read off the file's name (flux1-canny-dev, flux1-depth-dev)",
    )
    cd = csub.add_parser(
        "dtype", help="a bundle with its weights stored in another dtype (fp16 halves an fp32 bundle)"
    )
    cd.add_argument("bundle", help="the bundle folder to read")
    cd.add_argument(
        "--dtype",
        required=True,
        choices=("fp16", "bf16", "fp32", "fp8", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
        help="storage dtype; fp8: the transformer blocks' linear weights in float8 e4m3fn, kept FP8 in "
        "memory and cast per layer as it runs (half of bf16's memory), the rest as stored; q8_0 ... q4_0: "
        "those weights in a GGML block format (8.5 to 4.5 bits a weight), dequantized per layer as it runs. "
        "A GGUF-imported bundle given fp16/bf16/fp32 is widened (dequantized)",
    )
    cd.add_argument("--out", required=True, help="the new bundle folder (may be the same folder)")
    cgg = csub.add_parser(
        "gguf",
        help="a bundle's transformer as a GGUF file (FLUX.1 layout), for ComfyUI-GGUF and llama.cpp's tools",
    )
    cgg.add_argument("bundle", help="the bundle folder to read")
    cgg.add_argument("--out", required=True, help="the .gguf file to write")
    cgg.add_argument(
        "--dtype",
        default=None,
        choices=("q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
        help="quantize the blocks' linear weights on the way (default: keep the bundle's storage)",
    )
    cg = csub.add_parser(
        "defaults",
        help="show or set a bundle's generation defaults (config.json only; weights and hashes untouched)",
    )
    cg.add_argument("bundle", help="the bundle folder (changed in place)")
    cg.add_argument("--width", type=int, default=None)
    cg.add_argument("--height", type=int, default=None)
    cg.add_argument("--steps", type=int, default=None)
    cg.add_argument("--guidance", type=float, default=None)
    _add_sampler(cg)
    cg.add_argument("--schedule", default=None)
    train_command.add_train_parser(sub)
    _add_lora_parser(sub)
    add_merge_parser(sub)
    add_preprocess_parser(sub)
    add_caption_parser(sub)
    add_upscale_parser(sub)
    add_grid_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_lora_parser(sub: Any) -> None:
    lo = sub.add_parser(
        "lora",
        help="extract a LoRA from two models, resize one, write it for other tools, or merge it into a model",
    )
    lsub = lo.add_subparsers(dest="lora_cmd", required=True)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format",
            choices=["pictor", "kohya", "diffusers"],
            default="pictor",
            help="key layout: pictor's, kohya's (ComfyUI, Forge, A1111) or diffusers' (default: pictor)",
        )
        p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")

    def ranks(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rank", type=int, required=True, help="the rank of each layer (at most)")
        p.add_argument(
            "--energy",
            type=float,
            default=None,
            help="per layer, the fewest singular values that keep this fraction of the update's squared "
            "norm, e.g. 0.99 (at most --rank)",
        )

    ex = lsub.add_parser("extract", help="a LoRA that turns --base into --tuned (SVD of what changed)")
    ex.add_argument("--base", required=True, help="the model before fine-tuning (bundle or name)")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model (bundle or name)")
    ex.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster at FLUX.1 size)")
    ranks(ex)
    outputs(ex)
    rs = lsub.add_parser("resize", help="a LoRA cut to a lower rank (the best one, by SVD)")
    rs.add_argument("lora", help="a LoRA file in any layout pictor reads")
    rs.add_argument(
        "--model", "-m", default=None, help="the model it is for (default: default); presets work"
    )
    ranks(rs)
    outputs(rs)
    cv = lsub.add_parser("convert", help="a LoRA file in another key layout")
    cv.add_argument("lora", help="a LoRA file in any layout pictor reads")
    cv.add_argument(
        "--model", "-m", default=None, help="the model it is for (default: default); presets work"
    )
    outputs(cv)
    mg = lsub.add_parser(
        "merge", help="a model bundle with LoRAs merged into its weights (no LoRA needed to generate)"
    )
    mg.add_argument("--model", "-m", default=None, help="the trained bundle to merge into (default: default)")
    _add_lora(mg)
    mg.add_argument("--name", default=None, help="the new bundle's name (default: model+lora names)")
    mg.add_argument("--out", required=True, help="the new bundle folder (may be the model's own)")
    mg.add_argument(
        "--control",
        choices=["canny", "depth"],
        default=None,
        help="for BFL's Canny/Depth LoRA whose file name says neither: the kind of control picture the "
        "merged model reads (default: from the name, e.g. flux1-canny-dev-lora)",
    )
    mg.add_argument(
        "--keep-defaults",
        action="store_true",
        help="with BFL's Canny/Depth LoRA: keep the base's steps and guidance (default: flux-canny-dev's "
        "50 / 30, flux-depth-dev's 30 / 10)",
    )


def _add_serve_parser(sub: Any) -> None:
    from pictor.serve.settings import Limits

    s = sub.add_parser("serve", help="HTTP API (OpenAI Images compatible), job queue, history and web page")
    _add_model(s)
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need --api-key)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (env: PICTOR_API_KEY)"
    )
    s.add_argument("--data-dir", default=None, help="history and images (default: ~/.pictor/serve)")
    s.add_argument("--queue-size", type=int, default=32, help="jobs that may wait; more get 429")
    s.add_argument("--max-batch", type=int, default=4, help="images per sampler run, merging equal requests")
    s.add_argument("--job-timeout", type=float, default=600.0, help="seconds a job may run")
    s.add_argument("--max-attempts", type=int, default=3, help="runs cut short by crashes before a job fails")
    s.add_argument(
        "--load-retry",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="after the model failed to load, refuse jobs (503) this long, then load it again for the next "
        "job (default 60)",
    )
    s.add_argument("--block-words", default=None, help="file of blocked prompt words, one per line")
    s.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="width*height limit")
    s.add_argument("--max-steps", type=int, default=Limits.max_steps)
    s.add_argument("--max-images", type=int, default=Limits.max_images, help="n limit per request")
    _add_vae_tiling(s)
    s.add_argument(
        "--lora-dir", default=None, help="folder of LoRA files requests may choose by name (loras)"
    )
    _add_redux_model(s)  # FLUX.1 Redux for requests with redux_image, and for variations
    _add_ip_adapter_model(s)  # XLabs' FLUX.1 IP-Adapter for requests with ip_adapter_image
    s.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="MODEL",
        help="a FLUX.1 ControlNet (InstantX, Union or XLabs: a diffusers folder or a .safetensors file) "
        "loaded with the model; repeat for several (at most 4). Every request then gives one picture per "
        "ControlNet, in this order (controlnet_images)",
    )
    s.add_argument(
        "--upscaler",
        default=None,
        metavar="FILE",
        help="an upscale model (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... as .safetensors) loaded with the "
        "model: POST /v1/images/upscale runs it, and generations may name it as their hires_upscaler",
    )
    s.add_argument(
        "--previews",
        choices=["approx", "full", "off"],
        default="approx",
        help="live previews of running jobs (GET /v1/jobs/ID/preview, the page): approx (a linear map of "
        "the latents, nearly free), full (the autoencoder decodes every step: exact, a decode per step) "
        "or off (default approx)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
