"""`--preview FILE` of `pictor generate` and `pictor edit`: a live preview (`pictor.latent_preview`) of the
running sampler run's first image, written to FILE at every step so an image viewer that reloads shows the
picture forming (A1111's and ComfyUI's live previews, for a terminal)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the models load only when a preview is asked for (the CLI starts fast)
    from pictor.latent_preview import Previews

# `pictor.latent_preview.PREVIEW_METHODS` (tests/test_cli_preview.py checks they agree)
METHODS = ("approx", "full")

# Pillow's names of the formats a preview may be written as, by suffix
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def add_preview_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preview",
        default=None,
        metavar="FILE",
        help="keep FILE (.png, .jpg or .webp) updated with a live preview of the running sampler run's first "
        "image, every step (open it in an image viewer that reloads); it is not a result",
    )
    p.add_argument(
        "--preview-method",
        default="approx",
        choices=list(METHODS),
        help="approx: a linear map of the latents (nearly free; the latent grid's size); full: the "
        "autoencoder decodes each step's prediction (exact, a decode per step) (default approx)",
    )


def preview_writer(args: argparse.Namespace) -> Previews | None:
    """The Previews that write --preview FILE, or None without it; a FILE that cannot be written is an
    error now, before the model loads."""
    if not getattr(args, "preview", None):
        return None
    path = Path(args.preview)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"--preview {path}: give a file ending in {', '.join(_FORMATS)}")
    if path.is_dir():
        raise ValueError(f"--preview {path}: this is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--preview {path}: its folder {path.parent} does not exist")

    from pictor.latent_preview import Previews

    def write(pictures: list[Any], _first_index: int) -> None:
        # a whole file at every moment: written beside it, then renamed over it
        partial = path.with_name(f".{path.name}.partial")
        pictures[0].convert("RGB").save(partial, format=kind)
        os.replace(partial, path)

    return Previews(write, args.preview_method)
