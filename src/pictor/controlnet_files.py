"""FLUX.1 ControlNet files as they are shipped, read into :class:`~pictor.models.controlnet.FluxControlNet`.

Three layouts are read, all safetensors (pickles are refused before they are opened):

- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``, or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json`` (InstantX/FLUX.1-dev-Controlnet-Canny,
  Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro(-2.0), XLabs-AI/flux-controlnet-canny-diffusers);
- a single ``.safetensors`` file in diffusers' key layout (``x_embedder``, ``transformer_blocks.N``, ...);
- a single ``.safetensors`` file in XLabs' original layout (``flux-canny-controlnet-v3.safetensors``), whose
  keys are pictor's own (BFL's FLUX.1 names plus ``pos_embed_input``, ``input_hint_block``).

A single file has no config: the architecture is read off the tensor shapes (FLUX.1's RoPE split of the
head dim unless ``axes_dim`` is given). diffusers' names are converted here, the inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` for the parts a ControlNet has. No key needs
diffusers' shift/scale swap: that applies only to the final ``norm_out`` (AdaLayerNormContinuous), which a
ControlNet lacks; its ``norm1`` / ``norm.linear`` (AdaLayerNormZero[Single]) chunk (shift, scale, gate) in
FLUX.1's order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
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
from pictor.models.controlnet import HINT_CHANNELS, ControlNetParams, FluxControlNet

__all__ = [
    "DIFFUSERS_CONFIG",
    "DIFFUSERS_INDEX",
    "DIFFUSERS_WEIGHTS",
    "describe_controlnet",
    "diffusers_controlnet_keys",
    "infer_controlnet_params",
    "load_controlnet",
    "params_from_diffusers_config",
    "read_controlnet",
]

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CLASS = "FluxControlNetModel"

# diffusers' FluxControlNetModel.__init__ defaults: a config.json may leave any of these out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
    "num_mode": None,
    "conditioning_embedding_channels": None,
}

# ------------------------------------------------------------------------------ diffusers -> pictor names

# Top-level modules (a ".weight"/".bias" follows each name).
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "controlnet_x_embedder": "pos_embed_input",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "controlnet_mode_embedder": "controlnet_mode_embedder",
    # ControlNetConditioningEmbedding -> XLabs' Sequential (convs at even indices, SiLUs between).
    "input_hint_block.conv_in": "input_hint_block.0",
    "input_hint_block.conv_out": "input_hint_block.14",
}
_HINT_BLOCK = re.compile(r"^input_hint_block\.blocks\.(\d+)$")  # blocks.k -> input_hint_block.{2 + 2k}
_OUT_LINEAR = re.compile(r"^(controlnet_blocks|controlnet_single_blocks)\.\d+$")  # same name in both
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

# Inside a double block: renamed modules; RMSNorm gains (diffusers ``weight`` -> FLUX ``scale``); and the
# fused projections, concatenated along the output rows in this order.
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}  # [q | k | v | mlp_in]


def _target(key: str) -> tuple[str, int | None, tuple[str, ...]] | None:
    """pictor key for a diffusers key: (name, part, the diffusers keys of all parts) where the pictor
    tensor is fused from several (part = index in the concatenation), (name, None, ()) otherwise; None
    for a key no part of a FLUX.1 ControlNet has."""
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _TOP:
        return f"{_TOP[module]}.{param}", None, ()
    if _OUT_LINEAR.match(module):
        return key, None, ()
    hint = _HINT_BLOCK.match(module)
    if hint:
        return f"input_hint_block.{2 + 2 * int(hint.group(1))}.{param}", None, ()
    block = _BLOCK.match(module)
    if block is None:
        return None
    kind, index, rest = block.groups()
    double = kind == "transformer_blocks"
    ours = f"{'double_blocks' if double else 'single_blocks'}.{index}"
    renamed, norms, fused = (
        (_DOUBLE, _DOUBLE_NORMS, _DOUBLE_FUSED) if double else (_SINGLE, _SINGLE_NORMS, _SINGLE_FUSED)
    )
    if rest in renamed:
        return f"{ours}.{renamed[rest]}.{param}", None, ()
    if rest in norms:
        return (f"{ours}.{norms[rest]}.scale", None, ()) if param == "weight" else None
    for name, sources in fused.items():
        if rest in sources:
            return (
                f"{ours}.{name}.{param}",
                sources.index(rest),
                tuple(f"{kind}.{index}.{s}.{param}" for s in sources),
            )
    return None


def diffusers_controlnet_keys(sd: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """A diffusers ``FluxControlNetModel`` state dict under pictor's names (q/k/v fused, norms renamed).

    Keys that no part of a FLUX.1 ControlNet has, and fused projections with a part missing, are errors
    that name the keys.
    """
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    sources: dict[str, tuple[str, ...]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        target = _target(key)
        if target is None:
            unknown.append(key)
            continue
        name, part, from_keys = target
        if part is None:
            out[name] = tensor
        else:
            parts.setdefault(name, {})[part] = tensor
            sources[name] = from_keys
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} key(s) that no part of a FLUX.1 ControlNet (diffusers' "
            f"FluxControlNetModel) has: {_key_list(unknown)}; the file is another kind of model or damaged"
        )
    for name, got in sorted(parts.items()):
        wanted = sources[name]
        lacking = [k for i, k in enumerate(wanted) if i not in got]
        if lacking:
            raise CheckpointError(
                f"{where}: missing key(s) {_key_list(lacking)} (with "
                f"{_key_list(wanted[i] for i in got)} they make {name}); the file is incomplete"
            )
        widths = {t.shape[1:] for t in got.values()}
        if len(widths) != 1:
            raise CheckpointError(
                f"{where}: the parts of {name} ({_key_list(wanted)}) disagree in shape "
                f"({[tuple(got[i].shape) for i in range(len(wanted))]}); the file is damaged"
            )
        out[name] = torch.cat([got[i] for i in range(len(wanted))], dim=0)
    return out


# ------------------------------------------------------------------------------------------ architecture


def params_from_diffusers_config(config: Mapping[str, Any], where: str) -> ControlNetParams:
    """ControlNetParams from a diffusers ``FluxControlNetModel`` config.json (its defaults fill gaps)."""
    cls = config.get("_class_name")
    if cls is not None and cls != DIFFUSERS_CLASS:
        hint = (
            " (a FLUX.1 transformer: use it as the base model, not as a ControlNet)"
            if cls == "FluxTransformer2DModel"
            else ""
        )
        raise CheckpointError(f"{where}: _class_name is {cls!r}, not {DIFFUSERS_CLASS!r}{hint}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    try:
        heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
        channels = c["conditioning_embedding_channels"]
        hint = channels is not None
        if hint and (int(channels) != HINT_CHANNELS or int(c["patch_size"]) != 2):
            raise CheckpointError(
                f"{where}: conditioning_embedding_channels={channels}, patch_size={c['patch_size']}; pictor "
                f"reads XLabs' pixel ControlNets, which have {HINT_CHANNELS} and 2"
            )
        params = ControlNetParams(
            hidden_size=heads * head_dim,
            num_heads=heads,
            in_channels=int(c["in_channels"]),
            vec_in_dim=int(c["pooled_projection_dim"]),
            context_in_dim=int(c["joint_attention_dim"]),
            depth=int(c["num_layers"]),
            depth_single_blocks=int(c["num_single_layers"]),
            axes_dim=[int(a) for a in c["axes_dims_rope"]],
            guidance_embed=bool(c["guidance_embeds"]),
            # diffusers' Flux blocks are fixed at FLUX.1's MLP ratio and biased q/k/v projections.
            mlp_ratio=4.0,
            qkv_bias=True,
            num_modes=None if c["num_mode"] is None else int(c["num_mode"]),
            hint=hint,
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a usable FluxControlNetModel config ({exc})") from None
    return params


def infer_controlnet_params(
    sd: Mapping[str, Tensor], where: str, axes_dim: Sequence[int] | None = None
) -> ControlNetParams:
    """ControlNetParams read off a pictor-named state dict's shapes (a single file has no config).

    The head dim comes from the QK-norm gains (128 when the file has no attention block); the RoPE split of
    the head dim is not in the shapes: FLUX.1's 1:7:7 (``[16, 56, 56]`` for 128) unless ``axes_dim`` says.
    """
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "pos_embed_input.weight"]
    lacking = [k for k in needed if k not in sd]
    if lacking:
        raise CheckpointError(f"{where}: missing key(s) {_key_list(lacking)}; the file is incomplete")
    hidden, in_channels = sd["img_in.weight"].shape
    depth = _count(sd, "double_blocks.")
    depth_single = _count(sd, "single_blocks.")
    norm = next(
        (
            k
            for k in (
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "single_blocks.0.norm.query_norm.scale",
            )
            if k in sd
        ),
        None,
    )
    head_dim = int(sd[norm].shape[0]) if norm else 128
    if "double_blocks.0.img_mlp.0.weight" in sd:
        mlp_hidden = int(sd["double_blocks.0.img_mlp.0.weight"].shape[0])
    elif "single_blocks.0.linear1.weight" in sd:
        mlp_hidden = int(sd["single_blocks.0.linear1.weight"].shape[0]) - 3 * int(hidden)
    else:
        mlp_hidden = 4 * int(hidden)
    if axes_dim is None:
        axis0 = head_dim // 8
        rest = head_dim - axis0
        axes_dim = [axis0, rest // 2, rest - rest // 2]
        if any(a % 2 for a in axes_dim):
            raise CheckpointError(
                f"{where}: head dim {head_dim} has no even FLUX.1-style RoPE split ({axes_dim}); pass "
                "axes_dim (the ControlNet's axes_dims_rope, from its config) to load it"
            )
    modes = sd.get("controlnet_mode_embedder.weight")
    try:
        return ControlNetParams(
            hidden_size=int(hidden),
            num_heads=int(hidden) // head_dim,
            in_channels=int(in_channels),
            vec_in_dim=int(sd["vector_in.in_layer.weight"].shape[1]),
            context_in_dim=int(sd["txt_in.weight"].shape[1]),
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=list(axes_dim),
            guidance_embed="guidance_in.in_layer.weight" in sd,
            mlp_ratio=mlp_hidden / int(hidden),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd if depth else True,
            num_modes=None if modes is None else int(modes.shape[0]),
            hint="input_hint_block.0.weight" in sd,
        )
    except ValueError as exc:
        raise CheckpointError(f"{where}: the shapes make no FLUX.1 ControlNet ({exc})") from None


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    """How many blocks ``prefix.N.`` the keys hold (the highest index + 1, so a gap shows as missing keys)."""
    indices = {int(k.split(".")[1]) for k in sd if k.startswith(prefix) and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


# ------------------------------------------------------------------------------------------------ reading


def _key_list(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


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
