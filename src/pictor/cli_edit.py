"""`pictor edit IMAGE PROMPT`: img2img, inpainting (--mask), outpainting (--expand) and upscaling edits
(--upscale), of one image or a folder of them: parser and run. The edits themselves are
:mod:`pictor.editing`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pictor.cli_conditioning_options import (
    add_context,
    add_control,
    add_controlnets,
    add_ip_adapter,
    add_layout,
    add_redux,
    add_reference,
)
from pictor.cli_options import add_lora, add_model, add_sampling, parse_size
from pictor.cli_output import output_folder, progress_bar, save_images
from pictor.cli_pipeline import load_pipeline, sampling_settings
from pictor.cli_preview import preview_writer


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


def add_edit_parser(sub: Any) -> None:
    """`pictor edit` and its arguments (generate's sampling and conditioning options among them)."""
    ed = sub.add_parser("edit", help="img2img, inpainting (--mask) or outpainting (--expand) of an image")
    ed.add_argument(
        "image", help="the source image, or a folder: each picture directly in it is edited (a batch)"
    )
    ed.add_argument("prompt")
    add_model(ed)
    add_lora(ed)
    add_sampling(ed)
    add_layout(ed)
    add_reference(ed)
    add_context(ed)
    add_control(ed)
    add_controlnets(ed)
    add_redux(ed)
    add_ip_adapter(ed)
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
        type=parse_size,
        default=None,
        metavar="WxH",
        help="--inpaint-area masked: the size the area is drawn at (default: the model's default number "
        "of pixels, in the box's aspect ratio)",
    )


def cmd_edit(args: argparse.Namespace) -> int:
    from pictor.editing import DEFAULT_FEATHER, EditRequest

    # Options that shape only an expanded or masked area: without one they would change nothing.
    if args.fill is not None and args.expand is None:
        raise ValueError("--fill sets how --expand's new area starts; add --expand L,T,R,B or drop --fill")
    if args.feather is not None and args.mask is None:  # an expanded area is always wholly new
        raise ValueError("--feather blends the edge of a --mask; add --mask or drop --feather")
    if args.upscaler and args.upscaler.lower() == "lanczos":
        args.upscaler = None  # the default: no file to load
    if args.upscaler and args.upscale is None:
        raise ValueError("--upscaler enlarges the image for --upscale; add --upscale SCALE (e.g. 2)")
    if args.upscale is not None and args.expand is not None:
        raise ValueError(
            "--upscale and --expand do not go together: outpaint first, then upscale the result in a "
            "second edit"
        )
    if (args.mask_padding is not None or args.inpaint_size) and args.inpaint_area != "masked":
        raise ValueError("--mask-padding and --inpaint-size shape --inpaint-area masked; add it or drop them")
    from pictor.picture_files import masks_for, pictures_in

    # A folder is a batch (A1111's img2img batch): every picture directly in it, each with the mask of its
    # name from a --mask folder; all checked before the model loads or anything is written.
    batch = Path(args.image).is_dir()
    if args.mask is not None and Path(args.mask).is_dir() and not batch:
        raise ValueError("--mask is a folder of masks for a folder of pictures; give the one mask file")
    sources = pictures_in([args.image])
    masks = masks_for(sources, args.mask)
    previews = preview_writer(args)
    output_folder(args.out)
    pipe = load_pipeline(args)
    if args.upscaler:
        pipe.set_upscaler(args.upscaler)
    settings = sampling_settings(args)
    if batch and settings["seed"] is None:  # one random seed for the batch, as for --from-file
        import secrets

        settings["seed"] = secrets.randbelow(2**32)
    if batch and settings["variation_strength"] and settings["variation_seed"] is None:
        import secrets

        settings["variation_seed"] = secrets.randbelow(2**32)  # likewise one variation seed for all
    requests = [
        EditRequest(
            image=source,
            prompt=args.prompt,
            mask=mask,
            strength=args.strength,
            expand=args.expand,
            fill=args.fill or "edge",
            feather=DEFAULT_FEATHER if args.feather is None else args.feather,
            upscale=args.upscale,
            upscaler=pipe.upscaler.name if pipe.upscaler else None,
            inpaint_area=args.inpaint_area or "whole",
            mask_padding=args.mask_padding,
            inpaint_size=args.inpaint_size,
            **settings,
        )
        for source, mask in zip(sources, masks, strict=True)
    ]
    if batch:  # a bad picture or mask is found before any is edited
        for request in requests:
            try:
                pipe.resolve_edit(request)
            except ValueError as exc:
                raise ValueError(f"{Path(str(request.image)).name}: {exc}") from None
    for k, request in enumerate(requests, 1):
        if batch:
            print(f"picture {k}/{len(requests)}: {request.image}", file=sys.stderr)
        images = pipe.edit(request, progress=progress_bar(request.mode), previews=previews)
        labels = [Path(str(request.image)).stem] * len(images) if batch else None
        for path in save_images(images, args.out, labels):
            print(path)
    return 0
