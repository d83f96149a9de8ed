"""What the layout, reference and ControlNet stages share: an adapter module trained beside a frozen base
bundle and kept in one safetensors file (OUT/checkpoints/step-N/FILE, OUT/final/FILE and a copy at OUT/FILE;
a ControlNet's is a folder), whose header names the base it was trained on; and how their previews and evals
are drawn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor, nn

from pictor import __version__
from pictor.checkpoint import read_safetensors, staged_file
from pictor.data.buckets import resize_to_bucket
from pictor.train import previews
from pictor.train.data import dataset_length, holdout_index, validation_items
from pictor.train.lora import LoRAStage
from pictor.train.t2i import T2IStage
from pictor.train.validation import validation_loss


class FileAdapterStage(LoRAStage):
    """LoRAStage's frozen base, text cache, base-hash check and EMA swapping; an adapter of its own,
    saved by `save_adapter` to `adapter_file`."""

    adapter_file: str

    def save_adapter(self, ema: nn.Module, path: Path, metadata: dict[str, str]) -> None:
        raise NotImplementedError

    def metadata(self, step: int) -> dict[str, str]:
        return {
            "base_model": self.base_name,
            "base_model_hash": self.base_hash,
            "pictor_version": __version__,
            "pictor_training": json.dumps({**self.training_info(step), "base": str(self.base_path)}),
        }

    def preview_images(self, prompts: list[str], seeds: list[int], **hooks: Any) -> np.ndarray:
        """`previews.generate` of the frozen base at the run's image size, steps and guidance; `hooks`: how
        the adapter takes part (residual_fn, context_fn or control_fn)."""
        c = self.cfg
        size = int(c.image_size or 64)
        return previews.generate(
            self.flux, self.ae, self.text, prompts, seeds, size, c.sample_steps, c.sample_guidance,
            self.device, self.amp, batch_size=64, **hooks,
        )  # fmt: skip

    def eval_scenes(self, specs: list[dict], per_spec: int, seed: int) -> np.ndarray:
        """Ground-truth scene j of spec i drawn from (seed, i, j), rendered at the run's size, flattened."""
        from pictor.eval.shapes import ground_truth_images

        rows = ground_truth_images(specs, per_spec, seed, int(self.cfg.image_size or 64))
        return np.stack([im for row in rows for im in row])

    def folder_previews(self, n: int, picture: str | None = None) -> tuple[list[str], np.ndarray]:
        """The captions and pictures of the folder's first n images (in held-out order), square as the grids'
        images are (buckets give other shapes); `picture`: the key of another picture of each item's info to
        give instead of the image (a ControlNet's "control")."""
        size = int(self.cfg.image_size or 64)
        items = [self.ds[holdout_index(dataset_length(self.ds), i)] for i in range(n)]
        chosen = [it[0] if picture is None else it[2][picture] for it in items]
        pictures = [np.asarray(resize_to_bucket(Image.fromarray(p), (size, size))) for p in chosen]
        return [it[1] for it in items], np.stack(pictures)

    def write_weights(self, folder: Path, ema: nn.Module, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.save_adapter(ema, folder / self.adapter_file, self.metadata(step))

    def ema_weights(self, checkpoint: Path) -> dict[str, Tensor]:
        return read_safetensors(checkpoint / self.adapter_file)

    def publish(self, final: Path) -> Path:
        """Copy final/FILE to OUT/FILE (atomically) and return that path."""
        out = Path(self.cfg.out) / self.adapter_file
        with staged_file(out) as tmp:
            shutil.copyfile(final / self.adapter_file, tmp)
        return out

    def training_info(self, step: int) -> dict[str, Any]:
        info = super(LoRAStage, self).training_info(step)  # the t2i fields, not LoRA's rank and targets
        return {**info, "stage": self.name}

    def evaluate(self, ema: nn.Module) -> dict[str, Any] | None:
        """On an image folder, the validation loss (--validation-split) through the forward module with
        the EMA adapter swapped in; on the shapes world T2IStage's eval with the EMA adapter passed along,
        not LoRAStage's (which swaps adapters into the base): the stages' `eval_images` say how the
        adapter takes part."""
        if self.cfg.data == "shapes":
            return T2IStage.evaluate(self, ema)
        held_out = validation_items(self.ds)
        if held_out is None:
            return None
        with self._with(ema):
            return validation_loss(self, self.forward_module, self.ds, held_out)
