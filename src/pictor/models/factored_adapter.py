"""A LyCORIS LoKr or LoHa update as an adapter of :class:`pictor.models.lora_layers.LoRALinear`, run from its
factors.

LoKr's ``kron(w1, w2)`` is computed as ``w1 X w2^T`` on the input viewed as a matrix X, never as the product
(at FLUX.1 size a full-rank LoKr's product is as large as the weight); LoHa runs as the rank-r1 r2 LoRA it is,
one rank of w1 at a time, so only its factors are held (see :mod:`pictor.models.lora_updates`). Merging uses
the dense product (float64), like LoRA adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pictor.models.lora_updates import PIECE_KINDS, FactoredUpdate, Piece

__all__ = ["FactoredAdapter"]


class FactoredAdapter(nn.Module):
    """A frozen LoKr or LoHa update on one layer: its pieces (row ranges of the output) and the strength
    ``scale``."""

    def __init__(
        self, update: FactoredUpdate, scale: float, device: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.kind = update.kind
        self.rank = update.rank
        self.out_features, self.in_features = update.shape
        self.offsets = [p.offset for p in update.pieces]
        self.factors = [p.factor for p in update.pieces]
        self.holders = nn.ModuleList()
        for p in update.pieces:
            holder = nn.Module()
            for name in p.fields:
                t = getattr(p, name)
                value = None if t is None else t.to(device=device, dtype=dtype)
                # not in state dicts: base checkpoints load into a model carrying it (like a LoRA's)
                holder.register_buffer(name, value, persistent=False)
            self.holders.append(holder)
        self.register_buffer(
            "perm", None if update.perm is None else update.perm.to(device), persistent=False
        )

    def _pieces(self) -> list[Piece]:
        kind = PIECE_KINDS[self.kind]
        return [
            kind(offset, *(getattr(h, name) for name in kind.fields), factor)  # type: ignore[arg-type]
            for offset, factor, h in zip(self.offsets, self.factors, self.holders, strict=True)
        ]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        pieces = self._pieces()
        flat = x.reshape(-1, x.shape[-1]).to(pieces[0].tensors()[0].dtype)
        outs = []
        row = 0
        for piece in pieces:
            if piece.offset > row:  # rows no piece updates (a part of a fused layer the file left alone)
                outs.append(flat.new_zeros(flat.shape[0], piece.offset - row))
            outs.append(piece.apply(flat))
            row = piece.offset + piece.rows
        if row < self.out_features:
            outs.append(flat.new_zeros(flat.shape[0], self.out_features - row))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        if self.perm is not None:
            out = out[:, self.perm]
        return (out * self.scale).reshape(*lead, self.out_features).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """The update to the base weight at this scale, in float64 ``[out, in]``."""
        return self.scale * FactoredUpdate(self._pieces(), self.out_features, "", self.perm).delta()
