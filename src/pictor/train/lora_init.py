"""`--lora-init FILE`: a LoRA run that starts from a LoRA file's weights (kohya's --network_weights).

The file may be in any layout pictor applies (its own, kohya's, diffusers'/PEFT's, with FLUX.1's fused
layers split or not: `pictor.models.lora_formats`), for this run's base. Each layer's update ``alpha_f / r_f
* B_f A_f`` is put into the run's adapter exactly: the file's A in the first r_f rows of the adapter's A,
its B, rescaled by ``(alpha_f / r_f) / (alpha / rank)``, in the first r_f columns of B, whose other columns
stay at their start, zero. So step 0 of the run is the base with the file applied, and a run with a larger
--rank than the file's trains the extra directions from the usual start (A drawn, B zero). Layers this run
adapts that the file has not start as usual too; a file layer that the run's --targets leave out, a rank
above --rank, or a LoKr, LoHa or DoRA file is an error that says what to change. A resumed run takes its
adapters from its checkpoint and does not read the file again.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pictor.lora_files import load_lora_file, without_text_encoder
from pictor.models.lora import adapter_tree, linear_layers
from pictor.models.lora_formats import to_flux_updates
from pictor.models.lora_layers import LoRAAdapter
from pictor.models.lora_updates import LoRAError, LoRAUpdate


def init_adapters(model: nn.Module, adapter: str, path: str | os.PathLike[str]) -> str:
    """Put the LoRA file at `path` into `model`'s adapter `adapter` (module docstring); returns a line for
    the log saying what it did. Nothing is changed when the file does not fit."""
    if not os.path.isfile(path):  # checked here, not in the config: a resumed run no longer needs the file
        raise LoRAError(f"--lora-init {path}: no such file; give the LoRA .safetensors file to start from")
    sd, metadata = load_lora_file(path)
    sd, text = without_text_encoder(sd, path)  # CLIP's keys of a kohya file: pictor trains the transformer
    linears = {p: (m.in_features, m.out_features) for p, m in linear_layers(model).items()}
    updates, _ = to_flux_updates(sd, metadata, linears, strict=True)
    tree = adapter_tree(model, adapter)
    adapters = {p: m for p, m in tree.named_modules() if isinstance(m, LoRAAdapter)}
    plan: list[tuple[LoRAAdapter, LoRAUpdate]] = []
    for layer, update in sorted(updates.items()):
        if not isinstance(update, LoRAUpdate):
            raise LoRAError(
                f"--lora-init {path}: its update of {layer} is a {type(update).__name__} (LoKr, LoHa or "
                "DoRA); --lora-init starts plain LoRA runs from plain LoRA files"
            )
        target = adapters.get(layer)
        if target is None:
            raise LoRAError(
                f"--lora-init {path}: the file adapts {layer}, which this run's --targets leave out; train "
                "the layers the file adapts (e.g. --targets all, or a pattern that includes it)"
            )
        if update.rank > target.rank:
            need = max(u.rank for u in updates.values() if isinstance(u, LoRAUpdate))
            raise LoRAError(
                f"--lora-init {path}: the file's rank at {layer} is {update.rank}, above this run's --rank "
                f"{target.rank}; train with --rank {need} or more"
            )
        plan.append((target, update))
    if not plan:
        raise LoRAError(f"--lora-init {path}: the file holds no update for this model's transformer")
    with torch.no_grad():
        for target, update in plan:
            r = update.rank
            ratio = (update.alpha / r) / (target.alpha / target.rank)
            a, b = target.lora_A.weight, target.lora_B.weight
            a[:r].copy_(update.A.to(a.dtype))
            b[:, :r].copy_((update.B.double() * ratio).to(b.dtype))
    fresh = len(adapters) - len(plan)
    ranks = sorted({u.rank for _, u in plan})
    note = f"--lora-init: {len(plan)} layer(s) start from {path} (rank {', '.join(map(str, ranks))})"
    if fresh:
        note += f"; {fresh} layer(s) the file has not start fresh"
    if text:  # a kohya file's CLIP layers: the trained file will not have them, so say so
        note += (
            f"; its {len(text)} text-encoder tensor(s) (lora_te*) are left out: pictor trains the transformer"
        )
    return note
