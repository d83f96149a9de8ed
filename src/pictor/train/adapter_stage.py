"""What the layout and reference stages share: an adapter module trained beside a frozen base bundle and
kept in one safetensors file (OUT/checkpoints/step-N/FILE, OUT/final/FILE and a copy at OUT/FILE), whose
header names the base it was trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pictor import __version__
from pictor.checkpoint import read_safetensors, staged_file
from pictor.train.data import validation_items
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
