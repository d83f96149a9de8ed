"""The up-front scan of an image folder: walk it, read its metadata.jsonl files, check every image's
header (and a cheap integrity check), pair it with its control picture and loss mask, find its caption,
and fill the dataset's per-item lists; everything skipped or missing is reported once, here.

Separate from `pictor.data.folder` because the scan runs once, at construction, and is most of the
folder's rules; the dataset class keeps what happens per item afterwards (decoding, cropping, stand-ins).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from pictor.data.buckets import assign_bucket
from pictor.data.folder_files import IMAGE_EXTENSIONS, DatasetWarning, _check_image, _reason, _summary
from pictor.data.folder_metadata import CONTROL_KEYS, _as_written, read_metadata
from pictor.data.loss_masks import has_transparency
from pictor.data.repeat_folders import folder_repeats

if TYPE_CHECKING:
    from pictor.data.folder import ImageFolderDataset

log = logging.getLogger("pictor.data.folder")  # the dataset's logger, where its summary always was


def walk(ds: ImageFolderDataset) -> tuple[list[Path], list[Path]]:
    """The folder's images and metadata.jsonl files, in a stable order; hidden files and folders, and a
    control or mask folder inside it, are passed over."""
    images, metas = [], []
    seen: set[str] = set()  # real paths of folders walked: a link back up must not loop
    for dirpath, dirnames, filenames in os.walk(ds.root, followlinks=True):
        real = os.path.realpath(dirpath)
        beside = [d for d in (ds.control_dir, ds.mask_dir) if d is not None]
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


def scan(ds: ImageFolderDataset, check: str, caption_ext: str, keys: tuple[str, ...]) -> None:
    """Fill `ds`'s per-item lists from its folder; report what was skipped or lacks something."""
    images, metas = walk(ds)
    stretched: list[tuple[str, str]] = []  # control pictures of another aspect ratio than their image
    metadata = read_metadata(metas, keys, ds.control_metadata)
    ds._meta_controls, ds._named_controls = metadata.controls, metadata.named_controls
    ds._meta_layouts, meta_captions = metadata.layouts, metadata.captions
    if ds.control_metadata:  # the pictures lines name as controls are not training images
        kept = []
        for path in images:
            written = _as_written(path)
            if written not in ds._named_controls:
                kept.append(path)
            elif written in ds._meta_controls:  # an image with a control, and a control
                if _as_written(ds._meta_controls[written]) == written:
                    why = "names itself as its control picture; name another picture"
                else:
                    why = "named as a control picture in metadata.jsonl too; an image is not a control"
                ds.skipped.append((str(path), why))
        images = kept
    in_repeat_folders = 0
    for path in images:
        repeats, tokens, named = 1, None, False
        if ds.repeat_folders:
            try:
                repeats, tokens, named = folder_repeats(path.relative_to(ds.root))
            except ValueError as exc:
                ds.skipped.append((str(path), str(exc)))
                continue
        try:
            w, h = _check_image(path, check)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # SyntaxError and ValueError are what some Pillow plugins raise on malformed headers.
            ds.skipped.append((str(path), _reason(exc)))
            continue
        if min(w, h) < ds.min_side:
            ds.skipped.append((str(path), f"too small: {w}x{h} < {ds.min_side} px"))
            continue
        control = ds._control_of(path)
        if ds.control_dir is not None and control is None:
            rel = path.relative_to(ds.root).with_suffix("")
            ds.skipped.append((str(path), f"no control picture {rel}.* in {ds.control_dir}"))
            continue
        if ds.control_metadata and control is None:
            reason = f"no control picture: no metadata.jsonl line names one ({' or '.join(CONTROL_KEYS)})"
            ds.skipped.append((str(path), reason))
            continue
        if control is not None:
            try:
                cw, ch = _check_image(control, "header")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                ds.skipped.append((str(path), f"control picture {control}: {_reason(exc)}"))
                continue
            if abs(cw / ch - w / h) > 0.02 * (w / h) + 1.0 / min(ch, h):
                stretched.append((str(control), f"{cw}x{ch} for a {w}x{h} image (EXIF rotation?)"))
        caption = meta_captions.get(path.resolve())
        txt = path.with_suffix(caption_ext)
        if caption is None and txt.is_file():
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        if caption is None and tokens is not None:  # kohya's class tokens, from the folder's name
            caption = tokens
            ds.class_captions.append(str(path))
        if caption is None:
            ds.missing_captions.append(str(path))
            caption = ""
        if ds.mask_dir is not None:
            mask = ds._same_stem(ds.mask_dir, path, "masks", ds._mask_twins)
            if mask is not None:
                try:
                    _check_image(mask, check)
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    ds._bad_masks.append((str(mask), _reason(exc)))
                    mask = None  # its image is trained whole, not dropped
            ds.masks.append(mask)
            if mask is None:
                ds.unmasked.append(str(path))
        ds.paths.append(path)
        if control is not None:
            ds.controls.append(control)
        ds.captions.append(caption)
        ds.repeats.append(repeats)
        # (read from the header now, so that pictures without transparency are never opened for a mask)
        ds._alpha.append(ds.loss_mask == "alpha" and has_transparency(path))
        in_repeat_folders += named
        ds.layouts.append(ds._meta_layouts.get(path.resolve()))
        ds.sizes.append((w, h))
        ds.item_buckets.append(assign_bucket(w, h, ds.available_buckets))
    if ds.skipped:
        warnings.warn(_summary(f"images skipped in {ds.root}", ds.skipped), DatasetWarning, stacklevel=3)
    if stretched:
        what = "control pictures of another aspect ratio than their image, stretched to it"
        warnings.warn(_summary(what, stretched), DatasetWarning, stacklevel=3)
    if ds._control_twins:
        what = "images with more than one control picture (same stem, other extensions)"
        warnings.warn(_summary(what, ds._control_twins), DatasetWarning, stacklevel=3)
    if ds._bad_masks:
        what = "mask pictures that do not decode (their images are trained whole)"
        warnings.warn(_summary(what, ds._bad_masks), DatasetWarning, stacklevel=3)
    if ds._mask_twins:
        what = "images with more than one mask (same stem, other extensions)"
        warnings.warn(_summary(what, ds._mask_twins), DatasetWarning, stacklevel=3)
    if ds.unmasked:
        what = f"images have no mask in {ds.mask_dir} (same relative folder and stem): trained whole"
        warnings.warn(_summary(what, [(p, "") for p in ds.unmasked]), DatasetWarning, stacklevel=3)
    if ds.missing_captions:
        entries = [(p, "") for p in ds.missing_captions]
        # Naming the extension looked for helps when the captions are there under another one.
        what = f"images in {ds.root} have no caption (no metadata.jsonl line, no {caption_ext} file;"
        what += " using '')"
        msg = _summary(what, entries)
        warnings.warn(msg, DatasetWarning, stacklevel=3)
    log.info("%s: %d images, %d skipped", ds.root, len(ds.paths), len(ds.skipped))
    if ds.repeat_folders and ds.paths and not in_repeat_folders:
        # on, but no folder named so: most likely named another way ("dog_10", "10-dog")
        warnings.warn(
            f"repeat folders: no image under {ds.root} is in a subfolder named <repeats>_<class "
            "tokens> (kohya's '10_sks dog'), so every image comes once an epoch",
            DatasetWarning,
            stacklevel=3,
        )
    if not ds.paths:
        # Fail here, naming the folder, rather than as an empty DataLoader deep inside a trainer.
        why = "; ".join(f"{Path(p).name}: {reason}" for p, reason in ds.skipped[:3])
        raise ValueError(
            f"no usable images under {ds.root} ({len(ds.skipped)} skipped"
            + (f": {why}{' ...' if len(ds.skipped) > 3 else ''}" if why else "")
            + f"; extensions looked for: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
