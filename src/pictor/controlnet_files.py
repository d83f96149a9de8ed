"""FLUX.1 ControlNet files as they are shipped, read into :class:`~pictor.models.controlnet.FluxControlNet`.

Three layouts are read, all safetensors (pickles are refused before they are opened):

- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``, or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json`` (InstantX/FLUX.1-dev-Controlnet-Canny,
  Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro(-2.0), XLabs-AI/flux-controlnet-canny-diffusers);
- a single ``.safetensors`` file in diffusers' key layout (``x_embedder``, ``transformer_blocks.N``, ...);
- a single ``.safetensors`` file in XLabs' original layout (``flux-canny-controlnet-v3.safetensors``), whose
  keys are pictor's own (BFL's FLUX.1 names plus ``pos_embed_input``, ``input_hint_block``).

A single file has no config: the architecture is read off the tensor shapes. diffusers' key names and
config.json, and the shapes, are turned into pictor's names and params by :mod:`pictor.controlnet_keys`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pictor.checkpoint import (
    PICKLE_SUFFIXES,
    CheckpointError,
    check_keys,
    load_into,
    read_safetensors,
    refuse_pickle,
)
from pictor.controlnet_keys import (
    _key_list,
    diffusers_controlnet_keys,
    infer_controlnet_params,
    params_from_diffusers_config,
)
from pictor.models.controlnet import ControlNetParams, FluxControlNet

__all__ = [
    "DIFFUSERS_CONFIG",
    "DIFFUSERS_INDEX",
    "DIFFUSERS_WEIGHTS",
    "describe_controlnet",
    "load_controlnet",
    "read_controlnet",
]

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------ reading


def _layout(sd: Mapping[str, Any], where: str) -> str:
    """``"diffusers"`` or ``"xlabs"`` (pictor's own names), after refusing what is no ControlNet."""
    keys = list(sd)
    if (
        any(k.startswith("final_layer.") for k in keys)
        or "proj_out.weight" in sd
        or "norm_out.linear.weight" in sd
    ):
        raise CheckpointError(
            f"{where}: this is a FLUX.1 transformer (it has final_layer / proj_out keys), not a ControlNet; "
            "use it as the base model (FLUX.1 Canny/Depth [dev] are such whole models, not ControlNets)"
        )
    if not any(k.startswith(("controlnet_blocks.", "controlnet_single_blocks.")) for k in keys):
        lora = any("lora" in k.lower() for k in keys)
        raise CheckpointError(
            f"{where}: no controlnet_blocks.* keys, so not a FLUX.1 ControlNet"
            + (
                " (it looks like a LoRA; load Control LoRAs such as FLUX.1-Canny-dev-lora as LoRAs)"
                if lora
                else ""
            )
            + f"; first keys: {_key_list(keys[:6])}"
        )
    diffusers = ("x_embedder.", "controlnet_x_embedder.", "transformer_blocks.", "time_text_embed.")
    return "diffusers" if any(k.startswith(diffusers) for k in keys) else "xlabs"


def _folder_config(folder: Path) -> dict[str, Any]:
    """A diffusers model folder's config.json, read (and so its class checked) before any weights."""
    config_path = folder / DIFFUSERS_CONFIG
    if not config_path.is_file():
        inner = folder / "controlnet" / DIFFUSERS_CONFIG
        hint = f"; a pipeline folder? pass {inner.parent}" if inner.is_file() else ""
        raise CheckpointError(
            f"{folder}: no {DIFFUSERS_CONFIG}; a ControlNet folder is diffusers' layout "
            f"({DIFFUSERS_CONFIG} + {DIFFUSERS_WEIGHTS}), or pass the single .safetensors file itself{hint}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def controlnet_files(folder: Path) -> list[Path]:
    """The files a diffusers ControlNet folder is read from: config.json, then the weights (one file, or
    the index and the shards it names); what a folder's hash covers."""
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_CONFIG, folder / DIFFUSERS_WEIGHTS]
    if (folder / DIFFUSERS_INDEX).is_file():
        return [folder / DIFFUSERS_CONFIG, folder / DIFFUSERS_INDEX, *_shard_paths(folder / DIFFUSERS_INDEX)]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(folder / pickles[0])  # raises, saying why and what to do
    raise CheckpointError(
        f"{folder}: no {DIFFUSERS_WEIGHTS} (nor sharded {DIFFUSERS_INDEX}) beside {DIFFUSERS_CONFIG}; "
        "download the model's safetensors weights into this folder"
    )


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    files = controlnet_files(folder)
    if files[1].name == DIFFUSERS_INDEX:
        return _read_shards(files[1])
    return read_safetensors(files[1])


def _file_keys(path: Path) -> dict[str, None]:
    """A safetensors file's key names, read from its header only (a whole transformer given by mistake is
    refused before its gigabytes are read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict.fromkeys(f.keys())
    except (SafetensorError, OSError):
        return {}  # read_safetensors names the problem


def _shard_paths(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a diffusers shard index ({exc!r})") from None
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", ".."):  # the index must not point outside its folder
            raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name in this folder")
    return [index_path.parent / name for name in names]


def _read_shards(index_path: Path) -> dict[str, Tensor]:
    """The shards an index's ``weight_map`` names, merged; each key must come from the shard named for it."""
    paths = _shard_paths(index_path)  # checks the index first
    weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    out: dict[str, Tensor] = {}
    for shard_path in paths:
        shard = read_safetensors(shard_path)
        clash = sorted(set(shard) & set(out))
        if clash:
            raise CheckpointError(f"{shard_path}: key(s) also in another shard: {_key_list(clash)}")
        out.update(shard)
    absent = [k for k in weight_map if k not in out]
    if absent:
        raise CheckpointError(f"{index_path}: key(s) listed but in no shard: {_key_list(absent)}")
    return out


def read_controlnet(
    path: str | os.PathLike[str], *, axes_dim: Sequence[int] | None = None
) -> tuple[ControlNetParams, dict[str, Tensor]]:
    """A ControlNet's params and pictor-named weights (as stored: dtype unchanged), not yet built."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        where = str(path)
        params = params_from_diffusers_config(_folder_config(path), f"{path / DIFFUSERS_CONFIG}")
        if axes_dim is not None and list(axes_dim) != params.axes_dim:
            raise CheckpointError(
                f"{path}: axes_dim={list(axes_dim)} disagrees with {DIFFUSERS_CONFIG}'s axes_dims_rope "
                f"{params.axes_dim}; leave axes_dim out for a folder"
            )
        sd = _folder_weights(path)
        layout = _layout(sd, where)
        if layout == "diffusers":
            sd = diffusers_controlnet_keys(sd, where)
        return params, sd
    if not path.exists():
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    where = str(path)
    keys = _file_keys(path)
    if keys:
        _layout(keys, where)  # refuses a transformer, a LoRA, ... from the header alone
    sd = read_safetensors(path)  # refuses anything but .safetensors
    if _layout(sd, where) == "diffusers":
        sd = diffusers_controlnet_keys(sd, where)
    return infer_controlnet_params(sd, where, axes_dim), sd


def load_controlnet(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    axes_dim: Sequence[int] | None = None,
) -> FluxControlNet:
    """A ready FLUX.1 ControlNet (eval mode) from a diffusers folder or a single safetensors file.

    ``axes_dim``: the RoPE split of the head dim, for a single file whose head dim is not FLUX.1's 128
    (a folder's config.json says it; a file's shapes cannot). Keys are checked strictly: missing,
    unexpected and mis-shaped ones are named.
    """
    params, sd = read_controlnet(path, axes_dim=axes_dim)
    with torch.device("meta"):
        net = FluxControlNet(params)
    what = f"{path}: {params.kind} ControlNet"
    try:
        check_keys(net, sd, what)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} (Key names are pictor's: diffusers' x_embedder is img_in, transformer_blocks.N is "
            "double_blocks.N, single_transformer_blocks.N is single_blocks.N, controlnet_x_embedder is "
            "pos_embed_input.)"
        ) from None
    load_into(net, sd, what, dtype=dtype)
    return net.to(device).eval()


def describe_controlnet(net: FluxControlNet | ControlNetParams) -> dict[str, Any]:
    """What a ControlNet is, for records (JSON-able): kind, block counts, modes, what ``cond`` it takes."""
    p = net.params if isinstance(net, FluxControlNet) else net
    return {
        "kind": p.kind,
        "double_blocks": p.depth,
        "single_blocks": p.depth_single_blocks,
        "modes": p.num_modes,
        "cond": "pixels" if p.hint else "latents",
        "repeat": p.hint,
        "guidance_embed": p.guidance_embed,
        "hidden_size": p.hidden_size,
    }
