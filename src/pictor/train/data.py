"""Training data: an index-addressable stream of (image, caption) pairs, sharded over ranks, plus the
per-sample random numbers the stages draw.

Determinism is built on one integer, the data position: the number of samples the run has consumed.
Sample k of the stream is always the same image and caption, and every random number that belongs to it
(noise, timestep, caption dropout) comes from a generator seeded by (run seed, k). So the loss of a step
depends only on the model state and the data position, never on wall time, worker timing, or how the
global batch is split over ranks: a resumed run, or one on another number of processes, sees the same
samples with the same noise.

Augmentation of folder data (mirroring, caption tag shuffle and dropout; kohya's --flip_aug,
--shuffle_caption, --keep_tokens, --caption_tag_dropout_rate) follows the same rule: it is applied to
stream sample k, from a generator seeded by (run seed, STREAM_AUGMENT, k), never to a dataset index.

The stream's positions and draws live in `pictor.train.sample_stream`, the augmentation in
`pictor.train.stream_augment` and the loader side in `pictor.train.micro_batches`; this module builds the
datasets (`make_dataset`), fingerprints a folder for resumes, and keeps the stream's names importable.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pictor.data.repeat_folders import MAX_EPOCH_SAMPLES
from pictor.notices import PictorWarning
from pictor.train.config import ConfigError
from pictor.train.holdout_split import split_indices
from pictor.train.micro_batches import (
    Batch,
    augmentation,
    micro_batches,
    to_float,
    to_tensor,
    training_items,
    validation_items,
)
from pictor.train.sample_stream import (
    HOLDOUT_OFFSET,
    STREAM_AUGMENT,
    STREAM_HOLDOUT,
    STREAM_TRAIN,
    ImageCaptionDataset,
    SampleDraws,
    dataset_length,
    holdout_index,
    rank_indices,
    sample_generator,
    stream_index,
)
from pictor.train.stream_augment import Augment

# The names of the modules split off this one stay importable from here, where callers import them.
__all__ = [
    "HOLDOUT_OFFSET",
    "STREAM_AUGMENT",
    "STREAM_HOLDOUT",
    "STREAM_TRAIN",
    "Augment",
    "Batch",
    "ImageCaptionDataset",
    "SampleDraws",
    "augmentation",
    "data_change",
    "data_fingerprint",
    "dataset_length",
    "default_workers",
    "holdout_index",
    "make_dataset",
    "micro_batches",
    "rank_indices",
    "sample_generator",
    "stream_index",
    "to_float",
    "to_tensor",
    "training_items",
    "validation_items",
]


def make_dataset(
    spec: str,
    size: int,
    seed: int,
    *,
    caption_ext: str = ".txt",
    flip: bool = False,
    shuffle_caption: bool = False,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    buckets: bool = False,
    multiple: int = 16,
    validation_split: float = 0.0,
    control_dir: str | None = None,
    control_metadata: bool = False,
    repeat_folders: bool = False,
    loss_mask: str | None = None,
    mask_dir: str | None = None,
) -> ImageCaptionDataset:
    """``"shapes"`` (the procedural world) or an image folder with captions (in metadata.jsonl, or beside
    each image as ``<stem><caption_ext>``), augmented per stream sample as the options say (`Augment`).
    With `buckets`, folder images go to aspect-ratio buckets of about size**2 pixels whose sides are
    multiples of `multiple` (the model's pixel multiple), else to size x size centre crops. `control_dir`:
    a folder of control pictures paired with the folder's images by relative path (a ControlNet's), each
    item's in its info as "control", cropped and mirrored with the image; `control_metadata`: the control
    pictures that the folder's metadata.jsonl lines name instead (`pictor.data.folder.CONTROL_KEYS`);
    `repeat_folders`: kohya's ``<repeats>_<class tokens>`` subfolders weight the stream
    (`pictor.data.repeat_folders`); `loss_mask` ("alpha", or "folder" with `mask_dir`): each sample's loss
    mask in its draws as "mask", uint8 [1, H, W] (`pictor.data.loss_masks`)."""
    augment = Augment(flip, shuffle_caption, keep_tokens, tag_dropout)
    if spec == "shapes":
        # Mirroring would make "a square left of a circle" false, and its captions are sentences, not
        # tags: the options are for image folders, so say so rather than quietly train on something else.
        given = [
            flag
            for flag, on in (
                ("--flip-aug", flip),
                ("--shuffle-caption", shuffle_caption),
                ("--keep-tokens", keep_tokens != 0),
                ("--caption-tag-dropout", tag_dropout != 0.0),
                ("--caption-ext", caption_ext != ".txt"),
                ("--buckets", buckets),
                ("--folder-repeats", repeat_folders),
                ("--alpha-mask", loss_mask == "alpha"),
                ("--mask-dir", mask_dir is not None),
            )
            if on
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: for image folders only; the shapes world (--data shapes) is drawn "
                "with exact captions and is not augmented. Drop the option(s), or give --data a folder of "
                "images"
            )
        from pictor.data.shapes import ShapesDataset

        return ShapesDataset(seed=seed, size=size)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {spec!r}: give 'shapes' or a folder of images with captions")
    from pictor.data.folder import ImageFolderDataset

    # Without buckets, one square size: every image is resized to cover size x size and centre-cropped.
    # The folder's own hflip stays off: it picks per (dataset index, epoch), which a stream does not follow.
    folder = ImageFolderDataset(
        path,
        size=size,
        buckets=buckets,
        multiple=multiple,
        seed=seed,
        caption_ext=caption_ext,
        control_dir=control_dir,
        control_metadata=control_metadata,
        repeat_folders=repeat_folders,
        loss_mask=loss_mask,  # type: ignore[arg-type]
        mask_dir=mask_dir,
    )
    if keep_tokens and not (shuffle_caption or tag_dropout > 0.0):
        warnings.warn(
            "--keep-tokens only keeps tags out of --shuffle-caption and --caption-tag-dropout, and neither "
            "is on: captions are used as written",
            PictorWarning,
            stacklevel=2,
        )
    return _FolderImages(folder, augment if augment.active else None, validation_split, seed)


class _FolderImages:
    """ImageFolderDataset items (float [-1, 1] tensors in dicts) as (uint8 [H, W, 3], caption, info)."""

    def __init__(
        self, folder: Any, augment: Augment | None = None, validation_split: float = 0.0, seed: int = 0
    ) -> None:
        if len(folder) == 0:
            raise ValueError(f"{folder.root}: no usable images found")
        self.folder = folder
        self.augment = augment  # applied by the stream (`_StreamItems`), not here: it needs k, not index
        # --validation-split: the items the training stream walks and those held out of it (dataset
        # indices), or None for both when nothing is held out
        training, validation = split_indices(len(folder), validation_split, seed)
        self.validation = validation if len(validation) else None
        # kohya's repeat folders: an image comes `repeats` times an epoch, so it stands in the stream's
        # items that many times (the held-out images are measured once each, as they are)
        repeats = np.asarray(getattr(folder, "repeats", None) or [1] * len(folder), dtype=np.int64)
        if (repeats[training] != 1).any():
            total = int(repeats[training].sum())
            if total > MAX_EPOCH_SAMPLES:  # every process (and loader worker) holds this index
                raise ValueError(
                    f"the repeat folders make an epoch of {total} samples, more than the {MAX_EPOCH_SAMPLES} "
                    "pictor streams; lower the repeats (a folder named like a year, '2024_trip', is 2024 "
                    "repeats in kohya's naming too)"
                )
            training = np.repeat(training, repeats[training])
        self.training = training if len(validation) or len(training) != len(folder) else None
        if self.validation is not None:  # stand-ins for undecodable files stay on their side of the split
            parts = np.zeros(len(folder), dtype=np.int64)
            parts[self.validation] = 1
            folder.parts = parts.tolist()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Any]:
        item = self.folder[index]
        if "control" in item:  # a ControlNet's control picture, as uint8 [H, W, 3] like the image
            item["control"] = _uint8(item["control"])
        return _uint8(item.pop("image")), item["caption"], item

    def describe(self, index: int) -> tuple[tuple[int, int], str, Any]:
        """Item `index` as `__getitem__` gives it, without decoding the file: (height, width) in place of
        the pixels. For --cache-latents, whose table already holds the stand-in of a file known not to
        decode (the table's build met it), so the caption is taken from the same stand-in."""
        stand_in = next(iter(self.folder.stand_ins(index)), index)
        item = self.folder.item_info(stand_in)
        if self.folder.loss_mask is not None:  # read from its file: the table holds latents only
            item["mask"] = self.folder.load_mask(stand_in)
        w, h = item["bucket"]
        return (h, w), item["caption"], item


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """float [3, H, W] in [-1, 1] -> uint8 [H, W, 3], the exact inverse of the folder's conversion."""
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def data_fingerprint(ds: ImageCaptionDataset) -> dict[str, Any] | None:
    """What a resume compares: an image folder's items (paths, file sizes, captions) as a count and a
    SHA-256, since sample k of the stream depends on them all; None for the shapes world (always alike)."""
    folder = getattr(ds, "folder", None)
    if folder is None:
        return None
    digest = hashlib.sha256()
    for i, (path, caption) in enumerate(zip(folder.paths, folder.captions, strict=True)):
        line = f"{folder.rel_path(i)}\t{path.stat().st_size}\t{caption}"
        if getattr(folder, "controls", None):  # a ControlNet's control pictures are data too
            line += f"\t{folder.control_name(i)}\t{folder.controls[i].stat().st_size}"
        masks = getattr(folder, "masks", None)
        if masks:  # a mask folder's pictures are data too
            line += f"\t{masks[i].name}\t{masks[i].stat().st_size}" if masks[i] is not None else "\t-"
        repeats = getattr(folder, "repeats", None)
        if repeats and repeats[i] != 1:  # the stream follows them (a folder without any: as before)
            line += f"\t{repeats[i]}x"
        digest.update(f"{line}\n".encode())
    return {"images": len(folder), "sha256": digest.hexdigest()}


def data_change(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """A warning when a resumed run's data differs from its checkpoint's, else None."""
    if saved is None or now is None or saved == now:
        return None
    return (
        f"the data folder changed since this checkpoint ({saved['images']} images then, {now['images']} "
        "now, or their names, sizes, captions or repeats differ): the run goes on with the folder as it is, "
        "so its loss curve will differ from an uninterrupted run's"
    )


def default_workers(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # CPU training: rendering in-process is cheap next to the model, and cores are scarce
    # A small model on a GPU eats thousands of images per second: give the loaders the cores, shared
    # between the ranks of this machine, keeping one per rank for the training process itself.
    per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, per_rank - 1))
