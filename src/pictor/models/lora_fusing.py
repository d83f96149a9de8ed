"""Updates of the parts of one fused FLUX.1 layer -> one update of the layer. diffusers splits FLUX's
fused projections (q, k, v and, in single blocks, the MLP input); a LoRA on the parts becomes a LoRA on
the whole with A stacked and B block-diagonal (or one A kept where the parts share it), LoHa/LoKr pieces
placed at their rows, DoRA scales per output row kept on their rows; and diffusers' (scale, shift)
modulation rows swapped back to FLUX's (shift, scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pictor.models.lora_updates import DoRAUpdate, FactoredUpdate, LayerUpdate, LoRAError, LoRAUpdate, Piece


def _fuse(parts: dict[int, tuple[str, Tensor, Tensor, float]], sizes: list[int], path: str) -> LoRAUpdate:
    """Split parts (index -> key, A, B, alpha) -> one update of the fused layer, scales folded into B."""
    keys = [p[0] for p in parts.values()]
    for i, (key, _a, b, _alpha) in parts.items():
        if b.shape[0] != sizes[i]:
            raise LoRAError(
                f"LoRA key '{key}': has {b.shape[0]} output rows, but part {i} of '{path}' has {sizes[i]}"
            )
    scaled = {i: (a.float(), b.float() * (alpha / a.shape[0])) for i, (_k, a, b, alpha) in parts.items()}
    first_a = next(iter(scaled.values()))[0]
    if all(a.shape == first_a.shape and torch.equal(a, first_a) for a, _ in scaled.values()):
        # The parts share one A (a fused LoRA that a converter split): keep the rank, stack the B's.
        rank = first_a.shape[0]
        rows = [
            scaled[i][1] if i in scaled else first_a.new_zeros(size, rank) for i, size in enumerate(sizes)
        ]
        return LoRAUpdate(first_a, torch.cat(rows), float(rank), keys[0])
    a_cat = torch.cat([a for a, _ in scaled.values()])  # [sum r_i, in]
    b_diag = first_a.new_zeros(sum(sizes), a_cat.shape[0])
    col = 0
    for i, (a, b) in scaled.items():
        row = sum(sizes[:i])
        b_diag[row : row + sizes[i], col : col + a.shape[0]] = b
        col += a.shape[0]
    return LoRAUpdate(a_cat, b_diag, float(a_cat.shape[0]), keys[0])


def swapped_halves(update: LayerUpdate) -> LayerUpdate:
    """diffusers' (scale, shift) output rows -> FLUX's (shift, scale)."""
    if isinstance(update, DoRAUpdate):
        magnitude = update.magnitude
        if update.on_out:
            scale, shift = magnitude.chunk(2, dim=0)
            magnitude = torch.cat([shift, scale])
        inner = swapped_halves(update.inner)
        assert not isinstance(inner, DoRAUpdate)
        return DoRAUpdate(inner, magnitude, update.on_out)
    if isinstance(update, LoRAUpdate):
        scale, shift = update.B.chunk(2, dim=0)
        return LoRAUpdate(update.A, torch.cat([shift, scale]), update.alpha, update.source)
    half = update.out_features // 2
    perm = torch.cat([torch.arange(half, update.out_features), torch.arange(half)])
    return FactoredUpdate(update.pieces, update.out_features, update.source, perm)


def fuse_parts(parts: dict[int, LayerUpdate], sizes: list[int], path: str) -> LayerUpdate:
    """Updates of parts of a fused layer (q, k, v ...) -> one update of the layer. Parts with DoRA scales
    per output row keep them on their rows (the norm of a row is the row's alone); a part's DoRA per input
    column spans only that part's rows, which the fused layer cannot express, so it is refused."""
    dora = {i: u for i, u in parts.items() if isinstance(u, DoRAUpdate)}
    if dora:
        column = next((u for u in dora.values() if not u.on_out), None)
        if column is not None:
            raise LoRAError(
                f"LoRA key '{column.source}': a DoRA scale per input column on a part of '{path}' (diffusers "
                "splits q/k/v) cannot be applied to FLUX's fused layer; only per-output-row DoRA scales can"
            )
        inner = fuse_parts(
            {i: u.inner if isinstance(u, DoRAUpdate) else u for i, u in parts.items()}, sizes, path
        )
        assert not isinstance(inner, DoRAUpdate)
        magnitude = torch.full((sum(sizes), 1), float("nan"))
        for i, u in dora.items():
            row = sum(sizes[:i])
            magnitude[row : row + sizes[i]] = u.magnitude
        return DoRAUpdate(inner, magnitude, on_out=True)
    kinds = {u.kind if isinstance(u, FactoredUpdate) else "lora" for u in parts.values()}
    if len(kinds) > 1:
        raise LoRAError(
            f"LoRA key '{next(iter(parts.values())).source}': the parts of '{path}' mix "
            f"{' and '.join(sorted(kinds))} updates"
        )
    widths = {u.shape[1] for u in parts.values()}
    if len(widths) > 1:
        keys = ", ".join(f"'{u.source}' ({u.shape[1]})" for u in parts.values())
        raise LoRAError(f"the parts of '{path}' take inputs of different widths: {keys}; the file is broken")
    if kinds == {"lora"}:
        lora = {i: u for i, u in parts.items() if isinstance(u, LoRAUpdate)}
        return _fuse({i: (u.source, u.A, u.B, u.alpha) for i, u in lora.items()}, sizes, path)
    pieces: list[Piece] = []
    for i, u in parts.items():
        assert isinstance(u, FactoredUpdate) and len(u.pieces) == 1 and u.perm is None
        piece = u.pieces[0]
        if piece.rows != sizes[i]:
            raise LoRAError(
                f"LoRA key '{u.source}': has {piece.rows} output rows, but part {i} of '{path}' has "
                f"{sizes[i]}"
            )
        piece.offset = sum(sizes[:i])
        pieces.append(piece)
    return FactoredUpdate(pieces, sum(sizes), next(iter(parts.values())).source)
