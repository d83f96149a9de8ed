"""`--validation-split`: which images of a folder are held out of training, to measure a validation loss
on (pictor.train.validation). A seeded choice over the folder's sorted items, so a resumed run, every
rank and every worker hold out the same ones."""

from __future__ import annotations

import numpy as np

STREAM_VALIDATION = 5  # a seed stream of its own (pictor.train.data numbers 1 to 3, bucket_stream 4)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of n items, each ascending: round(n * fraction) of them,
    at least one when fraction > 0, held out; at least one left to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation split is a fraction in [0, 1), got {fraction}")
    held = 0 if fraction == 0 else max(1, round(n * fraction))
    if held >= n:
        raise ValueError(
            f"a validation split of {fraction} holds out {held} of {n} images, leaving none to train on: "
            "lower --validation-split or add images"
        )
    order = np.random.default_rng([seed, STREAM_VALIDATION]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])
