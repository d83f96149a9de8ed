"""FLUX.1 ControlNets written as diffusers folders: the inverse of :mod:`pictor.controlnet_files`.

A trained :class:`~pictor.models.controlnet.FluxControlNet` is saved the way diffusers'
``FluxControlNetModel.save_pretrained`` saves one (``config.json`` + ``diffusion_pytorch_model.safetensors``,
diffusers' key names), so diffusers, ComfyUI and pictor's own :func:`~pictor.controlnet_files.load_controlnet`
all read it. All three kinds are written in that layout: InstantX's and Union's as InstantX and Shakker-Labs
ship them, XLabs' (pixel hint) as XLabs-AI's ``flux-controlnet-canny-diffusers`` does
(``conditioning_embedding_channels`` 16, ``patch_size`` 2), which diffusers runs and pictor reads back.

Key names are converted with the loader's own tables, inverted, so the two directions cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from pictor.checkpoint import CheckpointError, staged_dir, write_json, write_safetensors
from pictor.controlnet_files import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS
from pictor.controlnet_keys import (
    _DOUBLE,
    _DOUBLE_FUSED,
    _DOUBLE_NORMS,
    _OUT_LINEAR,
    _SINGLE,
    _SINGLE_FUSED,
    _SINGLE_NORMS,
    _TOP,
    DIFFUSERS_CLASS,
)
from pictor.models.controlnet import HINT_CHANNELS, ControlNetParams, FluxControlNet

__all__ = [
    "BlockShape",
    "controlnet_config_diffusers",
    "controlnet_state_dict_diffusers",
    "save_controlnet_folder",
    "unrepresentable",
]

# The diffusers release written into config.json: one whose FluxControlNetModel has every field written here
# (num_mode, conditioning_embedding_channels). diffusers reads it for information only.
DIFFUSERS_VERSION = "0.32.0"

# ---------------------------------------------------------------------------------- pictor -> diffusers

_TOP_BACK = {ours: theirs for theirs, ours in _TOP.items()}
_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)$")  # XLabs' Sequential index 2 + 2k -> blocks.k
_OUR_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
# Per block kind: diffusers' prefix, renamed modules, RMSNorm gains (FLUX ``scale`` -> diffusers ``weight``)
# and fused projections (pictor's name -> diffusers' parts, in the order they are concatenated).
_BLOCK_BACK: dict[str, tuple[str, dict[str, str], dict[str, str], dict[str, tuple[str, ...]]]] = {
    "double_blocks": (
        "transformer_blocks",
        {ours: theirs for theirs, ours in _DOUBLE.items()},
        {ours: theirs for theirs, ours in _DOUBLE_NORMS.items()},
        _DOUBLE_FUSED,
    ),
    "single_blocks": (
        "single_transformer_blocks",
        {ours: theirs for theirs, ours in _SINGLE.items()},
        {ours: theirs for theirs, ours in _SINGLE_NORMS.items()},
        _SINGLE_FUSED,
    ),
}


class BlockShape(Protocol):
    """What of a ControlNet's (or the transformer it grows from) params diffusers' folder fixes."""

    mlp_ratio: float
    qkv_bias: bool
    theta: int


def unrepresentable(p: BlockShape) -> list[str]:
    """How blocks of these params differ from diffusers' Flux blocks (fixed at FLUX.1's MLP ratio, biased
    q/k/v and RoPE theta), each as "name=value (diffusers: value)"; empty when a folder can hold them."""
    odd = []
    if p.mlp_ratio != 4.0:
        odd.append(f"mlp_ratio={p.mlp_ratio} (diffusers: 4.0)")
    if not p.qkv_bias:
        odd.append("qkv_bias=False (diffusers: True)")
    if p.theta != 10_000:
        odd.append(f"theta={p.theta} (diffusers: 10000)")
    return odd


def _check_representable(p: ControlNetParams, what: str) -> None:
    """Refuse what diffusers' folder cannot hold rather than write a folder that diffusers builds differently
    from what the weights were trained as."""
    odd = unrepresentable(p)
    if odd:
        raise CheckpointError(
            f"{what}: diffusers' FluxControlNetModel cannot express this ControlNet: {', '.join(odd)}"
        )


def _split(tensor: Tensor, names: tuple[str, ...], hidden: int) -> list[Tensor]:
    """A fused projection's rows cut into its parts: q, k, v ``hidden`` rows each, an MLP input the rest."""
    sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(names) == 4 else [])
    if sum(sizes) != tensor.shape[0] or min(sizes) <= 0:
        raise CheckpointError(f"cannot cut {tuple(tensor.shape)} into {len(names)} parts of {sizes}")
    return list(torch.split(tensor, sizes, dim=0))


def _diffusers_names(key: str, tensor: Tensor, hidden: int) -> list[tuple[str, Tensor]] | None:
    """diffusers' key(s) for one pictor key (several where pictor fuses q/k/v), None for an unknown key."""
    module, _, param = key.rpartition(".")
    if module in _TOP_BACK and param in ("weight", "bias"):
        return [(f"{_TOP_BACK[module]}.{param}", tensor)]
    if _OUT_LINEAR.match(module):
        return [(key, tensor)]
    hint = _HINT_CONV.match(module)
    if hint:  # 0 and 14 (conv_in / conv_out) are in _TOP; the convs between are blocks.k
        index = int(hint.group(1))
        if index % 2 or not 2 <= index <= 12:
            return None
        return [(f"input_hint_block.blocks.{(index - 2) // 2}.{param}", tensor)]
    block = _OUR_BLOCK.match(module)
    if block is None:
        return None
    kind, index, rest = block.groups()
    prefix, renamed, norms, fused = _BLOCK_BACK[kind]
    theirs = f"{prefix}.{index}"
    if rest in renamed:
        return [(f"{theirs}.{renamed[rest]}.{param}", tensor)]
    if rest in norms and param == "scale":
        return [(f"{theirs}.{norms[rest]}.weight", tensor)]
    if rest in fused:
        parts = fused[rest]
        return [
            (f"{theirs}.{name}.{param}", part)
            for name, part in zip(parts, _split(tensor, parts, hidden), strict=True)
        ]
    return None


def controlnet_state_dict_diffusers(net: FluxControlNet) -> dict[str, Tensor]:
    """The ControlNet's weights under diffusers' ``FluxControlNetModel`` key names (q/k/v split apart).

    A snapshot: every tensor detached, contiguous and in storage of its own (so safetensors takes it as it
    is, and training on does not change it), on the net's device in its dtype.
    """
    p = net.params
    _check_representable(p, "controlnet_state_dict_diffusers")
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in net.state_dict().items():
        names = _diffusers_names(key, tensor, p.hidden_size)
        if names is None:
            unknown.append(key)
            continue
        for name, part in names:
            out[name] = part.detach().clone(memory_format=torch.contiguous_format)
    if unknown:
        quantized = any(k.endswith(".ggml_type") for k in unknown)
        raise CheckpointError(
            f"controlnet_state_dict_diffusers: {len(unknown)} key(s) with no diffusers name: "
            f"{', '.join(sorted(unknown)[:6])}"
            + ("; the net holds GGML-quantized layers, which diffusers cannot read" if quantized else "")
        )
    return out


def controlnet_config_diffusers(params: ControlNetParams) -> dict[str, Any]:
    """The config.json diffusers' ``FluxControlNetModel.save_pretrained`` writes for ``params`` (keys sorted,
    as diffusers sorts them)."""
    _check_representable(params, "controlnet_config_diffusers")
    config: dict[str, Any] = {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": params.head_dim,
        "axes_dims_rope": list(params.axes_dim),
        # XLabs' hint net: 16 channels, 2x2 patches (what params_from_diffusers_config reads back as hint).
        "conditioning_embedding_channels": HINT_CHANNELS if params.hint else None,
        "guidance_embeds": params.guidance_embed,
        "in_channels": params.in_channels,
        "joint_attention_dim": params.context_in_dim,
        "num_attention_heads": params.num_heads,
        "num_layers": params.depth,
        "num_mode": params.num_modes,
        "num_single_layers": params.depth_single_blocks,
        "patch_size": 2 if params.hint else 1,
        "pooled_projection_dim": params.vec_in_dim,
    }
    return dict(sorted(config.items()))


# ------------------------------------------------------------------------------------------------ writing


def _check_replaceable(folder: Path) -> None:
    """The folder is written by replacing it whole: refuse to replace anything but a ControlNet folder (or
    an empty one), so a mistyped path cannot take a user's other files with it."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; give a folder path for the ControlNet")
    if not any(folder.iterdir()):
        return
    config = folder / DIFFUSERS_CONFIG
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        cls = None
    if cls != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{folder}: exists and is not a diffusers ControlNet folder (no {DIFFUSERS_CONFIG} naming "
            f"{DIFFUSERS_CLASS}); saving would replace everything in it. Choose a new or empty folder"
        )


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """safetensors header metadata: strings only, with the ``format: pt`` that diffusers' save_pretrained
    writes (Hugging Face loaders read it to tell PyTorch files from others)."""
    meta = dict(metadata or {})
    bad = sorted(repr(k) for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str))
    if bad:
        raise CheckpointError(
            f"save_controlnet_folder: metadata must map strings to strings; not so for {bad}"
        )
    if meta.get("format", "pt") != "pt":
        raise CheckpointError(
            f"save_controlnet_folder: metadata 'format' must be 'pt' (Hugging Face loaders check it), "
            f"got {meta['format']!r}"
        )
    return {**meta, "format": "pt"}


def save_controlnet_folder(net: FluxControlNet, folder: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``net`` as a diffusers ControlNet folder and return the folder: ``config.json`` and
    ``diffusion_pytorch_model.safetensors``, as diffusers' ``save_pretrained`` writes them.

    Atomic: the folder is assembled beside ``folder`` and renamed into place, so a crash leaves the previous
    folder (or none), never a half-written one that loads. Weights keep their dtype. ``metadata`` goes into
    the safetensors header (strings only). An existing folder is replaced only if it is a ControlNet folder
    or empty.
    """
    folder = Path(folder)
    config = controlnet_config_diffusers(net.params)
    meta = _metadata(metadata)
    _check_replaceable(folder)
    tensors = controlnet_state_dict_diffusers(net)
    with staged_dir(folder) as tmp:
        # Weights first, config last: even inside the staging folder, a config.json means the rest is there.
        write_safetensors(tensors, tmp / DIFFUSERS_WEIGHTS, meta)
        write_json(config, tmp / DIFFUSERS_CONFIG)
    return folder
