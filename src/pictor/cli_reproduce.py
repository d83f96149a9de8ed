"""`pictor reproduce IMAGE`: make an image again from its own record, with the model, LoRAs, adapters,
pictures and upscale models it names (or the flags that stand in for them where they moved): parser and
run. What a record needs is :mod:`pictor.reproduce`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pictor.cli_conditioning_options import (
    add_controlnet_models,
    add_ip_adapter_model,
    add_layout_adapter,
    add_redux_model,
    add_reference_adapter,
)
from pictor.cli_options import add_lora, add_model
from pictor.cli_output import output_folder, progress_bar, save_images
from pictor.cli_pipeline import load_pipeline
from pictor.cli_upscale import reproduce_upscale


def add_reproduce_parser(sub: Any) -> None:
    """`pictor reproduce` and the flags that stand in for files a record names."""
    r = sub.add_parser("reproduce", help="regenerate an image from its own metadata")
    r.add_argument("image")
    add_model(r)
    add_lora(r)
    add_layout_adapter(r)
    r.add_argument("--reference", default=None, help="for an image made from a reference: that picture")
    add_reference_adapter(r)
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
    add_redux_model(r)
    r.add_argument("--ip-adapter", default=None, metavar="IMAGE", help="for an IP-Adapter image: its picture")
    add_ip_adapter_model(r)
    add_controlnet_models(r)
    r.add_argument("--mask", default=None, help="for an inpaint/outpaint edit with a mask: that mask")
    r.add_argument("-o", "--out", default="outputs")


def _recorded_file(record: dict[str, Any], key: str) -> str | None:
    """The path of the adapter a record names, where that file still is."""
    path = (record.get(key) or {}).get("path")
    return path if path and Path(path).is_file() else None


def _recorded_redux(args: argparse.Namespace, record: dict[str, Any]) -> tuple[str, str] | None:
    """The Redux file and SigLIP folder to reproduce with: the flags, else the record's, if still there."""
    if args.redux_model or args.siglip:
        return None  # load_pipeline reads the flags (and says so if one of the two is missing)
    return _recorded_pair(record, "redux", "siglip")


def _recorded_ip_adapter(args: argparse.Namespace, record: dict[str, Any]) -> tuple[str, str] | None:
    """The IP-Adapter file and CLIP folder to reproduce with: the flags, else the record's, if still there."""
    if args.ip_adapter_model or args.clip_vision:
        return None  # load_pipeline reads the flags (and says so if one of the two is missing)
    return _recorded_pair(record, "ip_adapter", "clip")


def _recorded_pair(record: dict[str, Any], key: str, folder: str) -> tuple[str, str] | None:
    """A record's file (`key`'s path) and the folder beside it (`key`'s `folder`), where both still are."""
    entry = record.get(key) if isinstance(record.get(key), dict) else None
    if not entry or not Path(str(entry.get("path"))).is_file() or not Path(str(entry.get(folder))).is_dir():
        return None
    return str(entry["path"]), str(entry[folder])


def _check_upscaler_flags(args: argparse.Namespace, record: Any) -> None:
    """An upscale model file given for a part of the image that used none would be silently unused: refused,
    naming the flag."""
    from pictor.reproduce import recorded_upscaler

    if not isinstance(record, dict):
        return

    def used(key: str) -> bool:  # a pictor upscale's record holds its source's keys beside its own
        entry = record.get(key)
        return isinstance(entry, dict) and entry.get("upscaler", "lanczos") != "lanczos"

    checks = (
        (args.upscaler, "--upscaler", "upscale" in record, "made by pictor upscale"),
        (args.hires_upscaler, "--hires-upscaler", used("hires"), "a hires fix enlarged by an upscale model"),
        (args.source_upscaler, "--source-upscaler", used("source_upscale"), "an upscaling edit by a model"),
    )
    for given, flag, applies, what in checks:
        if given and not applies:
            raise ValueError(f"{flag}: the image is not {what}; drop {flag}")
    recorded_upscaler(record)  # a damaged entry is named before anything loads


def cmd_reproduce(args: argparse.Namespace) -> int:
    from pictor.provenance import read_record
    from pictor.reproduce import pixel_report

    record = read_record(args.image)
    _check_upscaler_flags(args, record)
    output_folder(args.out)
    if isinstance(record, dict) and "upscale" in record:  # `pictor upscale` made it
        return reproduce_upscale(args, record, lambda base: _reproduced(args, base))
    image = _reproduced(args, record)
    for path in save_images([image], args.out):
        print(path)
    print(f"pictor reproduce: {pixel_report(args.image, image.image)}", file=sys.stderr)
    return 0


def _reproduced(args: argparse.Namespace, record: Any) -> Any:
    """The GeneratedImage of a generation or edit record, made again with the files the record or the
    command line names."""
    from pictor.reproduce import check_record, recorded_upscaler, reproduce, upscaler_flag

    check_record(record)
    model = args.model or record["model"].get("ref") or "default"
    # Without --lora, the LoRAs named in the record, from where they were (their hashes are checked).
    loras = args.lora or [(lo["path"], lo["scale"]) for lo in record.get("loras") or []]
    # Likewise the layout adapter named in the record (its hash is checked), unless the bundle has one.
    adapter = args.layout_adapter or _recorded_file(record, "layout_adapter")
    reference = args.reference_adapter or _recorded_file(record, "reference_adapter")
    from pictor.controlnet_requests import recorded_controlnet_paths

    # Without --controlnet, the ControlNets named in the record, from where they were (hashes checked).
    controlnets = args.controlnet or recorded_controlnet_paths(record) or []
    pipe = load_pipeline(
        args,
        model,
        loras,
        adapter,
        reference,
        _recorded_redux(args, record),
        controlnets,
        _recorded_ip_adapter(args, record),
    )
    _, upscaler = recorded_upscaler(record)
    if upscaler is not None:  # from where it was, unless given (its hash is checked)
        flag = upscaler_flag(record)
        given = args.hires_upscaler if flag == "--hires-upscaler" else args.source_upscaler
        if not given and not Path(upscaler["file"]).is_file():
            raise ValueError(f"the upscale model, {upscaler['file']}, is not there; pass it with {flag} FILE")
        pipe.set_upscaler(given or upscaler["file"])
    return reproduce(
        pipe,
        record,
        progress=progress_bar("reproduce"),
        source=args.source,
        mask=args.mask,
        reference=args.reference,
        context=args.context,
        control=args.control,
        redux=args.redux,
        controlnet_images=args.controlnet_image,
        ip_adapter=args.ip_adapter,
    )
