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

The scan lives in `pictor.data.folder_scan`, metadata.jsonl's reading in `pictor.data.folder_metadata`
and the per-file checks and conversions in `pictor.data.folder_files`; this module keeps the dataset's
items (decoding, cropping, stand-ins for broken files) and `collate`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps

from pictor.data.buckets import Bucket, cover_crop, make_buckets, resize_to_bucket
from pictor.data.folder_files import (
    IMAGE_EXTENSIONS,
    DatasetWarning,
    UnreadableImageError,
    _reason,
    image_to_tensor,
    to_rgb,
)
from pictor.data.folder_metadata import CAPTION_KEYS, CONTROL_KEYS, _as_written
from pictor.data.folder_scan import scan
from pictor.data.layouts import crop_layout
from pictor.data.loss_masks import MASK_KINDS, MaskKind, fitted_mask, read_mask
from pictor.editing import eight_bit

# The names of the modules split off this one stay importable from here, where callers import them.
__all__ = [
    "CAPTION_KEYS",
    "CONTROL_KEYS",
    "IMAGE_EXTENSIONS",
    "DatasetWarning",
    "ImageFolderDataset",
    "UnreadableImageError",
    "collate",
    "image_to_tensor",
    "to_rgb",
]


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
        # Image (resolved) -> its layout from metadata.jsonl; all three filled by the scan.
        self._meta_layouts: dict[Path, list[dict[str, Any]]] = {}
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
        scan(self, check, caption_ext, tuple(caption_keys))

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
