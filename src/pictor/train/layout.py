"""The layout stage: a LayoutAdapter (boxes with phrases) trained on a frozen base bundle.

The base model's flow loss with the adapter's residuals added to its image stream; only the adapter
learns (as GLIGEN freezes its base). The data must know where things are: the shapes world gives every
object's exact box, and an image folder can give them in metadata.jsonl. Outputs:
OUT/checkpoints/step-N/layout.safetensors (+ optimizer, RNG state for resume),
OUT/final/layout.safetensors and a copy at OUT/layout.safetensors. Copied into the base bundle's
folder as ``layout.safetensors``, it is loaded with the model and `pictor generate --layout` works.

Periodic evals score the shapes dev prompts with layouts taken from ground-truth scenes of their specs,
so the numbers say how well the model follows a layout that fits the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pictor.checkpoint import CheckpointError
from pictor.data.buckets import cover_crop
from pictor.data.layouts import LAYOUT_EXAMPLE, crop_layout
from pictor.layout_files import LAYOUT_FILE, layout_params_for, layout_tensors, save_layout_adapter
from pictor.models.layout import LayoutAdapter
from pictor.train import previews
from pictor.train.adapter_stage import FileAdapterStage
from pictor.train.bucket_stream import folder_of
from pictor.train.data import Batch, dataset_length, holdout_index
from pictor.train.stages import seeded

EVAL_LAYOUT_SEED = 7  # ground-truth scenes of the eval specs, whose boxes the evals ask for


class LayoutForward(nn.Module):
    """The frozen transformer and the trained adapter in one forward: DDP wraps this module, so the
    adapter's gradients are averaged over the ranks like any model's."""

    def __init__(self, flux: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.flux, self.adapter = flux, adapter

    def forward(
        self, *inputs: Tensor, layout: tuple[Tensor, Tensor, tuple[int, int]], guidance: Tensor | None = None
    ) -> Tensor:
        phrases, boxes, (grid_h, grid_w) = layout
        residuals = self.adapter(phrases, boxes, grid_h, grid_w)
        return self.flux(*inputs, guidance=guidance, img_residuals=residuals)


class LayoutStage(FileAdapterStage):
    """A FileAdapterStage whose adapter is a layout adapter."""

    name = "layout"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forward_module = LayoutForward(self.flux, self.module)

    def build_trainable(self) -> nn.Module:
        self._check_data_has_layouts()
        params = layout_params_for(self.flux.params, self.text.pooled_dim)
        return seeded(self.cfg.seed, lambda: LayoutAdapter(params).init_weights()).to(self.device)

    def _check_data_has_layouts(self) -> None:
        """Every training image needs its boxes: the shapes world has them, a folder's metadata.jsonl must."""
        folder = getattr(self.ds, "folder", None)
        if folder is None:
            return
        missing = [str(p) for p, layout in zip(folder.paths, folder.layouts, strict=True) if layout is None]
        if missing:
            raise CheckpointError(
                f"layout training: {len(missing)} of {len(folder.paths)} images in {self.cfg.data} have no "
                f"layout (first: {missing[0]}); give each a line in metadata.jsonl like "
                f'{{"file_name": "a.png", "text": "...", "layout": {LAYOUT_EXAMPLE}}}, or use --data shapes'
            )

    def forward_extras(self, batch: Batch, grid: tuple[int, int]) -> dict[str, Any]:
        """The batch's layouts for the forward module, which runs the adapter. The layout stays when the
        caption is dropped, so CFG contrasts prompts under one layout."""
        if any(layout is None for layout in batch.layouts):
            raise CheckpointError("layout training: a sample without a layout reached the loss")
        phrases, boxes = layout_tensors(self.text, batch.layouts)
        return {"layout": (phrases.to(self.device), boxes.to(self.device), grid)}

    # -- outputs ---------------------------------------------------------------------------------------

    adapter_file = LAYOUT_FILE

    def save_adapter(self, ema: nn.Module, path: Path, metadata: dict[str, str]) -> None:
        assert isinstance(self.module, LayoutAdapter)
        save_layout_adapter(ema, self.module.params, path, metadata)

    # -- previews with the EMA adapter -----------------------------------------------------------------

    def _eval_layouts(self, specs: list[dict], per_spec: int) -> list[list[dict]]:
        """Image j of spec i gets the boxes of the ground-truth scene drawn from (EVAL_LAYOUT_SEED, i, j)."""
        from pictor.eval.shapes import ground_truth_layouts

        rows = ground_truth_layouts(specs, per_spec, EVAL_LAYOUT_SEED, int(self.cfg.image_size or 64))
        return [layout for row in rows for layout in row]

    def _generate_with_layouts(
        self, ema: nn.Module, prompts: list[str], layouts: list[list[dict]], seeds: list[int]
    ) -> np.ndarray:
        grid = int(self.cfg.image_size or 64) // self.ae.params.downsample_factor // 2

        def residual_fn(part: slice) -> list[Tensor]:
            phrases, boxes = layout_tensors(self.text, layouts[part])
            return ema(phrases.to(self.device), boxes.to(self.device), grid, grid)

        return self.preview_images(prompts, seeds, residual_fn=residual_fn)

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module) -> Any:
        n = self.cfg.num_samples
        if self.cfg.data == "shapes":
            specs = previews.eval_specs(n)
            prompts, layouts = [s["prompt"] for s in specs], self._eval_layouts(specs, 1)
        else:
            prompts, layouts = self._folder_previews(n)
        images = self._generate_with_layouts(ema, prompts, layouts, list(range(len(prompts))))
        return previews.grid(images, columns=min(8, len(images)))

    def _folder_previews(self, n: int) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """The first n images of the folder: their captions, and the boxes that a square crop of each has,
        since previews are square (a bucketed item's own boxes are those of its bucket's crop)."""
        folder = folder_of(self.ds)
        size = int(self.cfg.image_size or 64)
        prompts, layouts = [], []
        for i in range(n):
            index = holdout_index(dataset_length(self.ds), i)
            resized, crop = cover_crop(folder.sizes[index], (size, size))
            prompts.append(folder.captions[index])
            layouts.append(crop_layout(folder.layouts[index] or [], resized, crop))
        return prompts, layouts

    @torch.no_grad()
    def eval_images(
        self, ema: nn.Module, specs: list[dict], k: int, prompts: list[str], seeds: list[int]
    ) -> Any:
        return self._generate_with_layouts(ema, prompts, self._eval_layouts(specs, k), seeds)
