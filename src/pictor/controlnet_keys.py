"""diffusers' FLUX.1 ControlNet in pictor's terms: its key names, its config.json, its shapes.

:func:`diffusers_controlnet_keys` renames a diffusers ``FluxControlNetModel`` state dict to pictor's own keys
(BFL's FLUX.1 names plus ``pos_embed_input``, ``input_hint_block``); :func:`params_from_diffusers_config` and
:func:`infer_controlnet_params` give the architecture from a config.json or, for a single file, which has no
config, from the tensor shapes (FLUX.1's RoPE split of the head dim unless ``axes_dim`` is given). Reading
the files themselves is :mod:`pictor.controlnet_files`; writing them, :mod:`pictor.controlnet_writing`.

diffusers' names are converted here, the inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` for the parts a ControlNet has. No key needs diffusers'
shift/scale swap: that applies only to the final ``norm_out`` (AdaLayerNormContinuous), which a ControlNet
lacks; its ``norm1`` / ``norm.linear`` (AdaLayerNormZero[Single]) chunk (shift, scale, gate) in FLUX.1's
order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pictor.checkpoint import CheckpointError
from pictor.models.controlnet import HINT_CHANNELS, ControlNetParams

__all__ = [
    "DIFFUSERS_CLASS",
    "diffusers_controlnet_keys",
    "diffusers_target",
    "infer_controlnet_params",
    "params_from_diffusers_config",
]

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


def diffusers_target(key: str) -> tuple[str, int | None, tuple[str, ...]] | None:
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
        target = diffusers_target(key)
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


def _key_list(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
