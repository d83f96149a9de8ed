"""`pictor upscale PICTURE... --upscaler FILE`: enlarge pictures with an ESRGAN / Real-ESRGAN upscale model,
as A1111's Extras tab and ComfyUI's "Upscale Image (using Model)" do; and `pictor reproduce` of what it wrote.

An upscale of an image pictor generated keeps that image's record, with the upscale added (and A1111's
"Postprocess upscale by / upscaler" in chunks of their own, as its Extras tab writes); `pictor reproduce`
then generates the image again and upscales it with the recorded file (its SHA-256 checked). An upscale of
any other picture records the picture's pixel hash instead, and its reproduction takes it as `--source`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from pictor.upscaling import DEFAULT_OVERLAP, DEFAULT_TILE


def add_upscale_parser(sub: Any) -> None:
    u = sub.add_parser(
        "upscale", help="enlarge pictures with an ESRGAN / Real-ESRGAN upscale model (.safetensors)"
    )
    u.add_argument(
        "pictures",
        nargs="+",
        metavar="PICTURE",
        help="picture files, or folders: every picture directly in one",
    )
    u.add_argument(
        "--upscaler",
        required=True,
        metavar="FILE",
        help="an upscale model: ESRGAN-family RRDBNets (ESRGAN, BSRGAN, Real-ESRGAN x4plus/x2plus, "
        "4x-UltraSharp, ...) or Real-ESRGAN's compact nets, as .safetensors",
    )
    u.add_argument(
        "--scale",
        type=float,
        default=None,
        help="the factor (default: the model's own); a smaller one is reached by Lanczos after the model, a "
        "larger one by running the model again",
    )
    u.add_argument("--tile", type=int, default=DEFAULT_TILE, help="input pixels per tile side (memory)")
    u.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="context pixels around each tile")
    u.add_argument("-o", "--out", default="outputs", help="the folder for the upscaled PNGs")
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _open_picture(path: str) -> tuple[Image.Image, dict[str, Any] | None]:
    """The picture and its pictor record, if it has a usable one (any other picture is upscaled alone)."""
    from pictor.editing import EditError, load_image
    from pictor.provenance import ProvenanceError, read_record

    try:
        image = load_image(path, "picture")
    except EditError as exc:
        raise ValueError(str(exc)) from exc
    from pictor.record_checks import check_record

    try:
        record: dict[str, Any] | None = read_record(path)
        check_record(record)
    except ProvenanceError as exc:
        if "no pictor record" not in str(exc):  # a damaged one: the picture is upscaled as any other
            print(
                f"pictor upscale: warning: {exc}; upscaling {path} as a picture without a record",
                file=sys.stderr,
            )
        record = None
    return image, record


def _expand(paths: list[str]) -> list[str]:
    """The pictures to upscale (`pictor.picture_files.pictures_in`)."""
    from pictor.picture_files import pictures_in

    return pictures_in(paths)


def _picture_size(path: str) -> tuple[int, int]:
    """The picture's size from its header, so that every picture is checked before the first is decoded."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ValueError(f"{path}: no such picture") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable picture ({exc})") from None


def _target(out: Path, picture: str, scale: float, taken: set[Path]) -> Path:
    """STEM-xSCALE.png in `out`, numbered (STEM-xSCALE-1.png, ...) past files already there and names this
    run gives: an upscale never overwrites an earlier one (another model, another picture of that name)."""
    base = f"{Path(picture).stem}-x{scale:g}"
    target, n = out / f"{base}.png", 0
    while target in taken or target.exists():
        n += 1
        target = out / f"{base}-{n}.png"
    taken.add(target)
    return target


def cmd_upscale(args: argparse.Namespace) -> int:
    from pictor import __version__
    from pictor.provenance import save_png
    from pictor.upscaler_files import load_upscaler
    from pictor.upscaling import size_problem, upscale_image, upscale_problem, upscale_record, upscaled_record

    problem = upscale_problem(args.scale, args.tile, args.overlap)
    if problem:
        raise ValueError(problem)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {args.out}: this is a file; give a folder for the upscaled pictures")
    pictures = _expand(args.pictures)
    sizes = {path: _picture_size(path) for path in pictures}  # all readable before any work
    upscaler = load_upscaler(args.upscaler, _device(args.device))
    scale = float(upscaler.scale) if args.scale is None else args.scale
    for path, (width, height) in sizes.items():  # and none too large to write and read back
        problem = size_problem(width, height, scale, upscaler.scale)
        if problem:
            raise ValueError(f"{path}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    taken: set[Path] = set()
    for path in pictures:  # decoded one at a time: a long list never sits in memory at once
        image, record = _open_picture(path)
        enlarged = upscale_image(upscaler, image, scale, args.tile, args.overlap)
        up = upscale_record(upscaler, scale, args.tile, args.overlap)
        up |= {"width": enlarged.width, "height": enlarged.height}
        target = _target(out, path, scale, taken)
        print(save_png(enlarged, upscaled_record(record, image, up, __version__), target))
    return 0


def reproduce_upscale(args: argparse.Namespace, record: dict[str, Any], generate: Any) -> int:
    """`pictor reproduce` of an upscaled picture: its source generated again (`generate(record)` returns the
    GeneratedImage of a generation record) or checked (`--source`), then upscaled as the record says."""
    from pictor.editing import image_info
    from pictor.provenance import ProvenanceError, save_png
    from pictor.reproduce import pixel_report
    from pictor.upscaler_files import load_upscaler
    from pictor.upscaling import picture_pixels, upscale_image, with_alpha

    up = record["upscale"]
    if not isinstance(up, dict) or (
        "prompt" not in record and not isinstance(record.get("source_image"), dict)
    ):
        raise ProvenanceError("the pictor record's upscale is damaged; the image's metadata was edited")
    needed = {"file": str, "sha256": str, "scale": (int, float), "tile": int, "overlap": int}
    for key, kind in needed.items():
        if not isinstance(up.get(key), kind):
            raise ProvenanceError(
                f"the pictor record's upscale has no valid '{key}'; the image's metadata was edited or is "
                "damaged"
            )
    if not args.upscaler and not Path(up["file"]).is_file():
        raise ValueError(
            f"the upscale model this image was made with, {up['file']}, is not there; pass it with "
            "--upscaler FILE"
        )
    upscaler = load_upscaler(args.upscaler or up["file"], _device(args.device))
    if upscaler.sha256 != up["sha256"]:
        raise ValueError(
            f"{upscaler.path} is not the upscale model this image was made with (SHA-256 "
            f"{upscaler.sha256[:10]}, the record says {up['sha256'][:10]}); pass that file with --upscaler"
        )
    extras = up.get("a1111_extras")  # sent by /sdapi/v1/extra-*: the RGB picture, A1111's runs and finish
    if extras is not None and not isinstance(extras, dict):
        raise ProvenanceError("the pictor record's upscale is damaged; the image's metadata was edited")
    if "prompt" in record:
        base = {k: v for k, v in record.items() if k != "upscale"}
        source = generate(base).image
    else:
        if not args.source:
            raise ValueError(
                "this image is an upscale of a picture pictor did not generate; pass it as --source"
            )
        source, _ = _open_picture(args.source)
        if extras is not None:  # A1111's Extras upscale RGB: the job kept (and hashed) the RGB picture
            source = with_alpha(source).convert("RGB")
        want = record.get("source_image", {}).get("sha256")
        if image_info(picture_pixels(source))["sha256"] != want:
            raise ValueError(
                f"--source {args.source} is not the picture this upscale was made from (its pixels' hash "
                "differs from the record's); pass the original picture"
            )
    if extras is None:
        image = upscale_image(upscaler, source, float(up["scale"]), up["tile"], up["overlap"])
    else:
        image = extras_upscale(upscaler, source, up, extras)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(save_png(image, record, Path(args.out) / f"{Path(args.image).stem}-reproduced.png"))
    print(f"pictor reproduce: {pixel_report(args.image, image)}", file=sys.stderr)
    return 0


def extras_upscale(
    upscaler: Any, source: Image.Image, up: dict[str, Any], extras: dict[str, Any]
) -> Image.Image:
    """An Extras upscale (`a1111_extras`) again: the model's runs, then A1111's Lanczos, crop and blend, by
    the functions the server's job runs (`upscale_runs`), so that the pixels are the answered ones."""
    from pictor.provenance import ProvenanceError
    from pictor.serve.a1111_postprocess import MAX_RUNS, finish, model_picture
    from pictor.upscaling import upscale_image

    source = source.convert("RGB")
    runs = extras.get("runs")
    try:
        if runs is None:  # an Extras job from before the runs were recorded: the factor, in one call
            made = upscale_image(upscaler, source, float(up["scale"]), up["tile"], up["overlap"])
        elif isinstance(runs, int) and not isinstance(runs, bool) and 1 <= runs <= MAX_RUNS:
            made = model_picture(upscaler, source, runs, up["tile"], up["overlap"])
        else:
            raise ProvenanceError("the pictor record's upscale has no valid 'a1111_extras' model runs")
        return finish(source, made, extras)[0]
    except (KeyError, TypeError) as exc:  # a hand-edited spec
        raise ProvenanceError(
            f"the pictor record's upscale has damaged 'a1111_extras' ({exc}); the image's metadata was edited"
        ) from None
