"""Tiled denoising (MultiDiffusion, Bar-Tal et al. 2023; A1111's "Tiled Diffusion", ComfyUI's
TiledDiffusion): at each sampler step the transformer sees overlapping windows of the image's tokens, one at a
time, and each token's velocity is the weighted mean of the windows' that hold it.

Why: a transformer call's memory grows with its token count, so a large image (a hires fix's second pass, an
img2img of a big picture) can be refined in windows the device holds. Time is another matter: every window
also carries the prompt's tokens (and a Kontext context's), and shared tokens are computed once per window
holding them, so windows save time only where attention's square of the token count dominates (by a rough
count of operations, FLUX.1 beyond about 3000 pixels a side). Each window keeps its tokens' absolute
positions (RoPE ids), so it knows where it lies. Windows fade in over the overlap (weights ramp up from the
window's inner edges), so their seams blend; at the image's border a window has full weight. A window only
sees itself, so the whole image's composition is not coordinated across windows: it is for refining (low
strength) and for textures, not for composing a large picture from noise. A pass no larger than one window
runs whole, exactly as without tiles.

Sizes here are in tokens (one token = the model's `patch` pixels a side); `pictor.generation_settings`
checks the pixel sizes a request gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenWindow:
    """One window: the flat indices of its tokens in the packed sequence (row-major over the token grid)
    and each token's weight, the weights of all windows holding a token summing to 1."""

    index: Tensor  # long [n]
    weight: Tensor  # float32 [n]


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Where windows of `window` tokens start along a side of `length` tokens, `overlap` tokens shared by
    neighbours at least: evenly spread, the first at 0 and the last ending at the side's end."""
    if length <= window:
        return [0]
    stride = window - overlap
    count = -(-(length - window) // stride) + 1  # the fewest windows that cover the side
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def _ramp(window: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """One side's weights: 1 inside, rising linearly over `overlap` tokens from an inner edge (never 0, so
    every token keeps some weight); flat where the window meets the image's border."""
    w = torch.ones(window)
    if overlap > 0:
        up = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, window)
        if not at_start:
            w[:n] = torch.minimum(w[:n], up[:n])
        if not at_end:
            w[window - n :] = torch.minimum(w[window - n :], up[:n].flip(0))
    return w


def plan_windows(
    rows: int, columns: int, window: int, overlap: int, device: torch.device | str = "cpu"
) -> list[TokenWindow] | None:
    """The windows over a rows x columns token grid, or None when one window covers it (the pass runs
    whole). `window`: its side in tokens; `overlap`: tokens neighbours share, at most half the window.
    The indices and weights are made on `device` once, not copied there at every call of every step."""
    if rows <= window and columns <= window:
        return None
    height, width = min(rows, window), min(columns, window)
    row_starts = window_starts(rows, height, overlap)
    column_starts = window_starts(columns, width, overlap)
    total = torch.zeros(rows, columns)
    placed: list[tuple[int, int, Tensor]] = []
    for i, top in enumerate(row_starts):
        wy = _ramp(height, overlap, i == 0, i == len(row_starts) - 1)
        for j, left in enumerate(column_starts):
            wx = _ramp(width, overlap, j == 0, j == len(column_starts) - 1)
            weight = wy[:, None] * wx[None, :]
            total[top : top + height, left : left + width] += weight
            placed.append((top, left, weight))
    grid = torch.arange(rows * columns).reshape(rows, columns)
    windows = []
    for top, left, weight in placed:
        share = weight / total[top : top + height, left : left + width]
        index = grid[top : top + height, left : left + width].reshape(-1)
        windows.append(TokenWindow(index=index.to(device), weight=share.reshape(-1).to(device)))
    return windows


def tiled_call(windows: list[TokenWindow], x: Tensor, call: Callable[[Tensor], Tensor]) -> Tensor:
    """[B, N, C] velocities: `call(index)` gives the velocity of the tokens at `index` ([B, n, C], computed
    from those tokens alone), blended over the windows in float32 and returned in x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for w in windows:
        out.index_add_(1, w.index, call(w.index).float() * w.weight[None, :, None])
    return out.to(x.dtype)
