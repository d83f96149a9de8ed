"""A LoKr update as an adapter of :class:`pictor.models.lora.LoRALinear`: ``scale * factor * kron(w1, w2) x``
without ever building the Kronecker product.

With ``w1 [a, b]`` and ``w2 [c, d]``, ``kron(w1, w2)[i c + k, j d + l] = w1[i, j] w2[k, l]``, so for an input
viewed as ``X [b, d]`` the output viewed as ``[a, c]`` is ``w1 X w2^T``: two small matrix products instead of
one with an ``[a c, b d]`` matrix (at FLUX.1 size a full-rank LoKr's product is as large as the weight).
Merging uses the dense product (float64), like LoRA adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pictor.models.lora_updates import KronPiece, KronUpdate

__all__ = ["KronAdapter"]


class KronAdapter(nn.Module):
    """A frozen LoKr update on one layer: its pieces (row ranges of the output) and the strength ``scale``."""

    def __init__(
        self, update: KronUpdate, scale: float, device: Any = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.out_features, self.in_features = update.shape
        self.offsets = [p.offset for p in update.pieces]
        self.factors = [p.factor for p in update.pieces]
        self.pieces = nn.ModuleList()
        for p in update.pieces:
            holder = nn.Module()
            for name in ("w1", "w2", "w2_a", "w2_b"):
                t = getattr(p, name)
                holder.register_buffer(name, None if t is None else t.to(device=device, dtype=dtype))
            self.pieces.append(holder)
        self.register_buffer("perm", None if update.perm is None else update.perm.to(device))

    def _piece_out(self, holder: nn.Module, x: Tensor) -> Tensor:
        w1 = holder.w1
        b = w1.shape[1]
        xr = x.reshape(-1, b, x.shape[-1] // b)  # [N, b, d]
        # [N, b, c]: w2 applied to each of the b rows of X (through its rank-r factors when decomposed)
        z = xr @ holder.w2.T if holder.w2 is not None else (xr @ holder.w2_b.T) @ holder.w2_a.T
        return torch.matmul(w1, z).reshape(x.shape[0], -1)  # [N, a, c] -> [N, a c]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        dtype = self.pieces[0].w1.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        outs = []
        row = 0
        for offset, factor, holder in zip(self.offsets, self.factors, self.pieces, strict=True):
            if offset > row:  # rows no piece updates (a part of a fused layer the file left alone)
                outs.append(flat.new_zeros(flat.shape[0], offset - row))
            piece = self._piece_out(holder, flat) * (self.scale * factor)
            outs.append(piece)
            row = offset + piece.shape[1]
        if row < self.out_features:
            outs.append(flat.new_zeros(flat.shape[0], self.out_features - row))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        if self.perm is not None:
            out = out[:, self.perm]
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """The update to the base weight at this scale, in float64 ``[out, in]``."""
        pieces = [
            KronPiece(offset, h.w1, h.w2, h.w2_a, h.w2_b, factor)
            for offset, factor, h in zip(self.offsets, self.factors, self.pieces, strict=True)
        ]
        update = KronUpdate(pieces, self.out_features, "", self.perm)
        return self.scale * update.delta().to(self.pieces[0].w1.device)
