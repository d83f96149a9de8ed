"""FLUX.1 weights as other tools ship them: single safetensors files in the original (BFL / LDM) layout, and
GGUF files of quantized transformers (ComfyUI-GGUF's), read into pictor's key names, with the architecture
read off the tensor shapes so that no config is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from pictor.checkpoint import CheckpointError, read_safetensors, strip_prefixes
from pictor.gguf_files import GGUFTensor, read_gguf
from pictor.models.flux import FluxParams
from pictor.models.ggml_quants import FORMATS
from pictor.models.weight_storage import GGML_TYPE_KEY, STORED_PREFIXES

# Prefixes that other tools put in front of FLUX.1 transformer keys (ComfyUI / original checkpoints).
FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
AE_PREFIXES = ("first_stage_model.", "vae.", "ae.")


# ComfyUI's "scaled FP8" files (e.g. flux1-krea-dev_fp8_scaled): an empty `scaled_fp8` tensor marks the
# layout; each FP8 linear weight W8 comes with `<layer>.scale_weight` s and means W8 * s (a per-tensor scale
# lets the small weights of a trained model use FP8's whole range), and may carry `<layer>.scale_input`,
# which only FP8 matrix products read.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT, SCALE_INPUT = ".scale_weight", ".scale_input"
SCALED_WIDE_DTYPE = torch.bfloat16


def is_scaled_fp8(keys: Iterable[str]) -> bool:
    return any(k == SCALED_FP8_MARKER or k.endswith((SCALE_WEIGHT, SCALE_INPUT)) for k in keys)


def without_scales(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a model has: the scaled-FP8 marker and scales left out (shapes checks, before widening)."""
    return {
        k: v for k, v in sd.items() if k != SCALED_FP8_MARKER and not k.endswith((SCALE_WEIGHT, SCALE_INPUT))
    }


def widen_scaled_fp8(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A scaled-FP8 state dict as plain weights: each scaled W8 becomes ``W8 * scale`` rounded to bf16 (8
    significant bits against FP8's 4), the marker and scales are dropped, every other tensor is kept as
    stored. pictor's FP8 storage has no scales, so these weights are widened rather than kept FP8: plain FP8
    (`pictor convert dtype --dtype fp8`) rounds small weights more coarsely (3.3% against 2.6% relative error
    for N(0, 0.02) weights, tests/test_convert_fp8.py)."""
    out = dict(sd)
    out.pop(SCALED_FP8_MARKER, None)
    for key in [k for k in out if k.endswith(SCALE_INPUT)]:
        del out[key]
    for key in sorted(k for k in out if k.endswith(SCALE_WEIGHT)):
        scale = out.pop(key).float()
        name = key[: -len(SCALE_WEIGHT)] + ".weight"
        weight = out.get(name)
        if weight is None or weight.ndim != 2:
            raise CheckpointError(
                f"{where}: {key} scales no 2-D weight ({name} is missing); the file is damaged"
            )
        rows = weight.shape[0]
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == rows and scale.ndim <= 2 and scale.shape[0] == rows:
            scale = scale.reshape(rows, 1)  # one scale per output channel
        else:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(scale.shape)}; a scale is one number or one per output "
                f"channel of {name} ({rows})"
            )
        if not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values; the file is broken")
        out[name] = (weight.float() * scale).to(SCALED_WIDE_DTYPE)
        if not bool(torch.isfinite(out[name]).all()):  # a NaN FP8 byte, or a scale past bf16's range
            raise CheckpointError(
                f"{where}: {name} times {key} holds NaN or infinite values; the file is broken"
            )
    return out


def import_flux_transformer(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """FLUX.1 transformer single file (official, or ComfyUI's with ``model.diffusion_model.``; ComfyUI's
    scaled-FP8 files are widened, see :func:`widen_scaled_fp8`)."""
    sd = read_safetensors(path)
    sd = strip_prefixes(sd, FLUX_PREFIXES)
    if "img_in.weight" not in sd:
        raise CheckpointError(
            f"{path}: no 'img_in.weight' key — not a FLUX.1 transformer in the original layout. "
            "(A diffusers-format folder has keys like 'x_embedder.weight'; give the original single file.)"
        )
    return widen_scaled_fp8(sd, str(path)) if is_scaled_fp8(sd) else sd


# The architecture a GGUF file that pictor wrote records (`pictor convert gguf`): read back instead of
# inferred from the shapes, which assume FLUX.1's head split (1:7:7) that small models need not have.
PICTOR_CONFIG_KEY = "pictor.config"


def gguf_flux_tensors(path: str | os.PathLike[str]) -> dict[str, GGUFTensor]:
    """A GGUF FLUX.1 transformer's tensors by pictor key (prefixes stripped), checked to be one."""
    return _gguf_flux(path)[0]


def gguf_pictor_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What pictor recorded in a GGUF file it wrote (`pictor convert gguf`): the transformer's FluxParams
    (``model``), the bundle's generation ``defaults``, ``kontext``, ``control`` and the autoencoder's
    ``scale_factor`` and ``shift_factor``, checked; None for a file pictor did not write."""
    recorded = _gguf_flux(path)[1].get(PICTOR_CONFIG_KEY)
    if recorded is None:
        return None
    try:
        record = json.loads(recorded)
        FluxParams.from_dict(record["model"])  # the fields and their types, as a bundle's config is read
        ae = record.get("autoencoder", {})
        checked = {
            "model": dict(record["model"]),
            "defaults": dict(record.get("defaults", {})),
            "kontext": bool(record.get("kontext", False)),
            "control": record.get("control"),
            "autoencoder": {k: float(ae[k]) for k in ("scale_factor", "shift_factor") if k in ae},
        }
        if checked["control"] not in (None, "canny", "depth"):
            raise ValueError(checked["control"])
    except (TypeError, ValueError, KeyError, AttributeError):
        raise CheckpointError(
            f"{path}: {PICTOR_CONFIG_KEY} is not pictor's record; the file is damaged"
        ) from None
    return checked


def _gguf_flux(path: str | os.PathLike[str]) -> tuple[dict[str, GGUFTensor], dict[str, Any]]:
    gguf = read_gguf(path)
    tensors = strip_prefixes(gguf.tensors, FLUX_PREFIXES)  # type: ignore[arg-type]
    if "img_in.weight" not in tensors:
        arch = gguf.metadata.get("general.architecture", "unknown")
        raise CheckpointError(
            f"{path}: no 'img_in.weight' tensor (architecture {arch!r}) — not a FLUX.1 transformer; "
            "pictor reads GGUF files of FLUX.1 transformers such as ComfyUI-GGUF's"
        )
    return tensors, gguf.metadata  # type: ignore[return-value]


def flux_gguf_shapes(tensors: Mapping[str, GGUFTensor]) -> dict[str, torch.Tensor]:
    """Meta tensors of each tensor's logical shape (what :func:`infer_flux_params` reads)."""
    return {k: torch.empty(t.shape, device="meta") for k, t in tensors.items()}


def keeps_blocks(key: str, t: GGUFTensor) -> bool:
    """Whether a GGUF tensor stays in its GGML blocks in pictor: the quantized weights of the blocks' linear
    layers (the 98% of FLUX.1 that GGUF files shrink). Anything else quantized is dequantized on import."""
    return (
        key.startswith(STORED_PREFIXES) and key.endswith(".weight") and len(t.shape) == 2 and not t.is_dense
    )


def import_flux_gguf(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A GGUF FLUX.1 transformer as a pictor state dict: block linears keep their GGML bytes (uint8
    ``[out, bytes per row]``, beside ``ggml_type``); other tensors are F32/F16/BF16 as stored, or, if a file
    quantized one, dequantized to float32 (exact: a block's scale times its small integers fits)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in gguf_flux_tensors(path).items():
        if keeps_blocks(key, t):
            out[key] = t.data.view(t.shape[0], -1)
            out[key[: -len("weight")] + GGML_TYPE_KEY] = torch.tensor(
                FORMATS[t.format].type_id, dtype=torch.int32
            )
        else:
            out[key] = t.to_tensor()
    return out


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
