"""`pictor caption FOLDER --model DIR`: caption files for a training folder (`pictor.captioning`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_caption_parser(sub: Any) -> None:
    p = sub.add_parser(
        "caption",
        help="write a caption file beside each picture of a training folder with a local image-captioning "
        "model (BLIP, BLIP-2, GIT...; kohya's make_captions.py)",
    )
    p.add_argument("folder", help="the folder of pictures (searched recursively, as pictor train reads it)")
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a local Hugging Face folder of an image-captioning model (save_pretrained layout, safetensors)",
    )
    p.add_argument("--caption-ext", default=".txt", help="the caption file's extension (.txt)")
    p.add_argument(
        "--overwrite", action="store_true", help="caption pictures that already have a caption too"
    )
    p.add_argument(
        "--prefix", default="", help="text put in front of every caption (a trigger word: 'sks, ')"
    )
    p.add_argument("--prompt", default="", help="text each caption starts from (BLIP: 'a photography of')")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40, help="the longest caption, in tokens (40)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def cmd_caption(args: argparse.Namespace) -> int:
    from pictor.captioning import CaptionError, caption_folder, load_captioner

    ext = args.caption_ext
    if not (ext.startswith(".") and len(ext) > 1 and "/" not in ext and "\\" not in ext):
        raise CaptionError(f"--caption-ext must be a file extension such as '.txt', got {ext!r}")
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise CaptionError("--max-new-tokens and --num-beams must be at least 1")
    captioner = load_captioner(args.model, args.device)

    def run(pictures: Any) -> list[str]:
        return captioner(pictures, args.max_new_tokens, args.num_beams, args.prompt)

    def progress(done: int, total: int) -> None:
        print(f"\rcaptioned {done}/{total}", end="", file=sys.stderr, flush=True)

    report = caption_folder(
        args.folder,
        run,
        ext=ext,
        overwrite=args.overwrite,
        prefix=args.prefix,
        batch_size=args.batch_size,
        progress=progress,
    )
    if report.written:
        print(file=sys.stderr)
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(
        f"{len(report.written)} caption(s) written, {len(report.kept)} kept (--overwrite replaces them), "
        f"{len(report.skipped)} picture(s) skipped"
    )
    return 0
