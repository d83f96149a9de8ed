"""FLUX.1 weights as other tools ship them: single safetensors files in the original (BFL / LDM) layout,
read into pictor's key names, with the architecture read off the tensor shapes so that no config is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from pictor.checkpoint import CheckpointError, read_safetensors, strip_prefixes

# Prefixes that other tools put in front of FLUX.1 transformer keys (ComfyUI / original checkpoints).
FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
AE_PREFIXES = ("first_stage_model.", "vae.", "ae.")


def import_flux_transformer(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """FLUX.1 transformer single file (official, or ComfyUI's with ``model.diffusion_model.``)."""
    sd = read_safetensors(path)
    sd = strip_prefixes(sd, FLUX_PREFIXES)
    if "img_in.weight" not in sd:
        raise CheckpointError(
            f"{path}: no 'img_in.weight' key — not a FLUX.1 transformer in the original layout. "
            "(A diffusers-format folder has keys like 'x_embedder.weight'; give the original single file.)"
        )
    return sd


def import_flux_autoencoder(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """FLUX.1 ``ae.safetensors`` (LDM key layout, optionally with a ``first_stage_model.`` prefix)."""
    sd = strip_prefixes(read_safetensors(path), AE_PREFIXES)
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise CheckpointError(
            f"{path}: not an LDM/FLUX autoencoder (no encoder.conv_in / decoder.conv_out keys)"
        )
    return sd


def infer_flux_params(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """FluxParams fields read off a FLUX.1 state dict's shapes, so a bare single file needs no config."""
    hidden, in_channels = sd["img_in.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0] if depth else 128
    mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0] if depth else 4 * hidden
    # FLUX.1 splits each head's rotary dims 1:7:7 over (index, row, column); 128 -> [16, 56, 56].
    axis0 = head_dim // 8
    rest = head_dim - axis0
    return {
        "in_channels": int(in_channels),
        "out_channels": int(sd["final_layer.linear.weight"].shape[0]),
        "vec_in_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
        "context_in_dim": int(sd["txt_in.weight"].shape[1]),
        "hidden_size": int(hidden),
        "mlp_ratio": float(mlp_hidden / hidden),
        "num_heads": int(hidden // head_dim),
        "depth": depth,
        "depth_single_blocks": depth_single,
        "axes_dim": [axis0, rest // 2, rest - rest // 2],
        "theta": 10_000,
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in sd,
        "guidance_embed": "guidance_in.in_layer.weight" in sd,
    }


def infer_autoencoder_params(
    sd: Mapping[str, torch.Tensor], scale_factor: float, shift_factor: float
) -> dict[str, Any]:
    """AutoEncoderParams fields read off an LDM/FLUX autoencoder state dict (scale/shift are not in it)."""
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    ch_mult = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels]
    blocks = {k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}
    return {
        "resolution": 256,
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "ch": ch,
        "out_ch": int(sd["decoder.conv_out.weight"].shape[0]),
        "ch_mult": ch_mult,
        "num_res_blocks": len(blocks),
        "z_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "scale_factor": scale_factor,
        "shift_factor": shift_factor,
        "use_quant_conv": "quant_conv.weight" in sd,
    }
