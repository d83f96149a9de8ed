"""`pictor grid PROMPT --x AXIS=V1,V2,... [--y ...] [--z ...] [generate's options] -o DIR`: an X/Y/Z plot
(A1111's "X/Y/Z plot" script): parser and run. The cells and grids are `pictor.grid_runs`'."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pictor.cli_guidance import DESTS as GUIDANCE_METHOD_DESTS
from pictor.generation_request import GenerationRequest
from pictor.grid_axes import AXES, MAX_CELLS, Axis, GridError, has_hires, parse_axis, plan_grid

# The options of `pictor generate` that a grid takes as they are (argparse dests). Left out: -n, --batch-size
# (one image per cell), --best-of and --scorer (one image per cell), -o (a grid's folder is required).
SHARED = (
    "model",
    "device",
    "lora",
    "seed",
    "variation_seed",
    "variation_strength",
    "seed_resize_from",
    "steps",
    "guidance",
    "sampler",
    "schedule",
    "negative",
    "prompt_weights",
    "prompt_editing",
    "composable",
    "size",
    "cache_threshold",
    "vae_tile",
    "vae_tile_overlap",
    "denoise_tile",
    "denoise_tile_overlap",
    "layout",
    "layout_adapter",
    "regions",
    "regional_attention",
    "regional_steps",
    "regional_double_interval",
    "regional_single_interval",
    "regional_base_ratio",
    "reference",
    "reference_adapter",
    "context",
    "control",
    "canny",
    "canny_thresholds",
    "redux",
    "redux_strength",
    "redux_model",
    "siglip",
    "ip_adapter",
    "ip_adapter_scale",
    "ip_adapter_model",
    "clip_vision",
    "controlnet",
    "controlnet_image",
    "controlnet_scale",
    "controlnet_mode",
    "controlnet_start",
    "controlnet_end",
    "hires",
    "hires_strength",
    "hires_steps",
    "hires_upscaler",
    *GUIDANCE_METHOD_DESTS,
)
# An axis that sets what an option sets: both given, the option would be silently dropped.
_AXIS_OPTIONS = {
    "steps": ("steps", "--steps"),
    "guidance": ("guidance", "--guidance"),
    "sampler": ("sampler", "--sampler"),
    "schedule": ("schedule", "--schedule"),
    "seed": ("seed", "--seed"),
    "variation-seed": ("variation_seed", "--variation-seed"),
    "variation-strength": ("variation_strength", "--variation-strength"),
    "size": ("size", "--size"),
    "negative": ("negative", "--negative"),
    "cache-threshold": ("cache_threshold", "--cache-threshold"),
    "guidance-method": ("guidance_method", "--guidance-method"),
    "guidance-rescale": ("guidance_rescale", "--guidance-rescale"),
    "guidance-start": ("guidance_interval", "--guidance-interval"),
    "guidance-stop": ("guidance_interval", "--guidance-interval"),
    "apg-eta": ("apg_eta", "--apg-eta"),
    "regions-mode": ("regional_attention", "--regional-attention"),
    "controlnet-scale": ("controlnet_scale", "--controlnet-scale"),
    "controlnet-end": ("controlnet_end", "--controlnet-end"),
    "redux-strength": ("redux_strength", "--redux-strength"),
    "ip-adapter-scale": ("ip_adapter_scale", "--ip-adapter-scale"),
    "hires": ("hires", "--hires"),
    "hires-strength": ("hires_strength", "--hires-strength"),
    "hires-steps": ("hires_steps", "--hires-steps"),
    "hires-upscaler": ("hires_upscaler", "--hires-upscaler"),
}


def _axis(text: str) -> Axis:
    try:
        return parse_axis(text)
    except GridError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Once(argparse.Action):
    """An option given at most once: argparse would keep the last --x silently, dropping an axis."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option} is given twice: give each of --x, --y and --z once (one axis each)")
        setattr(namespace, self.dest, values)


def add_grid_parser(sub: Any) -> None:
    """`pictor grid`, with `pictor generate`'s options (call after the generate parser is added)."""
    g = sub.add_parser(
        "grid",
        help="an X/Y/Z plot: one image per combination of axis values, in a labelled grid",
        description="Every cell is the prompt with one value of each axis; all keep one seed unless an axis "
        "is seed. Writes each cell's PNG (with provenance: `pictor reproduce` remakes it), grid.png "
        "(grid-z0.png, ... with --z) and grid.json.",
    )
    g.add_argument("prompt")
    axes = f"axes: {', '.join(AXES)}; e.g. steps=10,20,30 or prompt=red,blue (Prompt S/R)"
    once = {"action": _Once, "type": _axis, "metavar": "AXIS=V1,V2,..."}
    g.add_argument("--x", required=True, help=f"the columns ({axes})", **once)
    g.add_argument("--y", default=None, help="the rows", **once)
    g.add_argument("--z", default=None, help="one grid per value", **once)
    g.add_argument(
        "--max-cells",
        type=int,
        default=MAX_CELLS,
        metavar="N",
        help=f"the most cells a grid may have (default {MAX_CELLS})",
    )
    g.add_argument("-o", "--out", required=True, metavar="DIR", help="a new or empty folder for the grid")
    # generate's own option objects (as argparse's `parents` shares them): the same flags, types and help.
    for action in sub.choices["generate"]._actions:
        if action.dest in SHARED:
            g._add_action(action)
    g.set_defaults(num_images=1, batch_size=None)


def _empty_folder(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"-o {out}: this is a file; give a new or empty folder for the grid")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(
            f"-o {out}: the folder is not empty; give a new or empty one (a grid's files are named by "
            "their place, so another grid's would be overwritten or mixed in)"
        )
    return path


def cmd_grid(
    args: argparse.Namespace,
    load: Callable[[argparse.Namespace], Any],
    settings: Callable[[argparse.Namespace], dict[str, Any]],
    progress: Callable[[str], Any],
) -> int:
    """Run `pictor grid`; `load`, `settings` and `progress` are `pictor.cli`'s, as `pictor generate` uses
    them (the model with its LoRAs and adapters, the request's settings, the progress bar)."""
    from pictor.grid_runs import run_plan, write_cell, write_grid

    axes = [a for a in (args.x, args.y, args.z) if a is not None]
    for a in axes:
        dest, flag = _AXIS_OPTIONS.get(a.name, (None, None))
        if dest is not None and getattr(args, dest) not in (None, ""):
            raise ValueError(
                f"{flag} and the {a.name} axis both set the {a.name}; drop {flag} (the axis sets each cell's)"
            )
    if any(a.name == "lora" for a in axes) and not args.lora:
        raise ValueError("the lora axis sets the scale of the first --lora; add --lora FILE")
    if args.hires_upscaler and not has_hires(args.hires, axes):
        raise ValueError(
            "--hires-upscaler enlarges the first pass of the hires fix; add --hires SCALE or a hires axis "
            "with a scale (e.g. --x hires=1.5,2)"
        )
    # APG's or CFG-Zero*'s options go with a guidance-method axis that names the method in some cells
    args.guidance_method_axis = any(a.name == "guidance-method" for a in axes)
    out = _empty_folder(args.out)
    width, height = args.size or (None, None)
    hires = {
        "hires_scale": args.hires,
        "hires_strength": args.hires_strength,
        "hires_steps": args.hires_steps,
    }
    request = GenerationRequest(prompt=args.prompt, width=width, height=height, **settings(args), **hires)
    plan = plan_grid(request, args.x, args.y, args.z, args.max_cells)  # before the model loads
    pipe = load(args)
    if args.hires_upscaler:
        pipe.set_upscaler(args.hires_upscaler)
        # Requests name the model as the pipeline does (as `pictor generate` writes it); cells without a
        # hires fix (hires=off) have no upscaler to name.
        for cell in plan.cells:
            if cell.request.hires_scale is not None:
                cell.request = replace(cell.request, hires_upscaler=pipe.upscaler.name)

    def saved(cell: Any) -> None:  # the folder is made with the first image: a refusal leaves none
        out.mkdir(parents=True, exist_ok=True)
        print(write_cell(cell, out))

    result = run_plan(pipe, plan, progress=progress("grid"), on_cell=saved)
    for path in write_grid(result, out, cells=False):
        print(path)
    return 0
