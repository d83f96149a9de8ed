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

BFL's FLUX.1 Canny / Depth [dev] LoRAs are merged alone and make another model: a control model, with
``img_in`` widened, biases changed and the qk-norm scales replaced (:func:`merge_control_lora`,
:mod:`pictor.models.control_lora`); they cannot be applied at generation.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pictor.bundle_folders import ADAPTER_FILES, check_bundle_out, copy_adapters, copy_autoencoder
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    LazySafetensors,
    model_hash,
    read_bundle_config,
    read_bundle_file,
    refuse_quantized,
    staged_dir,
    write_json,
    write_safetensors,
)
from pictor.control_images import check_control_kind, is_control_model
from pictor.locate import resolve
from pictor.lora_files import a1111_lora_hash, load_lora_file, lora_file_hash
from pictor.lora_tools import finite_update, model_linears, read_lora
from pictor.models.control_lora import control_kind_in_name, control_weights, read_control_lora
from pictor.models.flux import Flux, FluxParams
from pictor.models.lora_formats import DoRAUpdate, LayerUpdate, LoRAError, control_lora_key
from pictor.notices import PictorWarning
from pictor.presets import get_preset


def _merged(key: str, weight: torch.Tensor, updates: Sequence[tuple[LayerUpdate, float]]) -> torch.Tensor:
    total = weight.double()
    for update, scale in updates:
        # A DoRA is decomposed against the stored weight, not the weight plus the LoRAs before it: what
        # --lora does at run time, so a merged bundle draws what the base with the same files draws.
        change = update.merged_delta(weight) if isinstance(update, DoRAUpdate) else update.delta()
        total += scale * change.to(total.device)
    return _stored(key, total, weight.dtype)


def _stored(key: str, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A merged float64 tensor back in its stored dtype, refusing one that overflows it."""
    merged = total.to(dtype)
    if not bool(torch.isfinite(merged.float()).all()):
        name = str(dtype).removeprefix("torch.")
        wider = "merge into a bf16 or fp32 copy of the model (`pictor convert dtype`)"
        raise CheckpointError(
            f"{key}: the merged weight overflows {name}; "
            + (wider if dtype == torch.float16 else "the LoRA scale is far too large")
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
    control: str | None = None,
    keep_defaults: bool = False,
) -> tuple[Path, list[str]]:
    """Write a bundle at ``out``: ``model`` with each (LoRA file, scale) merged into its weights.

    Returns the bundle's path and the LoRA keys left out (a text encoder's: pictor's LoRAs act on the
    transformer only). Everything is checked (model, LoRA keys and shapes, scales, ``out``) before any
    weight is read; written atomically, so ``out`` may be ``model`` itself.

    BFL's FLUX.1 Canny / Depth [dev] LoRA (one file, alone) makes a control model instead
    (:func:`merge_control_lora`): ``control`` ("canny" / "depth") says which kind when the file's name does
    not, and ``keep_defaults`` keeps the base's steps and guidance rather than the Canny / Depth presets'.
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
    # BFL's Canny / Depth LoRA is known by its key names alone (nothing else of the files is read yet)
    controls = [path for path, _scale in loras if control_lora_key(LazySafetensors(path)) is not None]
    if any(dtype.startswith("F8") for dtype in _header_dtypes(src / TRANSFORMER_FILE)):
        raise CheckpointError(
            f"--model {model}: its weights are stored in FP8, which cannot hold a LoRA's small changes (most "
            "round back to the same FP8 value); merge into the bf16/fp16 bundle it came from (then `pictor "
            "convert dtype --dtype fp8` if you like)"
            + ("" if controls else ", or apply the LoRA at generation (--lora): exact there")
        )
    refuse_quantized(src, "merging a LoRA into it")  # the blocks would have to be quantized again
    if controls:
        if len(loras) > 1:
            raise LoRAError(
                f"{controls[0]}: BFL's Canny/Depth LoRA is merged alone (it makes another model, with a "
                "wider input); merge it first, then apply other LoRAs to the new bundle with --lora, or "
                "merge them into it with a second `pictor lora merge`"
            )
        ((path, scale),) = loras
        return merge_control_lora(src, config, path, scale, out, name, control, keep_defaults), []
    if control is not None:
        raise LoRAError(
            f"--control {control}: only for BFL's FLUX.1 Canny/Depth [dev] LoRAs (flux1-canny-dev-lora, "
            "flux1-depth-dev-lora), which make a control model; these are plain LoRAs"
        )
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


def control_settings(config: BundleConfig, kind: str, keep_defaults: bool = False) -> dict[str, Any]:
    """What a control LoRA of ``kind`` makes of a FLUX.1 [dev] bundle's config: the model reads twice its
    input (``in_channels`` doubled), the preset is ``flux-canny-dev`` / ``flux-depth-dev`` when the result
    is that preset's architecture (None, "custom", otherwise), and the defaults take that preset's steps and
    guidance (BFL's and diffusers' settings for Canny / Depth) unless ``keep_defaults``; size, sampler and
    schedule stay the base's."""
    check_control_kind(kind, "--control")
    preset_name = f"flux-{kind}-dev"
    preset = get_preset(preset_name)
    model = {**config.model, "in_channels": 2 * int(config.model["in_channels"])}
    same = FluxParams.from_dict(model) == FluxParams.from_dict(preset["model"])
    defaults = dict(config.defaults)
    if not keep_defaults:
        defaults.update(steps=preset["defaults"]["steps"], guidance=preset["defaults"]["guidance"])
    return {"model": model, "preset": preset_name if same else None, "defaults": defaults, "control": kind}


def _check_control_base(model: str | os.PathLike[str], config: BundleConfig) -> None:
    """BFL's Canny / Depth LoRAs are for plain FLUX.1 [dev]: a guidance-distilled model whose input is as
    wide as its output (the LoRA doubles it)."""
    params = FluxParams.from_dict(config.model)
    where = f"--model {model}"
    if is_control_model(params):
        raise LoRAError(
            f"{where} is already a FLUX.1 control model (it reads {params.in_channels} channels a token for "
            f"{params.out_channels}); BFL's Canny/Depth LoRA is merged into plain FLUX.1 [dev]"
        )
    if params.in_channels != params.out_channels:
        raise LoRAError(
            f"{where} reads {params.in_channels} channels a token for {params.out_channels} (FLUX.1 Fill, or "
            "another model with extra inputs); BFL's Canny/Depth LoRA is merged into plain FLUX.1 [dev]"
        )
    if config.kontext:
        raise LoRAError(
            f"{where} is FLUX.1 Kontext; BFL's Canny/Depth LoRA is merged into plain FLUX.1 [dev]"
        )
    if not params.guidance_embed:
        raise LoRAError(
            f"{where} has no guidance embedding (FLUX.1 [schnell]-like); BFL's Canny/Depth LoRA is for the "
            "guidance-distilled FLUX.1 [dev] (it updates guidance_in): merge it into a FLUX.1 [dev] bundle"
        )


def merge_control_lora(
    src: Path,
    config: BundleConfig,
    lora: str | os.PathLike[str],
    scale: float,
    out: Path,
    name: str | None = None,
    control: str | None = None,
    keep_defaults: bool = False,
) -> Path:
    """BFL's FLUX.1 Canny / Depth [dev] LoRA merged into the FLUX.1 [dev] bundle at ``src``: a control
    model (:mod:`pictor.models.control_lora`). ``img_in`` is zero-padded to twice its input, every layer the
    file names becomes ``W + scale * B @ A`` and ``b + scale * bias_B`` (float64, stored back in its dtype),
    and the qk-norm scales are the file's at any ``scale`` (BFL's ``set_lora_scale`` scales the LoRA outputs
    only). The kind of control picture comes from ``control`` or the file's name; the config from
    :func:`control_settings`. The bundle's layout / reference adapters are not copied: a control model
    refuses layouts and reference pictures."""
    lora = Path(lora)
    _check_control_base(src, config)
    kind = control or control_kind_in_name(lora.name)
    if kind is None:
        raise LoRAError(
            f"{lora}: BFL's Canny/Depth LoRA, but its name does not say whether it reads edge maps or depth "
            "maps; add --control canny or --control depth"
        )
    check_control_kind(kind, "--control")
    if not math.isfinite(scale):
        raise LoRAError(f"{lora}: LoRA scale must be a finite number, got {scale}")
    settings = control_settings(config, kind, keep_defaults)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(FluxParams.from_dict(config.model)).state_dict().items()}
    sd_lora, _meta = load_lora_file(lora)
    update = read_control_lora(sd_lora, shapes)
    entry = {
        "name": lora.stem,
        "path": str(lora.resolve()),
        "sha256": lora_file_hash(lora),
        "hash": a1111_lora_hash(lora),
        "scale": float(scale),
        "control": kind,
    }
    with staged_dir(out) as tmp:
        sd = read_bundle_file(src, TRANSFORMER_FILE, config, verify=True)
        for path, layer in update.layers.items():
            wkey, bkey = f"{path}.weight", f"{path}.bias"
            weight, bias = control_weights(path, sd[wkey], sd.get(bkey), layer, float(scale))
            sd[wkey] = _stored(wkey, weight, sd[wkey].dtype)
            if bias is not None:
                sd[bkey] = _stored(bkey, bias, sd[bkey].dtype)
        for key, value in update.norms.items():  # replaced, as BFL's load_state_dict over them does
            sd[key] = _stored(key, value.double(), sd[key].dtype)
        hashes = {TRANSFORMER_FILE: write_safetensors(sd, tmp / TRANSFORMER_FILE, {"format": "pt"})}
        del sd
        hashes[AUTOENCODER_FILE] = copy_autoencoder(src, tmp, config)
        dropped = [f for f in ADAPTER_FILES if (src / f).is_file()]
        if dropped:
            warnings.warn(
                f"{', '.join(dropped)} not copied: a FLUX.1 control model refuses layouts and reference "
                "pictures",
                PictorWarning,
                stacklevel=3,
            )
        words = "Canny" if kind == "canny" else "Depth"
        merged = BundleConfig(
            **{
                **config.__dict__,
                **settings,
                "name": name or f"{config.name}+{lora.stem}",
                "description": f"{config.name} with BFL's FLUX.1 {words} [dev] LoRA merged: {lora.stem} "
                f"({float(scale):g})",
                "hashes": hashes,
                "training": {
                    "stage": "lora-merge",
                    "base": {"name": config.name, "hash": model_hash(config), "path": str(src.resolve())},
                    "loras": [entry],
                    "base_training": config.training,
                },
            }
        )
        write_json(merged.to_dict(), tmp / CONFIG_NAME)
    return out
