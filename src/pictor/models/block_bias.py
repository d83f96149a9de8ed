"""Per-block attention biases: Regional-Prompting-FLUX's controls for regional attention
(`pictor.regional_attention`).

`Flux.forward`'s ``attn_mask`` is either one float bias for every block, or a `BlockBias`: the regional bias
(``masked``) in every k-th double block and every k-th single block (RPF's ``double_inject_blocks_interval``
and ``single_inject_blocks_interval``: block i is injected when ``i % interval == 0``), and the unmasked
bias (``base``) in the others; in injected blocks a `base_ratio` above 0 blends the image tokens'
attention output with the unmasked one's (RPF's ``hidden_states*(1-base_ratio) + hidden_states_base*
base_ratio``), as `BlendedBias` computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BlendedBias", "BlockBias"]


@dataclass(frozen=True)
class BlendedBias:
    """One block's attention under `masked`, whose rows from `start` on (the image tokens and those after
    them) are blended with their attention under `base` by `ratio`: ``(1 - ratio) * masked + ratio * base``
    (RPF's formula, computed as ``torch.lerp``, which is the same blend and exact where both agree)."""

    masked: Tensor
    base: Tensor
    ratio: float
    start: int

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v ``[B, H, L, D]`` (RoPE applied) -> ``[B, H, L, D]``."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masked)
        s = self.start
        base = F.scaled_dot_product_attention(q[:, :, s:], k, v, attn_mask=self.base[:, :, s:])
        out[:, :, s:] = torch.lerp(out[:, :, s:], base, self.ratio)
        return out


@dataclass(frozen=True)
class BlockBias:
    """The attention biases ``[B or 1, 1, S, S]`` of one forward's blocks: `masked` in the double blocks
    ``i % double_interval == 0`` and the single blocks ``j % single_interval == 0``, `base` in the others;
    `base_ratio` > 0 blends the masked blocks' rows from `start` on with `base`'s (`BlendedBias`)."""

    masked: Tensor
    base: Tensor
    double_interval: int = 1
    single_interval: int = 1
    base_ratio: float = 0.0
    start: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.masked.shape

    def _pick(self, injected: bool) -> Tensor | BlendedBias:
        if not injected:
            return self.base
        if self.base_ratio > 0:
            return BlendedBias(self.masked, self.base, self.base_ratio, self.start)
        return self.masked

    def double(self, i: int) -> Tensor | BlendedBias:
        return self._pick(i % self.double_interval == 0)

    def single(self, j: int) -> Tensor | BlendedBias:
        return self._pick(j % self.single_interval == 0)

    def cast(self, dtype: torch.dtype) -> BlockBias:
        return BlockBias(
            self.masked.to(dtype),
            self.base.to(dtype),
            self.double_interval,
            self.single_interval,
            self.base_ratio,
            self.start,
        )

    def rows(self, rows: Tensor) -> BlockBias:
        """The biases of the batch rows at `rows` (a bias of batch 1 is shared, so kept)."""

        def pick(t: Tensor) -> Tensor:
            return t[rows] if t.shape[0] > 1 else t

        return BlockBias(
            pick(self.masked),
            pick(self.base),
            self.double_interval,
            self.single_interval,
            self.base_ratio,
            self.start,
        )
