"""What the edit modules share: their error and the rounding of a scaled size to the model's multiple."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# A mask pixel is white (repaint) from this grey level up.
MASK_THRESHOLD = 128


def nearest_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A bool mask resized to width x height with nearest, so it stays a hard mask."""
    grey = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(grey.resize((width, height), Image.Resampling.NEAREST)) >= MASK_THRESHOLD


class EditError(ValueError):
    """An edit that cannot run as asked; the message says what to change."""


def scaled_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """(width, height) times ``scale``, each side rounded (halves up) to the nearest multiple of
    ``multiple``, at least one."""
    w, h = (max(multiple, math.floor(side * scale / multiple + 0.5) * multiple) for side in (width, height))
    return w, h
