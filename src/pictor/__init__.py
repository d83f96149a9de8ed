"""pictor: text-to-image generation with a FLUX-style rectified-flow transformer.

``pictor.load(model)`` returns a ready :class:`pictor.pipeline.Pipeline`. Heavy modules are imported on first
use, so ``import pictor`` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pictor.loading import load
    from pictor.pipeline import GenerationRequest, Pipeline

__all__ = ["GenerationRequest", "Pipeline", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from pictor.loading import load

        return load
    if name in ("Pipeline", "GenerationRequest"):
        from pictor import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'pictor' has no attribute '{name}'")
