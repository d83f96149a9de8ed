"""Training pairs for reference conditioning: each image of a dataset with a reference picture of the
same content, in the item's info dict under "reference": (uint8 [H, W, 3], a caption of the picture).

- The shapes world: another scene drawn from the same spec (the same objects, counts, relation and
  background, placed, sized and turned anew), so what carries over from the reference is *what* is in it,
  not where. Item i's reference depends only on (seed, i), like the image. Its caption is the spec's
  caption drawn with a fixed seed: one wording per content, where the image's own caption is one of many.
- An image folder: the image itself (an image-variation adapter, as FLUX.1 Redux is trained), since a
  folder does not say which other pictures show the same thing, with its own caption.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pictor.data.shapes import ShapesDataset, render, scene_from_spec
from pictor.data.shapes import caption as shapes_caption

REFERENCE_STREAM = 1  # the random stream of the reference scenes, apart from the images' own
CAPTION_SEED = 0  # the one wording of each spec that reference captions use


class ReferencePairs:
    """A dataset whose items carry a reference picture; lengths and the folder pass through."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.folder = getattr(ds, "folder", None)

    def __len__(self) -> int:
        return len(self.ds)  # TypeError for the infinite shapes world, as the dataset itself

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, dict[str, Any]]:
        image, caption, meta = self.ds[index]
        info = dict(meta) if isinstance(meta, dict) else {}
        if isinstance(self.ds, ShapesDataset):
            rng = np.random.default_rng([self.ds.seed, int(index), REFERENCE_STREAM])
            scene = scene_from_spec(info, rng)
            picture = render(scene, self.ds.size, self.ds.supersample)
            info["reference"] = (picture, shapes_caption(info, np.random.default_rng(CAPTION_SEED)))
        else:
            info["reference"] = (image, caption)
        return image, caption, info

    def describe(self, index: int) -> tuple[tuple[int, int], str, dict[str, Any]]:
        """An image folder's item as `__getitem__` gives it but without pixels ((height, width) in their
        place), for --cache-latents: the reference picture is the image itself, whose cached latent stands
        for it, so it is (None, caption)."""
        describe = getattr(self.ds, "describe", None)
        if describe is None:  # the shapes world draws its pictures; it has no latent cache to read
            raise TypeError(f"{type(self.ds).__name__} items cannot be described without their pixels")
        hw, caption, meta = describe(index)
        return hw, caption, {**meta, "reference": (None, caption)}
