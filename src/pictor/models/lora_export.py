"""FLUX-named LoRA updates -> the key layouts other tools read (the reverse of :mod:`.lora_formats`):
kohya sd-scripts' (ComfyUI, Forge and A1111 load it) and diffusers'."""

from __future__ import annotations

import torch
from torch import Tensor

from pictor.models.lora_names import (
    DIFFUSERS_DOUBLE,
    DIFFUSERS_SINGLE,
    DIFFUSERS_TOP,
    KOHYA_PREFIX,
    SWAP_HALVES,
    fused_split_sizes,
)
from pictor.models.lora_updates import LoRAError, LoRAUpdate


def _in_block() -> dict[tuple[str, str], list[tuple[str, int | None]]]:
    """(block kind, FLUX module inside it) -> its diffusers modules, each with its part of a fused layer."""
    table: dict[tuple[str, str], list[tuple[str, int | None]]] = {}
    for kind, names in (("double_blocks", DIFFUSERS_DOUBLE), ("single_blocks", DIFFUSERS_SINGLE)):
        for diffusers, (flux, part) in names.items():
            table.setdefault((kind, flux), []).append((diffusers, part))
    return table


_IN_BLOCK = _in_block()
_TOP_LEVEL = {flux: diffusers for diffusers, flux in DIFFUSERS_TOP.items()}
_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def kohya_keys(path: str, update: LoRAUpdate) -> dict[str, Tensor]:
    """``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    name = KOHYA_PREFIX + path.replace(".", "_")
    return {
        f"{name}.lora_down.weight": update.A.float().contiguous(),
        f"{name}.lora_up.weight": update.B.float().contiguous(),
        f"{name}.alpha": torch.tensor(float(update.alpha)),
    }


def diffusers_keys(path: str, update: LoRAUpdate, shape: tuple[int, int]) -> dict[str, Tensor]:
    """One FLUX layer's update (layer ``shape`` = (in, out)) as diffusers keys: a fused q/k/v (or the single
    blocks' q/k/v/MLP input) split into its parts, each with its rows of B and the rows of A they use; the
    scale alpha / rank folded into B, since diffusers reads no alpha by default; final_layer's (shift,
    scale) rows swapped into diffusers' (scale, shift)."""
    a = update.A.float().contiguous()
    b = update.B.float() * (update.alpha / update.rank)
    kind, _, rest = path.partition(".")
    if kind in _BLOCKS:
        index, _, inner = rest.partition(".")
        targets = _IN_BLOCK.get((kind, inner))
        if targets is None:
            raise LoRAError(f"layer '{path}' has no diffusers name")
        prefix = f"transformer.{_BLOCKS[kind]}.{index}."
        if len(targets) == 1:
            name = targets[0][0]
            return {f"{prefix}{name}.lora_A.weight": a, f"{prefix}{name}.lora_B.weight": b.contiguous()}
        out: dict[str, Tensor] = {}
        rows = b.split(fused_split_sizes(path, shape), dim=0)
        for name, part in targets:
            # Only the ranks this part uses: a LoRA fused from split parts has a block-diagonal B, so each
            # part gets back its own A and B, and a part it never had is left out (no zero update).
            assert part is not None
            used = rows[part].abs().sum(0) > 0
            if bool(used.any()):
                out[f"{prefix}{name}.lora_A.weight"] = a[used].contiguous()
                out[f"{prefix}{name}.lora_B.weight"] = rows[part][:, used].contiguous()
        return out
    if path not in _TOP_LEVEL:
        raise LoRAError(f"layer '{path}' has no diffusers name")
    if path in SWAP_HALVES:
        shift, scale = b.chunk(2, dim=0)
        b = torch.cat([scale, shift])
    name = f"transformer.{_TOP_LEVEL[path]}"
    return {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b.contiguous()}
