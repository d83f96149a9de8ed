"""Layout-adapter files and layouts from the command line: saving and loading adapters (no pickles),
turning layouts into the tensors an adapter takes.

A layout (checked by :func:`pictor.data.layouts.parse_layout`) is a list of
``{"box": [x0, y0, x1, y1], "phrase": "a red circle"}`` in fractions of the image. An adapter file is a
``.safetensors`` of :class:`pictor.models.layout.LayoutAdapter` weights whose header names its params and
the model it was trained on, so a mismatched pair is refused with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pictor.adapter_files import AdapterKind
from pictor.checkpoint import (
    sha256_file,
)
from pictor.data.layouts import LAYOUT_EXAMPLE, LayoutError, json_arg_text, parse_layout
from pictor.models.flux import FluxParams
from pictor.models.layout import LayoutAdapter, LayoutParams

__all__ = [
    "LAYOUT_FILE",
    "LayoutError",
    "check_adapter_fits",
    "layout_file_hash",
    "layout_params_for",
    "layout_residuals",
    "layout_tensors",
    "load_layout_adapter",
    "open_layout_adapter",
    "parse_layout",
    "read_layout_arg",
    "save_layout_adapter",
]

LAYOUT_FILE = "layout.safetensors"


def read_layout_arg(text: str) -> list[dict[str, Any]]:
    """A layout from the command line: a path to a JSON file, or the JSON itself."""
    return parse_layout(json_arg_text(text, "--layout", LAYOUT_EXAMPLE, LayoutError))


def layout_tensors(
    text_encoder: Any, layouts: Sequence[Sequence[Mapping[str, Any]]]
) -> tuple[Tensor, Tensor]:
    """Phrase embeddings ``[B, N, D]`` (the encoder's pooled vectors) and boxes ``[B, N, 4]`` for a batch of
    layouts, padded to the longest with zero-area boxes, which cover nothing."""
    n = max((len(layout) for layout in layouts), default=0)
    phrases = [box["phrase"] for layout in layouts for box in layout]
    pooled = text_encoder.encode(phrases).pooled.float().cpu()  # [M, D]
    out_p = torch.zeros(len(layouts), max(n, 1), pooled.shape[-1])
    out_b = torch.zeros(len(layouts), max(n, 1), 4)
    k = 0
    for i, layout in enumerate(layouts):
        for j, box in enumerate(layout):
            out_p[i, j] = pooled[k]
            out_b[i, j] = torch.tensor(box["box"], dtype=torch.float32)
            k += 1
    return out_p, out_b


# -- adapter files ----------------------------------------------------------------------------------------


def layout_params_for(model: FluxParams, phrase_dim: int) -> LayoutParams:
    return LayoutParams(phrase_dim, model.hidden_size, model.depth + model.depth_single_blocks)


LAYOUT_KIND = AdapterKind("layout", lambda d: LayoutAdapter(LayoutParams.from_dict(d)), LayoutError)


def save_layout_adapter(
    adapter: nn.Module, params: LayoutParams, path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> str:
    """Write adapter weights (the module or an EMA copy of it) with their params; returns the SHA-256."""
    return LAYOUT_KIND.save(adapter, params.to_dict(), path, metadata)


def load_layout_adapter(path: str | os.PathLike[str]) -> tuple[LayoutAdapter, dict[str, str]]:
    """(adapter in float32, header) from a layout adapter file; other files are refused with the reason."""
    return LAYOUT_KIND.load(path)


def check_adapter_fits(params: LayoutParams, model: FluxParams, phrase_dim: int, where: str) -> None:
    want = layout_params_for(model, phrase_dim)
    if params != want:
        raise LayoutError(
            f"{where}: this layout adapter was made for a model with hidden size {params.hidden_size}, "
            f"{params.num_blocks} blocks and {params.phrase_dim}-dim phrases, but the model has "
            f"{want.hidden_size}, {want.num_blocks} and {want.phrase_dim}; use an adapter trained on this "
            "model (`pictor train layout --base MODEL`)"
        )


def layout_file_hash(path: str | os.PathLike[str]) -> str:
    return sha256_file(path)


def open_layout_adapter(
    path: str | os.PathLike[str], model: FluxParams, text_encoder: Any, model_hash: str
) -> tuple[LayoutAdapter, dict[str, Any]]:
    """An adapter file checked against the model it is to steer: (adapter, its entry for the records).
    One trained on another model with the same shapes loads with a warning."""
    adapter, header = load_layout_adapter(path)
    check_adapter_fits(adapter.params, model, text_encoder.pooled_dim, str(path))
    return adapter, LAYOUT_KIND.opened(path, header, model_hash)


def layout_residuals(
    adapter: LayoutAdapter,
    text_encoder: Any,
    layout: Sequence[Mapping[str, Any]],
    batch: int,
    grid: tuple[int, int],
    dtype: torch.dtype,
) -> list[Tensor]:
    """The adapter's per-block residuals for `batch` images with the same layout on a token `grid` (h, w)."""
    device = next(adapter.parameters()).device
    phrases, boxes = layout_tensors(text_encoder, [layout])  # [1, N, D], [1, N, 4]
    with torch.inference_mode():
        res = adapter(phrases.to(device), boxes.to(device), grid[0], grid[1])
    return [v.to(dtype).expand(batch, -1, -1) for v in res]
