"""`pictor convert flux | dtype | gguf | defaults`: bundles from FLUX.1's files, in another storage dtype,
as a GGUF file, or with other generation defaults: parser and run. The conversions are
:mod:`pictor.convert`'s and :mod:`pictor.bundle_defaults`'."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pictor.cli_options import add_sampler

# GGML block formats pictor writes, widest first (pictor.bundle_storage.QUANTIZE_FORMATS; kept here as plain
# names so that building the parser imports no torch): 8.5, 6.5625, 5.5, 6, 5.5, 4.5, 5, 4.5, 3.4375, 2.625
# bits.
_GGML_DTYPES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")


def add_convert_parser(sub: Any) -> None:
    """`pictor convert` and its four formats."""
    c = sub.add_parser("convert", help="make a pictor bundle from other formats")
    csub = c.add_subparsers(dest="format", required=True)
    cf = csub.add_parser(
        "flux", help="FLUX.1 original single files (or a GGUF / bitsandbytes NF4 transformer) -> bundle"
    )
    cf.add_argument(
        "--transformer",
        required=True,
        help="flux1-dev.safetensors or flux1-schnell.safetensors, or a GGUF file of one (e.g. "
        "flux1-dev-Q4_K_S.gguf), or a bitsandbytes 4-bit one (Forge's flux1-dev-bnb-nf4.safetensors, or "
        "diffusers' 4-bit transformer file): its quantized layers stay quantized in memory",
    )
    cf.add_argument(
        "--ae",
        default=None,
        help="ae.safetensors; may be left out when --transformer is an all-in-one file holding the "
        "autoencoder (Forge's flux1-dev-bnb-nf4)",
    )
    cf.add_argument(
        "--t5",
        required=True,
        help="local folder of a T5 encoder (save_pretrained layout), or a T5 encoder GGUF file "
        "(t5-v1_1-xxl-encoder-Q8_0.gguf, as ComfyUI-GGUF uses; its tokenizer is rebuilt from the file)",
    )
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
        choices=("fp16", "bf16", "fp32", "fp8", *_GGML_DTYPES, "nf4", "fp4"),
        help="storage dtype; fp8: the transformer blocks' linear weights in float8 e4m3fn, kept FP8 in "
        "memory and cast per layer as it runs (half of bf16's memory), the rest as stored; q8_0 ... q2_k: "
        "those weights in a GGML block format (8.5 to 2.625 bits a weight; the K-quants q6_k ... q2_k need "
        "rows of a multiple of 256 values, as FLUX.1's have), dequantized per layer as it runs. "
        "nf4 / fp4: those weights in bitsandbytes' 4-bit NF4 / FP4 (its quantizer's values; 4.5 bits a "
        "weight in pictor's rows), kept 4-bit in memory. A GGUF- or NF4-imported bundle given fp16/bf16/fp32 "
        "is widened (dequantized)",
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
        choices=_GGML_DTYPES,
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
    add_sampler(cg)
    cg.add_argument("--schedule", default=None)


def cmd_convert(args: argparse.Namespace) -> int:
    from pictor.bundle_storage import cast_bundle, export_gguf
    from pictor.convert import convert_flux

    if args.format == "defaults":
        from pictor.bundle_defaults import SETTABLE, set_defaults

        before, after = set_defaults(args.bundle, **{k: getattr(args, k) for k in SETTABLE})
        for key in sorted(set(before) | set(after)):
            old, new = before.get(key), after.get(key)
            print(f"{key:<14} {old}" + (f" -> {new}" if new != old else ""))
        return 0
    if args.format == "gguf":
        path = export_gguf(args.bundle, args.out, args.dtype)
        print(f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if args.format == "dtype":
        src = Path(args.bundle)
        before = _folder_bytes(src) if src.is_dir() else 0  # cast_bundle says what is wrong with src
        path = cast_bundle(args.bundle, args.out, args.dtype)
        print(f"{path}  ({args.dtype}: {before / 2**20:.1f} MiB -> {_folder_bytes(path) / 2**20:.1f} MiB)")
        return 0
    path = convert_flux(
        args.transformer,
        args.ae,
        args.t5,
        args.clip,
        args.out,
        name=args.name,
        kontext=args.kontext,
        control=args.control,
    )
    print(path)
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
