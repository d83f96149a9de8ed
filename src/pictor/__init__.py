"""pictor: text-to-image generation with a FLUX-style rectified-flow transformer."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
