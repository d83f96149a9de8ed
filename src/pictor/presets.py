"""Named model configurations, from test-sized to FLUX.1-sized.

A preset is the JSON-able part of a bundle config: transformer params (FluxParams fields), autoencoder params
(AutoEncoderParams fields), the text-encoder config and the generation defaults. Weights come from a bundle;
a preset alone builds an untrained model with the training init.
"""

from __future__ import annotations

import copy
from typing import Any

MINILM_DIM = 384  # all-MiniLM-L6-v2 hidden size: both the token states and the pooled vector

# Generation defaults. guidance_mode: "cfg" (real classifier-free guidance with a negative prompt),
# "distilled" (FLUX.1-dev: guidance is an input of the model), "none" (FLUX.1-schnell).
_SMALL_DEFAULTS = {
    "width": 64,
    "height": 64,
    "steps": 20,
    "guidance": 4.0,
    "sampler": "euler",
    "schedule": "flux",
    "guidance_mode": "cfg",
}

_TINY_AE = {
    "resolution": 32,
    "in_channels": 3,
    "ch": 32,
    "out_ch": 3,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "z_channels": 4,
    "scale_factor": 1.0,
    "shift_factor": 0.0,
}

_FLUX_AE = {
    "resolution": 256,
    "in_channels": 3,
    "ch": 128,
    "out_ch": 3,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}


def _flux_model(guidance_embed: bool) -> dict[str, Any]:
    return {
        "in_channels": 64,
        "out_channels": 64,
        "vec_in_dim": 768,
        "context_in_dim": 4096,
        "hidden_size": 3072,
        "mlp_ratio": 4.0,
        "num_heads": 24,
        "depth": 19,
        "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56],
        "theta": 10_000,
        "qkv_bias": True,
        "guidance_embed": guidance_embed,
    }


_FLUX_TEXT = {
    "kind": "flux",
    "t5": {"kind": "t5", "path": None, "max_length": 512},
    "clip": {"kind": "clip", "path": None, "max_length": 77},
}

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: one block of each kind, head dim 16. Runs a step in milliseconds.
    "tiny": {
        "description": "test-sized model (1 double + 1 single block, head dim 16)",
        "model": {
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": MINILM_DIM,
            "context_in_dim": MINILM_DIM,
            "hidden_size": 32,
            "mlp_ratio": 2.0,
            "num_heads": 2,
            "depth": 1,
            "depth_single_blocks": 1,
            "axes_dim": [4, 6, 6],
            "theta": 10_000,
            "qkv_bias": True,
            "guidance_embed": False,
        },
        "autoencoder": _TINY_AE,
        "text_encoder": {"kind": "minilm", "max_length": 16},
        "defaults": {**_SMALL_DEFAULTS, "width": 32, "height": 32, "steps": 4},
    },
    # The shipped default model's architecture: 64x64 shapes images, f=4 autoencoder, 8x8 latent tokens.
    "shapes-small": {
        "description": "default model architecture for the 64x64 shapes world",
        "model": {
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": MINILM_DIM,
            "context_in_dim": MINILM_DIM,
            "hidden_size": 256,
            "mlp_ratio": 4.0,
            "num_heads": 4,
            "depth": 2,
            "depth_single_blocks": 4,
            "axes_dim": [16, 24, 24],
            "theta": 10_000,
            "qkv_bias": True,
            "guidance_embed": False,
        },
        "autoencoder": {
            "resolution": 64,
            "in_channels": 3,
            "ch": 32,
            "out_ch": 3,
            "ch_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "z_channels": 4,
            "scale_factor": 1.0,
            "shift_factor": 0.0,
        },
        "text_encoder": {"kind": "minilm", "max_length": 32},
        "defaults": dict(_SMALL_DEFAULTS),
    },
    "flux-dev": {
        "description": "FLUX.1 [dev] architecture (12B); weights from local files via `pictor convert flux`",
        "model": _flux_model(guidance_embed=True),
        "autoencoder": _FLUX_AE,
        "text_encoder": _FLUX_TEXT,
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 28,
            "guidance": 3.5,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
    },
    # FLUX.1 Kontext [dev]: FLUX.1 [dev]'s architecture and keys, trained to edit a context image by
    # instruction (`pictor.context_images`); guidance 2.5 is BFL's reference default for it.
    "flux-kontext-dev": {
        "description": "FLUX.1 Kontext [dev] (12B, edits a --context image); weights from local files",
        "model": _flux_model(guidance_embed=True),
        "autoencoder": _FLUX_AE,
        "text_encoder": _FLUX_TEXT,
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 28,
            "guidance": 2.5,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
        "kontext": True,
    },
    # FLUX.1 Fill [dev]: [dev] with a wider input (the masked picture and the mask beside the noise,
    # `pictor.fill_images`); it only repaints masked pictures. 50 steps and guidance 30 are the settings of
    # diffusers' FluxFillPipeline example.
    "flux-fill-dev": {
        "description": "FLUX.1 Fill [dev] (12B, repaints masks with pictor edit); weights from local files",
        "model": {**_flux_model(guidance_embed=True), "in_channels": 384},
        "autoencoder": _FLUX_AE,
        "text_encoder": _FLUX_TEXT,
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 50,
            "guidance": 30.0,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
    },
    # FLUX.1 Canny / Depth [dev]: [dev] reading a control picture's latents beside the noise
    # (`pictor.control_images`). Steps and guidance are those of diffusers' FluxControlPipeline examples.
    "flux-canny-dev": {
        "description": "FLUX.1 Canny [dev] (12B, follows an edge map: --control); weights from local files",
        "model": {**_flux_model(guidance_embed=True), "in_channels": 128},
        "autoencoder": _FLUX_AE,
        "text_encoder": _FLUX_TEXT,
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 50,
            "guidance": 30.0,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
        "control": "canny",
    },
    "flux-depth-dev": {
        "description": "FLUX.1 Depth [dev] (12B, follows a depth map: --control); weights from local files",
        "model": {**_flux_model(guidance_embed=True), "in_channels": 128},
        "autoencoder": _FLUX_AE,
        "text_encoder": _FLUX_TEXT,
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 30,
            "guidance": 10.0,
            "sampler": "euler",
            "schedule": "flux",
            "guidance_mode": "distilled",
        },
        "control": "depth",
    },
    "flux-schnell": {
        "description": "FLUX.1 [schnell] architecture (12B, 4 steps); weights from local files",
        "model": _flux_model(guidance_embed=False),
        "autoencoder": _FLUX_AE,
        "text_encoder": {**_FLUX_TEXT, "t5": {"kind": "t5", "path": None, "max_length": 256}},
        "defaults": {
            "width": 1024,
            "height": 1024,
            "steps": 4,
            "guidance": 0.0,
            "sampler": "euler",
            "schedule": "linear",
            "guidance_mode": "none",
        },
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of a preset, so callers can edit it freely."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
