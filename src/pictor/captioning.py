"""Captions for a training folder, written by an image-to-text model (kohya's `make_captions.py` with BLIP).

`pictor caption FOLDER --model DIR` reads an image-captioning model from a local Hugging Face folder (BLIP,
BLIP-2, GIT and the other models transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor`` load;
config.json, safetensors weights, the processor's and tokenizer's files; nothing downloaded, nothing
unpickled, loaded strictly: `pictor.hf_folders`) and writes one caption file beside each picture, as `pictor
train --data FOLDER` reads them (``<stem>.txt``, or `--caption-ext`'s). The captions are the model's greedy
(or beam) decoding, so the same folder and model give the same files; an optional prefix (a trigger word,
"sks dog, ") goes in front. A picture that already has a caption file keeps it unless asked to overwrite;
one that does not decode, or that the model gives an empty caption, is reported and skipped; every file is
written whole (to a temporary name, then renamed), so an interrupted run leaves no half caption.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn

from pictor.editing import to_rgb
from pictor.hf_folders import load_pretrained_strict

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})  # pictor.data.folder's


class CaptionError(ValueError):
    """A captioning model that cannot be loaded or run, named with what to do."""


@dataclass
class Captioner:
    """A loaded image-to-text model and its processor (image processor + tokenizer)."""

    model: nn.Module
    processor: Any
    folder: Path

    def __call__(
        self, pictures: Sequence[Image.Image], max_new_tokens: int = 40, num_beams: int = 1, prompt: str = ""
    ) -> list[str]:
        """One caption per picture: the model's deterministic decoding, special tokens and spaces
        stripped. `prompt` starts each caption (BLIP's conditional captioning, "a photo of")."""
        kwargs: dict[str, Any] = {"images": list(pictures), "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(pictures)
        try:
            inputs = self.processor(**kwargs)
            device = next(self.model.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            with torch.inference_mode():
                out = self.model.generate(  # type: ignore[operator]
                    **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False
                )
            texts = self.processor.batch_decode(out, skip_special_tokens=True)
        except Exception as exc:  # transformers raises many kinds; name the model in every case
            raise CaptionError(f"the captioning model in {self.folder} failed: {exc}") from exc
        return [" ".join(str(t).split()) for t in texts]


def load_captioner(folder: str | os.PathLike[str], device: str = "cpu") -> Captioner:
    """The captioning model in `folder` (module docstring), in eval mode on `device`."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise CaptionError(
            f"--model {path}: no config.json there; give a local Hugging Face folder of an image-captioning "
            "model (e.g. Salesforce/blip-image-captioning-large saved with save_pretrained)"
        )
    if not any(path.glob("*.safetensors")):
        raise CaptionError(
            f"--model {path}: no .safetensors weights there (pictor never unpickles .bin files); convert the "
            "weights to safetensors"
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CaptionError(
            f"could not load the processor (image processor, tokenizer) from {path}: {exc}"
        ) from exc
    model = load_pretrained_strict(AutoModelForImageTextToText, path, "the captioning model", CaptionError)
    return Captioner(model.to(device), processor, path)


@dataclass
class CaptionReport:
    """What `caption_folder` did: files written, pictures that kept their caption, pictures skipped."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def pictures_in(root: Path) -> Iterator[Path]:
    """The folder's pictures, recursively, sorted, hidden files and folders left out (as training reads)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath, name)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im))  # upright; transparency on white, as training reads it


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def caption_folder(
    root: str | os.PathLike[str],
    captioner: Callable[[Sequence[Image.Image]], list[str]],
    *,
    ext: str = ".txt",
    overwrite: bool = False,
    prefix: str = "",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> CaptionReport:
    """Caption every picture under `root` that has no `ext` file beside it (every one with `overwrite`),
    `batch_size` at a time; `progress(done, total)` after each batch."""
    folder = Path(root)
    if not folder.is_dir():
        raise CaptionError(f"{folder}: no such folder")
    if batch_size < 1:
        raise CaptionError(f"--batch-size must be at least 1, got {batch_size}")
    report = CaptionReport()
    todo: list[Path] = []
    for picture in pictures_in(folder):
        if picture.with_suffix(ext).exists() and not overwrite:
            report.kept.append(picture)
        else:
            todo.append(picture)
    done = 0
    for start in range(0, len(todo), batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for picture in todo[start : start + batch_size]:
            try:
                batch.append((picture, _open(picture)))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                report.skipped.append((picture, f"does not decode: {exc}"))
        if batch:
            texts = captioner([image for _, image in batch])
            for (picture, _), text in zip(batch, texts, strict=True):
                if not text:  # a caption file of only the prefix would read as a real caption
                    report.skipped.append((picture, "the model gave it an empty caption"))
                    continue
                _write(picture.with_suffix(ext), prefix + text)
                report.written.append(picture)
        done += len(todo[start : start + batch_size])
        if progress is not None:
            progress(done, len(todo))
    return report
