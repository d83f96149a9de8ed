"""Images with captions from a folder, the layout kohya's scripts and Hugging Face's `imagefolder` use.

    root/
      metadata.jsonl        optional: {"file_name": "a/b.png", "text": "..."} per line ("caption" works too)
      a/b.png
      a/c.jpg  a/c.txt      a caption file beside the image, same stem (`caption_ext`: ".txt" by default)

A caption comes from metadata.jsonl when it names the file, else from the caption file beside it, else
it is "" (counted and reported once). metadata.jsonl files in subfolders also count; their file names are
relative to their own folder, as in `imagefolder`. Hidden files and folders (".cache", ...) are not
scanned.
With `folder_repeats`, subfolders named as kohya names them, ``<repeats>_<class tokens>``, say how many
times their images come each epoch and caption those without a caption (`pictor.data.repeat_folders`).
A metadata line may also give a "layout", boxes with phrases in fractions of the image (see
`pictor.data.layouts`), for `pictor train layout`; items carry it moved with their crop and flip.
For a ControlNet (`control_metadata`), a line names its image's control picture as Hugging Face's
`imagefolder` names a second image column, "conditioning_image_file_name", or as the datasets of diffusers'
train_controlnet scripts do, "conditioning_image" (a path relative to the metadata file's folder, like
"file_name"); the pictures so named are controls, not training images, wherever they lie.

The folder is scanned once, up front, reading headers only (size, EXIF orientation) plus a cheap
integrity check, so broken files are reported at construction rather than mid-epoch. Pixels are decoded
in `__getitem__`. Pillow's decompression-bomb guard stays on: a bomb is a skipped file, not a crash.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from pictor.data.buckets import Bucket, assign_bucket, cover_crop, make_buckets, resize_to_bucket
from pictor.data.layouts import LayoutError, crop_layout, parse_layout
from pictor.data.loss_masks import MASK_KINDS, MaskKind, fitted_mask, has_transparency, read_mask
from pictor.data.repeat_folders import folder_repeats
from pictor.editing import eight_bit
from pictor.notices import PictorWarning

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_KEYS = ("text", "caption")
# metadata.jsonl keys naming an image's control picture: datasets' second image column, then diffusers'.
CONTROL_KEYS = ("conditioning_image_file_name", "conditioning_image")
_EXIF_ORIENTATION = 0x0112
_SHOWN = 5  # paths quoted in a summary warning


class DatasetWarning(PictorWarning):
    """Problems found while scanning a dataset folder (skipped images, missing captions)."""


class UnreadableImageError(ValueError):
    """An image that passed the scan but does not decode (the fast scan reads headers, not every pixel)."""


def _summary(what: str, entries: Sequence[tuple[str, str]]) -> str:
    lines = [f"  {p}: {r}" if r else f"  {p}" for p, r in entries[:_SHOWN]]
    more = f"\n  ... and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return f"{len(entries)} {what}:\n" + "\n".join(lines) + more


def _check_image(path: Path, check: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation. Raises on a file that will not decode.

    "fast" never decodes a whole PNG or JPEG: PNG verify() walks every chunk's CRC (catches truncation
    and corruption), and a JPEG is fully decoded only when it lacks the end-of-image marker, the usual
    sign of truncation. Other formats are small in practice and have no cheap check, so they are decoded.
    """
    with Image.open(path) as im:
        w, h = im.size
        fmt = im.format
        if check == "decode" or (check == "fast" and fmt not in ("PNG", "JPEG")):
            im.load()
        if fmt == "PNG" and check != "decode":
            # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the pixels;
            # walking the chunk headers finds one there without decoding anything.
            exif = Image.Exif()
            raw = im.info.get("exif") or _png_exif_chunk(path)
            if raw:
                exif.load(raw)
        else:
            exif = im.getexif()
        if exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # 90-degree turns swap the sides
            w, h = h, w
    if check == "fast" and fmt == "PNG":
        with Image.open(path) as im:  # verify() leaves the image unusable, hence a second open
            im.verify()
    elif check == "fast" and fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            with Image.open(path) as im:
                im.load()
    return w, h


def _png_exif_chunk(path: Path) -> bytes | None:
    """The data of a PNG's eXIf chunk wherever it sits (the standard allows it after the image data),
    reading only chunk headers; None when there is none."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def _control_entry(rec: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the control picture a metadata line names, or None; a problem with the line, or None)."""
    given = {key: rec[key] for key in CONTROL_KEYS if key in rec}
    if not given:
        return None, None
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            return None, f"{key} must be a path string, got {value!r}"
    if len({os.path.normpath(value) for value in given.values()}) > 1:
        return None, f"{' and '.join(given)} name different pictures; keep one"
    return next(iter(given.values())), None


def _as_written(path: Path) -> str:
    """A path as the folder's walk spells it, normalised ("a/./b" and "a/x/../b" alike) but not resolved:
    a Hugging Face cache links files of equal contents to one blob, and they must stay different files."""
    return os.path.normpath(path)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "unreadable: not an image Pillow can identify"
    text = str(exc) or type(exc).__name__
    return f"truncated: {text}" if "truncated" in text.lower() else f"unreadable: {text}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white (not dropped to black)."""
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a palette entry or a colour key that means "transparent"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I"):  # 16-bit greyscale, the only "I" images of the formats read here
        return eight_bit(image).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # [H, W, 3]
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def _splitmix64(x: int) -> int:
    # A tiny stateless hash: the flip of item i in epoch e is a pure function of (seed, e, i).
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned images under `root`, recursively, resized onto aspect-ratio buckets.

    size: side of the target area; with buckets=True every image goes to the closest-aspect bucket of
    `make_buckets(size, multiple, max_ratio)`, with buckets=False to size x size. Either way the image is
    resized to cover its target and centre-cropped. Items with min(w, h) < min_side are skipped.
    check: "fast" (default, see `_check_image`), "decode" (decode everything while scanning: slow but
    certain) or "header" (size only; a broken file then fails in __getitem__ with its path in the error).
    caption_ext: the extension of the caption file beside each image (kohya's --caption_extension).
    hflip: mirror about half of the items, chosen per (seed, epoch, index); call `set_epoch` each epoch.
    (The trainer leaves this off: it mirrors per sample of its data stream, whatever the epoch.)
    loss_mask: "alpha" or "folder" gives every item a loss mask (`pictor.data.loss_masks`): its alpha
    channel, or the picture at the same relative folder and stem in `mask_dir` (an image without one is
    trained whole and listed in `unmasked`).
    repeat_folders: read kohya's ``<repeats>_<class tokens>`` subfolders (`pictor.data.repeat_folders`):
    `repeats` gives each item's count (which the trainer's stream follows; the items stay one per file),
    and an image without a caption takes its folder's class tokens (listed in `class_captions`).

    After construction: `paths`, `captions`, `sizes` (displayed w, h), `item_buckets` (one per item, for
    `BucketBatchSampler`), `available_buckets`, `skipped` [(path, reason)], `missing_captions` and `repeats`
    (one per item: 1 each without `repeat_folders`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int = 64,
        buckets: bool = True,
        *,
        multiple: int = 16,
        max_ratio: float = 2.0,
        min_side: int = 16,
        check: Literal["fast", "decode", "header"] = "fast",
        caption_ext: str = ".txt",
        caption_keys: Sequence[str] = CAPTION_KEYS,
        hflip: bool = False,
        seed: int = 0,
        control_dir: str | os.PathLike[str] | None = None,
        control_metadata: bool = False,
        repeat_folders: bool = False,
        loss_mask: MaskKind | None = None,
        mask_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.repeat_folders = repeat_folders
        if loss_mask is not None and loss_mask not in MASK_KINDS:
            raise ValueError(f"loss_mask must be one of {', '.join(MASK_KINDS)} or None, got {loss_mask!r}")
        if (loss_mask == "folder") != (mask_dir is not None):
            raise ValueError("a mask folder goes with loss_mask='folder', and loss_mask='folder' needs one")
        self.loss_mask, self.mask_dir = loss_mask, Path(mask_dir) if mask_dir is not None else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {self.mask_dir}")
        if self.mask_dir is not None and os.path.realpath(self.mask_dir) == os.path.realpath(self.root):
            raise ValueError(
                f"the mask folder is the image folder itself ({self.root}): put the masks in a folder of "
                "their own, with the images' relative paths and stems"
            )
        self.masks: list[Path | None] = []  # loss_mask "folder": each item's mask picture, or None
        self.unmasked: list[str] = []
        self._mask_twins: list[tuple[str, str]] = []
        self._bad_masks: list[tuple[str, str]] = []  # mask pictures that do not decode (found by the scan)
        self._failed_masks: set[Path] = set()  # and those found later, reported once each
        self._alpha: list[bool] = []  # loss_mask "alpha": whether each picture has transparency
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        # A ControlNet's training pictures (kohya's conditioning_data_dir): for IMAGE at REL/STEM.EXT in the
        # folder, the picture at REL/STEM.* in this one, cropped and mirrored with the image.
        self.control_dir = Path(control_dir) if control_dir is not None else None
        if self.control_dir is not None and not self.control_dir.is_dir():
            raise FileNotFoundError(f"control picture folder not found: {self.control_dir}")
        if self.control_dir is not None and os.path.realpath(self.control_dir) == os.path.realpath(self.root):
            raise ValueError(
                f"the control picture folder is the image folder itself ({self.root}): put the control "
                "pictures in a folder of their own, with the images' relative paths and stems"
            )
        # Or the control picture each metadata.jsonl line names (CONTROL_KEYS), for a folder laid out as
        # Hugging Face's ControlNet datasets are (images/ and conditioning_images/ side by side).
        if control_metadata and self.control_dir is not None:
            raise ValueError(
                "control pictures come from a control folder or from metadata.jsonl's "
                f"{CONTROL_KEYS[0]}, not both: drop one"
            )
        self.control_metadata = control_metadata
        # Image (as the walk spells it, `_as_written`) -> its control picture; and every picture a line names.
        self._meta_controls: dict[str, Path] = {}
        self._named_controls: set[str] = set()
        self.controls: list[Path] = []
        self._control_listings: dict[Path, dict[str, list[Path]]] = {}
        self._control_twins: list[tuple[str, str]] = []
        if check not in ("fast", "decode", "header"):
            raise ValueError(f"check must be 'fast', 'decode' or 'header', got {check!r}")
        self.size, self.min_side, self.hflip, self.seed, self.epoch = size, min_side, hflip, seed, 0
        self.available_buckets: list[Bucket] = (
            make_buckets(size, multiple, max_ratio) if buckets else [(size, size)]
        )
        self.paths: list[Path] = []
        self.captions: list[str] = []
        # Per image: its layout from metadata.jsonl ("layout": [{"box", "phrase"}]), in fractions of the
        # original image, or None.
        self.layouts: list[list[dict[str, Any]] | None] = []
        self.sizes: list[tuple[int, int]] = []
        self.item_buckets: list[Bucket] = []
        self.skipped: list[tuple[str, str]] = []
        self.missing_captions: list[str] = []
        self.repeats: list[int] = []
        self.class_captions: list[str] = []  # images captioned by their repeat folder's class tokens
        self._broken: set[int] = set()  # items found not to decode after the scan
        # Per item, the part of a split it belongs to (a training run's --validation-split: 0 trains, 1 is
        # held out), or None: an item stands in only for one of its own part, so that a broken training
        # image never brings a held-out one into training.
        self.parts: Sequence[int] | None = None
        self._scan(check, caption_ext, tuple(caption_keys))

    # -- scanning ------------------------------------------------------------------------------------

    def _walk(self) -> tuple[list[Path], list[Path]]:
        images, metas = [], []
        seen: set[str] = set()  # real paths of folders walked: a link back up must not loop
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            beside = [d for d in (self.control_dir, self.mask_dir) if d is not None]
            if real in seen or any(real == os.path.realpath(d) for d in beside):
                dirnames[:] = []  # a control or mask folder inside the data folder holds no training images
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath, name)
                if name == "metadata.jsonl":
                    metas.append(p)
                elif p.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(p)
        return images, metas

    def _read_metadata(self, metas: list[Path], keys: tuple[str, ...]) -> dict[Path, str]:
        captions: dict[Path, str] = {}
        where: dict[Path, str] = {}  # the line each caption came from, to name both sides of a conflict
        self._meta_layouts: dict[Path, list[dict[str, Any]]] = {}
        bad: list[tuple[str, str]] = []
        twice: list[tuple[str, str]] = []
        controls_twice: list[tuple[str, str]] = []
        for meta in metas:
            raw = meta.read_bytes()
            for n, data in enumerate(raw.splitlines(), 1):
                if n == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors)
                    data = data[3:]
                if not data.strip():
                    continue
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = exc.object[exc.start]
                    bad.append((f"{meta}:{n}", f"not UTF-8 (byte {byte:#x}); save the file as UTF-8"))
                    continue
                try:
                    rec = json.loads(line)
                    name = rec["file_name"]
                    text = next((rec[k] for k in keys if k in rec), None)
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    bad.append((f"{meta}:{n}", f"bad line ({type(exc).__name__})"))
                    continue
                if not isinstance(name, str) or not name:
                    bad.append((f"{meta}:{n}", f"file_name must be a path string, got {name!r}"))
                    continue
                target = (meta.parent / name).resolve()
                if text is not None:
                    text = str(text).strip()
                    if target in captions and captions[target] != text:
                        twice.append((f"{meta}:{n}", f"{name}: used instead of {where[target]}'s"))
                    captions[target], where[target] = text, f"{meta}:{n}"
                if self.control_metadata:
                    control, problem = _control_entry(rec)
                    if problem is not None:
                        bad.append((f"{meta}:{n}", f"{problem} (its image is skipped)"))
                    elif control is not None:
                        image, picture = _as_written(meta.parent / name), meta.parent / control
                        earlier = self._meta_controls.get(image)
                        if earlier is not None and _as_written(earlier) != _as_written(picture):
                            entry = (f"{meta}:{n}", f"{name}: {control} used instead of {earlier}")
                            controls_twice.append(entry)
                        self._meta_controls[image] = picture
                        self._named_controls.add(_as_written(picture))
                if "layout" in rec:  # boxes with phrases, for layout training (pictor.data.layouts)
                    try:
                        self._meta_layouts[target] = parse_layout(rec["layout"])
                    except LayoutError as exc:
                        bad.append((f"{meta}:{n}", f"layout ignored: {exc}"))
        if bad:
            warnings.warn(_summary("metadata.jsonl lines ignored", bad), DatasetWarning, stacklevel=4)
        if twice:
            what = "images captioned twice in metadata.jsonl (the later line wins)"
            warnings.warn(_summary(what, twice), DatasetWarning, stacklevel=4)
        if controls_twice:
            what = "images given a control picture twice in metadata.jsonl (the later line wins)"
            warnings.warn(_summary(what, controls_twice), DatasetWarning, stacklevel=4)
        return captions

    def _scan(self, check: str, caption_ext: str, keys: tuple[str, ...]) -> None:
        images, metas = self._walk()
        stretched: list[tuple[str, str]] = []  # control pictures of another aspect ratio than their image
        meta_captions = self._read_metadata(metas, keys)
        if self.control_metadata:  # the pictures lines name as controls are not training images
            kept = []
            for path in images:
                written = _as_written(path)
                if written not in self._named_controls:
                    kept.append(path)
                elif written in self._meta_controls:  # an image with a control, and a control
                    if _as_written(self._meta_controls[written]) == written:
                        why = "names itself as its control picture; name another picture"
                    else:
                        why = "named as a control picture in metadata.jsonl too; an image is not a control"
                    self.skipped.append((str(path), why))
            images = kept
        in_repeat_folders = 0
        for path in images:
            repeats, tokens, named = 1, None, False
            if self.repeat_folders:
                try:
                    repeats, tokens, named = folder_repeats(path.relative_to(self.root))
                except ValueError as exc:
                    self.skipped.append((str(path), str(exc)))
                    continue
            try:
                w, h = _check_image(path, check)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                # SyntaxError and ValueError are what some Pillow plugins raise on malformed headers.
                self.skipped.append((str(path), _reason(exc)))
                continue
            if min(w, h) < self.min_side:
                self.skipped.append((str(path), f"too small: {w}x{h} < {self.min_side} px"))
                continue
            control = self._control_of(path)
            if self.control_dir is not None and control is None:
                rel = path.relative_to(self.root).with_suffix("")
                self.skipped.append((str(path), f"no control picture {rel}.* in {self.control_dir}"))
                continue
            if self.control_metadata and control is None:
                reason = f"no control picture: no metadata.jsonl line names one ({' or '.join(CONTROL_KEYS)})"
                self.skipped.append((str(path), reason))
                continue
            if control is not None:
                try:
                    cw, ch = _check_image(control, "header")
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    self.skipped.append((str(path), f"control picture {control}: {_reason(exc)}"))
                    continue
                if abs(cw / ch - w / h) > 0.02 * (w / h) + 1.0 / min(ch, h):
                    stretched.append((str(control), f"{cw}x{ch} for a {w}x{h} image (EXIF rotation?)"))
            caption = meta_captions.get(path.resolve())
            txt = path.with_suffix(caption_ext)
            if caption is None and txt.is_file():
                caption = txt.read_text(encoding="utf-8", errors="replace").strip()
            if caption is None and tokens is not None:  # kohya's class tokens, from the folder's name
                caption = tokens
                self.class_captions.append(str(path))
            if caption is None:
                self.missing_captions.append(str(path))
                caption = ""
            if self.mask_dir is not None:
                mask = self._same_stem(self.mask_dir, path, "masks", self._mask_twins)
                if mask is not None:
                    try:
                        _check_image(mask, check)
                    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                        self._bad_masks.append((str(mask), _reason(exc)))
                        mask = None  # its image is trained whole, not dropped
                self.masks.append(mask)
                if mask is None:
                    self.unmasked.append(str(path))
            self.paths.append(path)
            if control is not None:
                self.controls.append(control)
            self.captions.append(caption)
            self.repeats.append(repeats)
            # (read from the header now, so that pictures without transparency are never opened for a mask)
            self._alpha.append(self.loss_mask == "alpha" and has_transparency(path))
            in_repeat_folders += named
            self.layouts.append(self._meta_layouts.get(path.resolve()))
            self.sizes.append((w, h))
            self.item_buckets.append(assign_bucket(w, h, self.available_buckets))
        if self.skipped:
            warnings.warn(
                _summary(f"images skipped in {self.root}", self.skipped), DatasetWarning, stacklevel=3
            )
        if stretched:
            what = "control pictures of another aspect ratio than their image, stretched to it"
            warnings.warn(_summary(what, stretched), DatasetWarning, stacklevel=3)
        if self._control_twins:
            what = "images with more than one control picture (same stem, other extensions)"
            warnings.warn(_summary(what, self._control_twins), DatasetWarning, stacklevel=3)
        if self._bad_masks:
            what = "mask pictures that do not decode (their images are trained whole)"
            warnings.warn(_summary(what, self._bad_masks), DatasetWarning, stacklevel=3)
        if self._mask_twins:
            what = "images with more than one mask (same stem, other extensions)"
            warnings.warn(_summary(what, self._mask_twins), DatasetWarning, stacklevel=3)
        if self.unmasked:
            what = f"images have no mask in {self.mask_dir} (same relative folder and stem): trained whole"
            warnings.warn(_summary(what, [(p, "") for p in self.unmasked]), DatasetWarning, stacklevel=3)
        if self.missing_captions:
            entries = [(p, "") for p in self.missing_captions]
            # Naming the extension looked for helps when the captions are there under another one.
            what = f"images in {self.root} have no caption (no metadata.jsonl line, no {caption_ext} file;"
            what += " using '')"
            msg = _summary(what, entries)
            warnings.warn(msg, DatasetWarning, stacklevel=3)
        log.info("%s: %d images, %d skipped", self.root, len(self.paths), len(self.skipped))
        if self.repeat_folders and self.paths and not in_repeat_folders:
            # on, but no folder named so: most likely named another way ("dog_10", "10-dog")
            warnings.warn(
                f"repeat folders: no image under {self.root} is in a subfolder named <repeats>_<class "
                "tokens> (kohya's '10_sks dog'), so every image comes once an epoch",
                DatasetWarning,
                stacklevel=3,
            )
        if not self.paths:
            # Fail here, naming the folder, rather than as an empty DataLoader deep inside a trainer.
            why = "; ".join(f"{Path(p).name}: {reason}" for p, reason in self.skipped[:3])
            raise ValueError(
                f"no usable images under {self.root} ({len(self.skipped)} skipped"
                + (f": {why}{' ...' if len(self.skipped) > 3 else ''}" if why else "")
                + f"; extensions looked for: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )

    # -- items ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def flip_for(self, index: int) -> bool:
        """Whether item `index` is mirrored this epoch; known without touching pixels (for caches)."""
        if not self.hflip:
            return False
        return bool(_splitmix64(_splitmix64(_splitmix64(self.seed) ^ self.epoch) ^ index) & 1)

    def rel_path(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def load_image(self, index: int, flip: bool = False) -> torch.Tensor:
        """Item `index` as float32 [3, H, W] in [-1, 1], on its bucket, mirrored if `flip`."""
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im = to_rgb(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableImageError(
                f"cannot decode {path} ({_reason(exc)}): re-save or remove it (check='decode' finds such "
                "files while scanning)"
            ) from exc
        im = resize_to_bucket(im, self.item_buckets[index])
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(im)

    @property
    def has_controls(self) -> bool:
        """Whether every item comes with a control picture (a control folder's, or metadata.jsonl's)."""
        return self.control_dir is not None or self.control_metadata

    def control_name(self, index: int) -> str:
        """Item `index`'s control picture as a stable name, in "/" form: relative to its control folder, else
        to the data folder as written (with ".." where it lies outside, so a moved pair of folders keeps its
        names)."""
        path = self.controls[index]
        if self.control_dir is not None:
            return path.relative_to(self.control_dir).as_posix()
        return Path(os.path.relpath(_as_written(path), _as_written(self.root))).as_posix()

    def _control_of(self, path: Path) -> Path | None:
        """The control picture of the image at `path`: the one its metadata.jsonl line names, or in the
        control folder the same relative folder and stem (`Path.stem`, so "a.v2.png" pairs with "a.v2.*",
        never "a.*"), any image extension in any case."""
        if self.control_metadata:
            return self._meta_controls.get(_as_written(path))
        if self.control_dir is None:
            return None
        return self._same_stem(self.control_dir, path, "control pictures", self._control_twins)

    def _same_stem(self, base: Path, path: Path, what: str, twins: list[tuple[str, str]]) -> Path | None:
        """The picture in folder `base` at the image's relative folder and stem (`Path.stem`, so "a.v2.png"
        pairs with "a.v2.*", never "a.*"), any image extension in any case; more than one is noted in
        `twins` (the first, by name, is used)."""
        rel = path.relative_to(self.root)
        folder = base / rel.parent
        listing = self._control_listings.get(folder)
        if listing is None:
            listing = {}
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                q = folder / name
                if not name.startswith(".") and q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file():
                    listing.setdefault(q.stem, []).append(q)
            self._control_listings[folder] = listing
        found = listing.get(path.stem, [])
        if len(found) > 1:
            names = ", ".join(q.name for q in found)
            twins.append((str(path), f"{what} {names}: using {found[0].name}"))
        return found[0] if found else None

    def load_control(self, index: int, flip: bool = False) -> torch.Tensor:
        """Item `index`'s control picture as float32 [3, H, W] in [-1, 1]: resized to its image's size (a
        depth map or pose drawn at another resolution) and then cropped and mirrored exactly as the image."""
        path = self.controls[index]
        try:
            with Image.open(path) as im:
                # alpha dropped, not composited: as `pictor generate --controlnet-image` reads one
                im = eight_bit(ImageOps.exif_transpose(im)).convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise UnreadableImageError(f"cannot decode control picture {path} ({_reason(exc)})") from exc
        if im.size != self.sizes[index]:
            im = im.resize(self.sizes[index], Image.Resampling.BICUBIC)
        im = resize_to_bucket(im, self.item_buckets[index])
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(im)

    def load_mask(self, index: int, flip: bool = False) -> torch.Tensor:
        """Item `index`'s loss mask as uint8 [1, H, W] on its bucket, mirrored if `flip` (all 255 for an
        image without a mask picture, or without transparency under "alpha")."""
        bucket = self.item_buckets[index]
        whole = torch.full((1, bucket[1], bucket[0]), 255, dtype=torch.uint8)
        path = self.paths[index] if self.loss_mask == "alpha" else self.masks[index]
        if path is None or (self.loss_mask == "alpha" and not self._alpha[index]):
            return whole  # no mask picture, or a picture without transparency: all of it counts
        assert self.loss_mask is not None
        try:
            mask = read_mask(path, self.loss_mask)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # A mask the scan's quick check passed: train the image whole rather than drop it (its pixels
            # decode, or load_image reports them) or stop the run.
            if path not in self._failed_masks:
                self._failed_masks.add(path)
                warnings.warn(
                    f"cannot decode the mask {path} ({_reason(exc)}); its image is trained whole",
                    DatasetWarning,
                    stacklevel=3,
                )
            return whole
        return fitted_mask(mask, self.sizes[index], bucket, flip)

    def item_info(self, index: int) -> dict[str, Any]:
        """Everything about an item except its pixels; a layout is moved with the item's crop and flip."""
        info = {
            "caption": self.captions[index],
            "path": str(self.paths[index]),
            "rel_path": self.rel_path(index),
            "bucket": self.item_buckets[index],
            "flip": self.flip_for(index),
        }
        layout = self.layouts[index]
        if layout is not None:
            resized, crop = cover_crop(self.sizes[index], self.item_buckets[index])
            info["layout"] = crop_layout(layout, resized, crop, info["flip"])
        return info

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item `index`; if its file does not decode, the next item of its bucket that does (reported once
        per file in each loading process). The stand-in depends only on which files are broken, so a
        resumed run, or another rank, makes the same choice, and one bad file costs one item, not the run."""
        for candidate in self.stand_ins(index):
            item = self.item_info(candidate)
            try:
                item["image"] = self.load_image(candidate, item["flip"])
                if self.has_controls:
                    item["control"] = self.load_control(candidate, item["flip"])
                if self.loss_mask is not None:
                    item["mask"] = self.load_mask(candidate, item["flip"])
            except UnreadableImageError as exc:
                self.mark_broken(candidate, exc)
                continue
            return item
        raise UnreadableImageError(f"no image of bucket {self.item_buckets[index]} in {self.root} decodes")

    def mark_broken(self, index: int, error: UnreadableImageError) -> None:
        """Item `index` does not decode: report it, and let `stand_ins` pass over it from now on."""
        self._broken.add(index)
        warnings.warn(f"{error}; the next image of its bucket stands in for it", DatasetWarning, stacklevel=3)

    def stand_ins(self, index: int) -> Iterator[int]:
        """`index` unless known broken, then the following items of its bucket (wrapping round, and of its
        part of a split when `parts` is set) that are not: the candidates for item `index`, in the order
        every reader tries them."""
        if index not in self._broken:
            yield index
        bucket, n, parts = self.item_buckets[index], len(self.paths), self.parts
        for step in range(1, n):
            j = (index + step) % n
            same_part = parts is None or parts[j] == parts[index]
            if j not in self._broken and self.item_buckets[j] == bucket and same_part:
                yield j


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a one-bucket batch: tensors are stacked, everything else becomes a list; `bucket` stays a
    single (w, h) tuple (torch's default_collate would turn it into two tensors)."""
    buckets = {tuple(it["bucket"]) for it in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold one bucket, got {sorted(buckets)}; use BucketBatchSampler")
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    out["bucket"] = buckets.pop()
    return out
