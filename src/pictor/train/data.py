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
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pictor.data.captions import augment_tags
from pictor.data.repeat_folders import MAX_EPOCH_SAMPLES
from pictor.flow import sample_t
from pictor.notices import PictorWarning
from pictor.train.bucket_stream import bucket_stream, folder_view
from pictor.train.config import ConfigError
from pictor.train.holdout_split import split_indices

# Separate seed streams, so that e.g. the noise of sample k is unrelated to its caption-dropout draw.
STREAM_TRAIN = 1
STREAM_HOLDOUT = 2
STREAM_AUGMENT = 3  # a stream of its own: augmenting leaves a sample's noise and timestep as they were
# Held-out items of an infinite dataset (previews, latent statistics) come from far beyond any run.
HOLDOUT_OFFSET = 10**12


class ImageCaptionDataset(Protocol):
    """What the trainer needs: ``ds[i] -> (uint8 [H, W, 3], caption, spec_or_metadata)``.

    Infinite datasets (the shapes world) define no ``__len__``; finite ones (image folders) do, and the
    stream walks them epoch by epoch in a seeded order.
    """

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Any]: ...


@dataclass(frozen=True)
class Augment:
    """Folder data augmentation, applied to stream sample k by `_StreamItems` (so a pure function of
    (seed, k)). Every sample draws its mirror bit first, whether or not `flip` is on, so turning the flip
    on or off leaves the caption draws of each sample as they were."""

    flip: bool = False  # mirror about half of the images left to right (and their layouts with them)
    shuffle: bool = False  # shuffle the comma-separated tags of the caption
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped
    tag_dropout: float = 0.0  # drop each tag past keep_tokens with this probability

    @property
    def active(self) -> bool:
        return self.flip or self.shuffle or self.tag_dropout > 0.0

    def mirrors(self, seed: int, k: int) -> bool:
        """Whether stream sample k is mirrored (the first draw of its generator, as in `__call__`)."""
        return self.flip and bool(np.random.default_rng([seed, STREAM_AUGMENT, k]).random() < 0.5)

    def __call__(
        self, seed: int, k: int, image: np.ndarray | None, caption: str, layout: list[dict[str, Any]] | None
    ) -> tuple[np.ndarray | None, str, list[dict[str, Any]] | None]:
        """The sample's image (None stays None: a cached latent comes mirrored), caption and layout."""
        rng = np.random.default_rng([seed, STREAM_AUGMENT, k])
        mirror = rng.random() < 0.5  # drawn even with flip off, so the caption draws come after it alike
        if mirror and self.flip:
            if image is not None:
                image = np.ascontiguousarray(image[:, ::-1])  # [H, W, 3]: the W axis reversed
            layout = _mirror_layout(layout)
        caption = augment_tags(
            caption, rng, shuffle=self.shuffle, keep_tokens=self.keep_tokens, tag_dropout=self.tag_dropout
        )
        return image, caption, layout


def _mirror_layout(layout: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Boxes (fractions [x0, y0, x1, y1]) of a mirrored image; their phrases stay as written."""
    if layout is None:
        return None
    return [
        {**item, "box": [1.0 - item["box"][2], item["box"][1], 1.0 - item["box"][0], item["box"][3]]}
        for item in layout
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


def dataset_length(ds: ImageCaptionDataset) -> int | None:
    try:
        return len(ds)  # type: ignore[arg-type]
    except TypeError:
        return None


def stream_index(ds_len: int | None, k: int, seed: int) -> int:
    """Dataset index of stream sample k: identity for infinite data, a seeded permutation per epoch else."""
    if ds_len is None:
        return k
    epoch, offset = divmod(k, ds_len)
    perm = np.random.default_rng([seed, STREAM_TRAIN, epoch]).permutation(ds_len)
    return int(perm[offset])


def holdout_index(ds_len: int | None, i: int) -> int:
    """Items for previews and statistics: far outside the training stream, or the first of a folder."""
    return HOLDOUT_OFFSET + i if ds_len is None else i % ds_len


def sample_generator(seed: int, k: int, stream: int = STREAM_TRAIN) -> torch.Generator:
    """A CPU generator for the random numbers of stream sample k (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, stream, k]).generate_state(1, np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))


def rank_indices(position: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Stream indices of this rank's micro-batch at data position `position`.

    The global micro-batch is position .. position + batch_size * world_size - 1; rank r takes every
    world_size-th of them starting at r, so ranks never share a sample and together cover all.
    """
    return [position + rank + world_size * j for j in range(batch_size)]


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> uint8 [B, 3, H, W] (converted to float on the device, 4x less copying)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [-1, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class SampleDraws:
    """The random numbers of one sample, drawn from its own generator in a fixed order: caption dropout
    (t2i), timestep (t2i), then Gaussian noise of `noise_shape`. A pure function of (seed, k), evaluated
    in the data loader's workers so the training process does not spend time on it."""

    seed: int
    noise_shape: tuple[int, ...]
    timesteps: bool = False
    caption_dropout: float = 0.0
    t_kind: str = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0  # "shift" / "flux_shift" timesteps: see pictor.flow.sample_t
    # Pixels per latent: with it, the noise takes each image's own latent size (aspect-ratio buckets);
    # noise_shape's first entry is the latent channels. 0: always noise_shape.
    latent_factor: int = 0

    def __call__(self, k: int, image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed, k)
        shape = self.noise_shape
        if self.latent_factor and image_hw is not None:
            shape = (shape[0], image_hw[0] // self.latent_factor, image_hw[1] // self.latent_factor)
        out = {}
        if self.timesteps:
            out["drop"] = torch.rand(1, generator=g) < self.caption_dropout
            out["t"] = sample_t(
                1,
                self.t_kind,  # type: ignore[arg-type]
                generator=g,
                mean=self.t_mean,
                std=self.t_std,
                shift=self.t_shift,
            )
        out["noise"] = torch.randn(shape, generator=g)
        return out


class Batch:
    """One rank's micro-batch: images uint8 [B, 3, H, W] (None when cached latents stand for them),
    captions, the stream index of each sample, and its random numbers stacked (e.g. draws["noise"]
    [B, ...], draws["t"] [B], draws["drop"] [B] bool)."""

    def __init__(
        self,
        images: torch.Tensor | None,
        captions: list[str],
        indices: list[int],
        draws: dict[str, torch.Tensor] | None = None,
        layouts: list[list[dict[str, Any]] | None] | None = None,
        references: torch.Tensor | None = None,
        reference_captions: list[str] | None = None,
        controls: torch.Tensor | None = None,
    ) -> None:
        self.images = images
        self.captions = captions
        self.indices = indices
        self.draws = draws or {}
        # Per sample: the image's boxes with phrases where the data knows them (the shapes world), else None.
        self.layouts = layouts if layouts is not None else [None] * len(indices)
        # uint8 [B, 3, H, W]: each sample's reference picture, where the data pairs one with each image
        # (the reference stage's data), and a caption of each; else None.
        self.references = references
        self.reference_captions = reference_captions
        # uint8 [B, 3, H, W]: each sample's control picture where the data has them (a ControlNet's folder
        # with --control-dir), cropped and mirrored with its image; else None.
        self.controls = controls

    def __len__(self) -> int:
        return len(self.indices)


# (image (None when a cached latent stands for it), caption, stream index, random draws, layout or None,
# (reference picture, its caption) or None, control picture or None)
_Reference = tuple[np.ndarray | None, str]  # the picture is None when its cached latent stands for it
_Item = tuple[
    np.ndarray | None,
    str,
    int,
    dict[str, torch.Tensor],
    list[dict[str, Any]] | None,
    _Reference | None,
    np.ndarray | None,
]


class _StreamItems(Dataset):
    """Map-style view of the stream for DataLoader workers: item k is stream sample k."""

    def __init__(
        self,
        ds: ImageCaptionDataset,
        seed: int,
        draws: SampleDraws | None,
        group: int = 1,
        latents: Mapping[tuple[int, bool], torch.Tensor] | None = None,
    ) -> None:
        self.ds, self.seed, self.len, self.draws = ds, seed, dataset_length(ds), draws
        self.latents = latents  # --cache-latents: (dataset index, mirrored) -> latent mean
        # With the cache, a folder's samples are described rather than decoded (the folder view and the
        # reference stage's pairs both describe their items; the shapes world has no cache).
        self.describe = getattr(ds, "describe", None) if latents is not None else None
        self.augment = augmentation(ds)
        # --validation-split: the stream walks the training items only (dataset indices), else all.
        self.subset = training_items(ds)
        # Bucketed folder data: each global micro-batch (`group` samples) is one bucket's images.
        self.buckets = bucket_stream(ds, group, seed, self.subset)

    def __getitem__(self, k: int) -> _Item:
        length = len(self.subset) if self.subset is not None else self.len
        j = self.buckets.index(k) if self.buckets is not None else stream_index(length, k, self.seed)
        index = int(self.subset[j]) if self.subset is not None else j
        if self.describe is not None:
            image, (hw, caption, meta) = None, self.describe(index)
        else:
            image, caption, meta = self.ds[index]
            hw = image.shape[:2]
        layout = meta.get("layout") if isinstance(meta, dict) else None
        reference = meta.get("reference") if isinstance(meta, dict) else None
        control = meta.pop("control", None) if isinstance(meta, dict) else None
        mask = meta.pop("mask", None) if isinstance(meta, dict) else None  # uint8 [1, H, W]
        if self.augment is not None and self.augment.mirrors(self.seed, k):  # mirrored with the image, below
            control = np.ascontiguousarray(control[:, ::-1]) if control is not None else None
            mask = mask.flip(-1) if mask is not None else None
        if self.augment is not None:
            # The reference picture (the reference stage's) stays as it is: like the shapes world's
            # pairs, it then carries what is in the image rather than where.
            image, caption, layout = self.augment(self.seed, k, image, caption, layout)
        draws = self.draws(k, hw) if self.draws is not None else {}
        if mask is not None:  # a micro-batch is one bucket's, so the masks stack like the noise
            draws["mask"] = mask
        if self.latents is not None:
            mirrored = self.augment.mirrors(self.seed, k) if self.augment is not None else False
            draws["latent"] = self.latents[(index, mirrored)]
            if reference is not None:  # a folder's reference picture is its image, never mirrored
                draws["reference_latent"] = self.latents[(index, False)]
        return image, caption, k, draws, layout, reference, control


def training_items(ds: ImageCaptionDataset) -> np.ndarray | None:
    """The dataset indices the training stream walks when a validation split holds some out, else None."""
    view = folder_view(ds)
    return view.training if view is not None else None


def validation_items(ds: ImageCaptionDataset) -> np.ndarray | None:
    """The dataset indices a validation split holds out of training (--validation-split), else None."""
    view = folder_view(ds)
    return view.validation if view is not None else None


def augmentation(ds: ImageCaptionDataset) -> Augment | None:
    """The augmentation `make_dataset` gave the data (looking through a stage's wrappers, such as the
    reference stage's ReferencePairs), or None when there is none."""
    view = folder_view(ds)
    return view.augment if view is not None else None


def _collate(items: list[_Item]) -> Batch:
    draws = {key: torch.cat([i[3][key].unsqueeze(0) for i in items]) for key in items[0][3]}
    if "t" in draws:
        draws["t"], draws["drop"] = draws["t"].reshape(-1), draws["drop"].reshape(-1)
    images = [i[0] for i in items if i[0] is not None]
    if images and len(images) != len(items):
        raise ValueError("a micro-batch mixed decoded images with cached latents; that is a pictor bug")
    return Batch(
        to_tensor(images) if images else None,
        [i[1] for i in items],
        [i[2] for i in items],
        draws,
        [i[4] for i in items],
        *_references([i[5] for i in items]),
        _controls([i[6] for i in items]),
    )


def _controls(controls: list[np.ndarray | None]) -> torch.Tensor | None:
    """The batch's control pictures, where every sample has one."""
    if all(c is None for c in controls):
        return None
    if any(c is None for c in controls):
        raise ValueError(
            "a micro-batch mixed samples with and without control pictures; that is a pictor bug"
        )
    return to_tensor([c for c in controls if c is not None])


def _references(refs: list[_Reference | None]) -> tuple[torch.Tensor | None, list[str] | None]:
    """The batch's reference pictures and captions; no pictures when cached latents stand for them."""
    if any(r is None for r in refs):
        return None, None
    pairs = [r for r in refs if r is not None]
    pictures = [picture for picture, _ in pairs if picture is not None]
    if pictures and len(pictures) != len(pairs):
        raise ValueError("a micro-batch mixed reference pictures with cached latents; that is a pictor bug")
    return (to_tensor(pictures) if pictures else None), [caption for _, caption in pairs]


class _MicroBatches:
    """Batch sampler: this rank's index lists from a data position on, forever (order is fixed)."""

    def __init__(self, position: int, batch_size: int, rank: int, world_size: int) -> None:
        self.position, self.batch_size, self.rank, self.world_size = position, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.position
        while True:
            yield rank_indices(pos, self.batch_size, self.rank, self.world_size)
            pos += self.batch_size * self.world_size


def micro_batches(
    ds: ImageCaptionDataset,
    seed: int,
    position: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    draws: SampleDraws | None = None,
    latents: Mapping[tuple[int, bool], torch.Tensor] | None = None,
) -> Iterator[Batch]:
    """This rank's micro-batches from `position` on. Workers prefetch, but DataLoader keeps the order, so
    the stream is the same with any number of workers. With `latents` (--cache-latents) each sample's
    draws carry its stored latent mean as "latent"."""
    loader = DataLoader(
        _StreamItems(ds, seed, draws, batch_size * world_size, latents),
        batch_sampler=_MicroBatches(position, batch_size, rank, world_size),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return iter(loader)


def default_workers(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # CPU training: rendering in-process is cheap next to the model, and cores are scarce
    # A small model on a GPU eats thousands of images per second: give the loaders the cores, shared
    # between the ranks of this machine, keeping one per rank for the training process itself.
    per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, per_rank - 1))
