"""The option groups that several `pictor` commands share: the model and its LoRAs, the sampling settings
of generate and edit, the sampler, the tiling options and --size's WIDTHxHEIGHT. Separate from
:mod:`pictor.cli_args` so that each command's module adds the same flags with the same help."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pictor.cli_guidance import add_guidance_options
from pictor.cli_preview import add_preview_options
from pictor.sampling import SAMPLERS, SCHEDULES, STOCHASTIC_SAMPLERS

SIZE_RE = re.compile(r"^(\d+)[xX](\d+)$")


def parse_size(text: str) -> tuple[int, int]:
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 64x64; got '{text}'")
    return int(m.group(1)), int(m.group(2))


def add_sampler(p: argparse.ArgumentParser) -> None:
    stochastic = ", ".join(n for n in SAMPLERS if n in STOCHASTIC_SAMPLERS)
    p.add_argument(
        "--sampler",
        default=None,
        choices=list(SAMPLERS),
        help=f"{', '.join(SAMPLERS)} (default: the model's); {stochastic} add fresh noise every step, "
        "drawn from each image's seed",
    )


def add_sampling(p: argparse.ArgumentParser) -> None:
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
    add_sampler(p)
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
    add_cache_threshold(p)
    add_vae_tiling(p)
    add_denoise_tiling(p)


def add_cache_threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        metavar="X",
        help="first-block cache: skip the transformer's later blocks on steps where its first block changed "
        "by at most X (0.05-0.2: fewer full passes, small changes to the picture; default: off)",
    )


def add_vae_tiling(p: argparse.ArgumentParser) -> None:
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


def add_denoise_tiling(p: argparse.ArgumentParser) -> None:
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


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="bundle folder, local bundle name, preset, or 'default' (default)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument(
        "--offload",
        choices=["none", "model", "blocks"],
        default="none",
        help="for models larger than the GPU: keep them in CPU memory and move each onto the GPU only while "
        "it runs ('model'), or also the transformer's blocks one at a time ('blocks'); the same pixels",
    )
    p.add_argument(
        "--blocks-on-device",
        type=_whole_number,
        default=0,
        metavar="N",
        help="with --offload blocks: keep the transformer's first N blocks on the GPU while it runs",
    )


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return value


def offload_settings(args: argparse.Namespace) -> tuple[str | None, int]:
    """--offload and --blocks-on-device as `pictor.load` takes them; a block count without block offload is
    an error that names both flags (before any weights are read)."""
    mode = getattr(args, "offload", "none")
    blocks = getattr(args, "blocks_on_device", 0)
    if blocks and mode != "blocks":
        raise ValueError(
            f"--blocks-on-device {blocks} keeps blocks of --offload blocks on the GPU, but --offload is "
            f"'{mode}'; add --offload blocks or drop --blocks-on-device"
        )
    return (None if mode == "none" else mode), blocks


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


def add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        type=_lora_spec,
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (pictor, diffusers/PEFT or kohya .safetensors); repeatable",
    )
