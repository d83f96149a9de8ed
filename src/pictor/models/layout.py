"""Layout conditioning: boxes with phrases ("a red circle" in the left half) steer where things go.

A small adapter beside a frozen Flux transformer, in the manner of GLIGEN (Li et al. 2023: grounding
tokens from a phrase embedding and a box, added to a frozen model through zero-initialised gates) and
ControlNet (a residual into every block, zero at the start). Here the grounding is dense, which a
small model learns much faster than attention over box tokens: every image token gets the mean of the
phrase features of the boxes that cover its cell, weighted by the covered fraction of the cell, plus a
learned "empty" feature for the part of the cell that no box covers (so a layout can also say where
nothing goes), and each transformer block adds a zero-initialised linear map of that to its image
stream. A new adapter changes nothing at all; without a layout the adapter is not called.

Boxes are fractions of the image, ``[x0, y0, x1, y1]`` with y growing downward; a box of zero area
(the padding of a batch's shorter layouts) covers nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayoutParams:
    phrase_dim: int  # the text encoder's pooled vector, which embeds each phrase
    hidden_size: int  # the transformer's width
    num_blocks: int  # double + single blocks of the transformer: one residual each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayoutParams:
        try:
            return cls(int(d["phrase_dim"]), int(d["hidden_size"]), int(d["num_blocks"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"layout adapter params need integer phrase_dim, hidden_size and num_blocks, got {d}"
            ) from exc


def box_coverage(boxes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Fraction of each token cell that each box covers: ``boxes [B, N, 4]`` -> ``[B, N, grid_h * grid_w]``.

    Cells are the packed latent tokens in row-major order (as `pack_latents`); cell (i, j) spans
    x in [j / grid_w, (j + 1) / grid_w] and y in [i / grid_h, (i + 1) / grid_h]. Partial cover keeps
    sub-token precision: a box edge inside a cell gives that cell a partial weight.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4] (x0, y0, x1, y1), got {list(boxes.shape)}")
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # [B, N] each
    edges_x = torch.arange(grid_w + 1, device=boxes.device, dtype=torch.float32) / grid_w
    edges_y = torch.arange(grid_h + 1, device=boxes.device, dtype=torch.float32) / grid_h
    # Overlap of [x0, x1] with each cell's [left, right], as a fraction of the cell's width.
    ox = (torch.minimum(x1[..., None], edges_x[1:]) - torch.maximum(x0[..., None], edges_x[:-1])).clamp(min=0)
    oy = (torch.minimum(y1[..., None], edges_y[1:]) - torch.maximum(y0[..., None], edges_y[:-1])).clamp(min=0)
    cover = (oy * grid_h)[..., :, None] * (ox * grid_w)[..., None, :]  # [B, N, grid_h, grid_w]
    return cover.flatten(-2)


class LayoutAdapter(nn.Module):
    def __init__(self, params: LayoutParams) -> None:
        super().__init__()
        self.params = params
        d = params.hidden_size
        self.phrase_in = nn.Sequential(nn.Linear(params.phrase_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.empty = nn.Parameter(torch.zeros(d))  # the feature of space that no box covers
        self.block_out = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(params.num_blocks))

    @torch.no_grad()
    def init_weights(self) -> LayoutAdapter:
        """Xavier phrase MLP, zero outputs: a new adapter leaves the model's velocity exactly as it is."""
        for lin in self.phrase_in:
            if isinstance(lin, nn.Linear):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.empty, std=1.0)  # not zero: the outputs learn from empty space from the start
        for lin in self.block_out:
            nn.init.zeros_(lin.weight)
        return self

    def forward(self, phrases: Tensor, boxes: Tensor, grid_h: int, grid_w: int) -> list[Tensor]:
        """Per-block residuals for the image tokens: ``num_blocks`` tensors ``[B, grid_h * grid_w, hidden]``.

        phrases ``[B, N, phrase_dim]`` (pooled text embeddings of the box phrases); boxes ``[B, N, 4]``.
        """
        p = self.params
        if phrases.ndim != 3 or phrases.shape[-1] != p.phrase_dim:
            raise ValueError(f"phrases must be [B, N, {p.phrase_dim}], got {list(phrases.shape)}")
        if boxes.shape[:2] != phrases.shape[:2]:
            raise ValueError(
                f"boxes {list(boxes.shape)} and phrases {list(phrases.shape)} must have the same [B, N]"
            )
        cover = box_coverage(boxes, grid_h, grid_w).to(phrases.dtype)  # [B, N, L]
        feats = self.phrase_in(phrases)  # [B, N, hidden]
        # Mean over the covering boxes where they overlap; where only part of a cell is inside boxes, the
        # rest of it counts as empty space.
        total = cover.sum(dim=1, keepdim=True)  # [B, 1, L]
        weight = cover / total.clamp(min=1.0)
        tokens = torch.einsum("bnl,bnd->bld", weight, feats)  # [B, L, hidden]
        empty = (1.0 - total.clamp(max=1.0)).transpose(1, 2)  # [B, L, 1]
        tokens = tokens + empty * self.empty.to(tokens.dtype)
        return [lin(tokens) for lin in self.block_out]
