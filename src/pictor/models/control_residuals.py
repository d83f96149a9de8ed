"""What a ControlNet hands the FLUX.1 transformer: one image-stream residual per ControlNet block.

A ControlNet (InstantX's, Shakker-Labs' Union, XLabs') runs a few FLUX.1 blocks of its own on the noisy
latents plus a control picture and returns, per block, a residual for the image tokens. The transformer
adds them *after* its blocks, spreading the few residuals over its many blocks the way diffusers'
``FluxTransformer2DModel`` does: double block ``i`` takes residual ``i // ceil(depth / n)`` (or
``i % n`` for XLabs' ControlNets, trained that way), and the single blocks likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["ControlResiduals"]


@dataclass(frozen=True)
class ControlResiduals:
    """``double[k]`` / ``single[k]``: ``[B, N, hidden]`` residuals for the image tokens after the blocks
    they are spread over; ``repeat``: cycle the double residuals over the blocks (XLabs) instead of
    stretching them."""

    double: Sequence[Tensor]
    single: Sequence[Tensor]
    repeat: bool = False

    def scaled(self, scale: float) -> ControlResiduals:
        return ControlResiduals(
            [r * scale for r in self.double], [r * scale for r in self.single], self.repeat
        )

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        """Several ControlNets at once: residuals for the same blocks add up. Spread each over the model's
        blocks first (`spread`) when their numbers of blocks differ; a side with no residuals adds none."""

        def add(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
            if not a or not b:
                return list(a or b)
            if len(a) != len(b):
                raise ValueError(
                    f"ControlNet residuals for {len(a)} and {len(b)} blocks cannot be added; spread both "
                    "over the model's blocks first"
                )
            return [x + y for x, y in zip(a, b, strict=True)]

        if self.repeat != other.repeat:
            raise ValueError("ControlNet residuals that cycle and that stretch must be spread before adding")
        return ControlResiduals(add(self.double, other.double), add(self.single, other.single), self.repeat)

    def spread(self, depth: int, depth_single: int) -> ControlResiduals:
        """One residual per block of a model with `depth` double and `depth_single` single blocks (the same
        tensors, referenced again), so ControlNets of different sizes can be added block by block."""
        double = [self.after_double(i, depth) for i in range(depth)] if self.double else []
        single = [self.after_single(j, depth_single) for j in range(depth_single)] if self.single else []
        return ControlResiduals([r for r in double if r is not None], [r for r in single if r is not None])

    def rows(self, index: Tensor) -> ControlResiduals:
        """The residuals of some batch rows (the first-block cache runs only the rows that changed)."""
        return ControlResiduals([r[index] for r in self.double], [r[index] for r in self.single], self.repeat)

    def tiled(self, times: int) -> ControlResiduals:
        """The residuals for a batch repeated `times` over (classifier-free guidance's negative half reuses
        the positive half's, as diffusers' ``FluxControlNetPipeline`` does)."""
        if times == 1:
            return self
        return ControlResiduals(
            [r.repeat(times, 1, 1) for r in self.double],
            [r.repeat(times, 1, 1) for r in self.single],
            self.repeat,
        )

    def after_double(self, block: int, depth: int) -> Tensor | None:
        """The residual to add after double block `block` of a transformer with `depth` double blocks."""
        if not self.double:
            return None
        if self.repeat:
            return self.double[block % len(self.double)]
        return self.double[block // math.ceil(depth / len(self.double))]

    def after_single(self, block: int, depth: int) -> Tensor | None:
        """The residual to add after single block `block` of `depth` single blocks."""
        if not self.single:
            return None
        return self.single[block // math.ceil(depth / len(self.single))]
