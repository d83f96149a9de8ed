"""The command line's grammar: the `pictor` parser with every subcommand, in the order `pictor --help` lists
them, and the arguments of `pictor generate` and `pictor lora`. The other commands add their own, each
from its module (:mod:`pictor.cli_edit`, :mod:`pictor.cli_eval`, ...; `pictor train` from
:mod:`pictor.train.command_flags`); :mod:`pictor.cli` runs what is parsed here."""

from __future__ import annotations

import argparse
from typing import Any

from pictor import __version__
from pictor.cli_caption import add_caption_parser
from pictor.cli_conditioning_options import (
    add_context,
    add_control,
    add_controlnets,
    add_ip_adapter,
    add_layout,
    add_redux,
    add_reference,
)
from pictor.cli_convert import add_convert_parser
from pictor.cli_edit import add_edit_parser
from pictor.cli_eval import add_eval_parser
from pictor.cli_grid import add_grid_parser
from pictor.cli_merge import add_merge_parser
from pictor.cli_options import add_lora, add_model, add_sampling, parse_size
from pictor.cli_preprocess import add_preprocess_parser
from pictor.cli_reproduce import add_reproduce_parser
from pictor.cli_serve import add_serve_parser
from pictor.cli_upscale import add_upscale_parser
from pictor.train.command_flags import add_train_parser


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
    add_model(g)
    add_lora(g)
    add_sampling(g)
    add_layout(g)
    add_reference(g)
    add_context(g)
    add_control(g)
    add_controlnets(g)
    add_redux(g)
    add_ip_adapter(g)
    g.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT")
    g.add_argument(
        "--seed-resize-from",
        type=parse_size,
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

    add_edit_parser(sub)
    add_reproduce_parser(sub)

    i = sub.add_parser("info", help="show an image's provenance or a model's config")
    i.add_argument("target", help="a PNG, a bundle folder, a preset name, a LoRA or a GGUF file")
    i.add_argument("--json", action="store_true", help="print JSON only")

    sub.add_parser("models", help="list presets and local bundles")

    add_eval_parser(sub)
    add_convert_parser(sub)
    add_train_parser(sub)
    _add_lora_parser(sub)
    add_merge_parser(sub)
    add_preprocess_parser(sub)
    add_caption_parser(sub)
    add_upscale_parser(sub)
    add_grid_parser(sub)
    add_serve_parser(sub)
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
    add_lora(mg)
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
