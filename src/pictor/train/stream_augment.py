"""Folder data augmentation per stream sample (kohya's --flip_aug, --shuffle_caption, --keep_tokens,
--caption_tag_dropout_rate): the mirror bit and the caption's tags of sample k, from a generator seeded by
(run seed, STREAM_AUGMENT, k), never by a dataset index.

Separate from `pictor.train.data` because it is one small rule with its own stream of random numbers,
applied by the batches (`pictor.train.micro_batches`) rather than by the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pictor.data.captions import augment_tags
from pictor.train.sample_stream import STREAM_AUGMENT


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
