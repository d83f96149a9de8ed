"""Merge LoRAs into a model for good: a new bundle whose transformer weights are ``W + sum of scale * alpha /
rank * B @ A`` (kohya's ``merge_lora.py``, ComfyUI's "save checkpoint" after a LoRA loader).

The merged bundle needs no LoRA at generation time (no extra work per step, one file to share) and draws
what the base model with the same LoRAs at the same scales draws. Each changed weight is computed in float64
from the stored one and written back in its stored dtype (fp32, fp16 or bf16; a value past the dtype's range
is refused by name), one tensor at a time. FP8 bundles are refused: FP8 rounds most of a LoRA's small changes
back to the weight they started from (applied at generation, the LoRA is exact there). The autoencoder and the
bundle's layout/reference adapters are copied unchanged; the config keeps the base's architecture and
defaults, and its training record names the base and every LoRA (file hashes and scales), so the merged
model's history is in the bundle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    model_hash,
    read_bundle_config,
    read_bundle_file,
    refuse_quantized,
    staged_dir,
    write_json,
    write_safetensors,
)
from pictor.convert import check_bundle_out, copy_adapters, copy_autoencoder
from pictor.locate import resolve
from pictor.lora_files import a1111_lora_hash, lora_file_hash
from pictor.lora_tools import finite_update, model_linears, read_lora
from pictor.models.lora_formats import DoRAUpdate, LayerUpdate, LoRAError


def _merged(key: str, weight: torch.Tensor, updates: Sequence[tuple[LayerUpdate, float]]) -> torch.Tensor:
    total = weight.double()
    for update, scale in updates:
        # A DoRA is decomposed against the stored weight, not the weight plus the LoRAs before it: what
        # --lora does at run time, so a merged bundle draws what the base with the same files draws.
        change = update.merged_delta(weight) if isinstance(update, DoRAUpdate) else update.delta()
        total += scale * change.to(total.device)
    merged = total.to(weight.dtype)
    if not bool(torch.isfinite(merged.float()).all()):
        dtype = str(weight.dtype).removeprefix("torch.")
        wider = "merge into a bf16 or fp32 copy of the model (`pictor convert dtype`)"
        raise CheckpointError(
            f"{key}: the merged weight overflows {dtype}; "
            + (wider if weight.dtype == torch.float16 else "the LoRA scale is far too large")
        )
    return merged


def _header_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file's header names (nothing else is read)."""
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)


def merge_loras(
    model: str | os.PathLike[str],
    loras: Sequence[tuple[str | os.PathLike[str], float]],
    out: str | os.PathLike[str],
    name: str | None = None,
) -> tuple[Path, list[str]]:
    """Write a bundle at ``out``: ``model`` with each (LoRA file, scale) merged into its weights.

    Returns the bundle's path and the LoRA keys left out (a text encoder's: pictor's LoRAs act on the
    transformer only). Everything is checked (model, LoRA keys and shapes, scales, ``out``) before any
    weight is read; written atomically, so ``out`` may be ``model`` itself.
    """
    ref = resolve(model)
    if ref.path is None:
        raise CheckpointError(
            f"--model '{model}' is a preset: an untrained architecture; merge into a trained bundle"
        )
    if not loras:
        raise LoRAError("nothing to merge: give at least one --lora FILE[:SCALE]")
    src, out = ref.path, Path(out)
    config = read_bundle_config(src)
    check_bundle_out(out)
    for fname in (TRANSFORMER_FILE, AUTOENCODER_FILE):
        if not (src / fname).is_file():
            raise CheckpointError(f"{src}: bundle is missing {fname}")
    if any(dtype.startswith("F8") for dtype in _header_dtypes(src / TRANSFORMER_FILE)):
        raise CheckpointError(
            f"--model {model}: its weights are stored in FP8, which cannot hold a LoRA's small changes (most "
            "round back to the same FP8 value); merge into the bf16/fp16 bundle it came from (then `pictor "
            "convert dtype --dtype fp8` if you like), or apply the LoRA at generation (--lora): exact there"
        )
    refuse_quantized(src, "merging a LoRA into it")  # the blocks would have to be quantized again
    linears = model_linears(src)
    per_layer: dict[str, list[tuple[LayerUpdate, float]]] = {}
    entries: list[dict[str, Any]] = []
    left_out: list[str] = []
    for path, scale in loras:
        if not math.isfinite(scale):
            raise LoRAError(f"{path}: LoRA scale must be a finite number, got {scale}")
        updates, text_keys = read_lora(path, linears)
        broken = next((u.source for u in updates.values() if not finite_update(u)), None)
        if broken is not None:
            raise LoRAError(f"{path}: {broken} holds NaN or infinite values; the file is broken")
        left_out += text_keys
        for layer, update in updates.items():
            per_layer.setdefault(layer, []).append((update, float(scale)))
        entries.append(
            {
                "name": Path(path).stem,
                "path": str(Path(path).resolve()),
                "sha256": lora_file_hash(path),
                "hash": a1111_lora_hash(path),
                "scale": float(scale),
            }
        )
    with staged_dir(out) as tmp:
        sd = read_bundle_file(src, TRANSFORMER_FILE, config, verify=True)
        for layer, updates in per_layer.items():
            key = f"{layer}.weight"
            sd[key] = _merged(key, sd[key], updates)
        hashes = {TRANSFORMER_FILE: write_safetensors(sd, tmp / TRANSFORMER_FILE, {"format": "pt"})}
        del sd
        hashes[AUTOENCODER_FILE] = copy_autoencoder(src, tmp, config)
        copy_adapters(src, tmp)  # trained on the base; they load on the merged model as they did
        merged_names = ", ".join(f"{e['name']} ({e['scale']:g})" for e in entries)
        merged = BundleConfig(
            **{
                **config.__dict__,
                "name": name or f"{config.name}+{'+'.join(e['name'] for e in entries)}",
                "description": f"{config.name} with LoRAs merged: {merged_names}",
                "hashes": hashes,
                "training": {
                    "stage": "lora-merge",
                    "base": {"name": config.name, "hash": model_hash(config), "path": str(src.resolve())},
                    "loras": entries,
                    "base_training": config.training,
                },
            }
        )
        write_json(merged.to_dict(), tmp / CONFIG_NAME)
    return out, sorted(set(left_out))
