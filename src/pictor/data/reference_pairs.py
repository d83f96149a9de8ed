"""Training pairs for reference conditioning: each image of a dataset with a reference picture of the
same content, in the item's info dict under "reference" (uint8 [H, W, 3]).

- The shapes world: another scene drawn from the same spec (the same objects, counts, relation and
  background, placed, sized and turned anew), so what carries over from the reference is *what* is in it,
  not where. Item i's reference depends only on (seed, i), like the image.
- An image folder: the image itself (an image-variation adapter, as FLUX.1 Redux is trained), since a
  folder does not say which other pictures show the same thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pictor.data.shapes import ShapesDataset, render, scene_from_spec

REFERENCE_STREAM = 1  # the random stream of the reference scenes, apart from the images' own


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
            info["reference"] = render(scene, self.ds.size, self.ds.supersample)
        else:
            info["reference"] = image
        return image, caption, info
