"""diffusers' AutoencoderKL config for pictor's AutoEncoder (tests and benchmarks only: diffusers is a
test-only dependency). diffusers' own ``convert_ldm_vae_checkpoint`` maps the weights' keys."""

from __future__ import annotations

from typing import Any

from pictor.models.autoencoder import AutoEncoderParams


def diffusers_config(p: AutoEncoderParams) -> dict[str, Any]:
    """AutoencoderKL kwargs with the same layout as ``p`` (LDM's down/up blocks, 32 GroupNorm groups)."""
    n = len(p.ch_mult)
    return {
        "in_channels": p.in_channels,
        "out_channels": p.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [p.ch * m for m in p.ch_mult],
        "layers_per_block": p.num_res_blocks,
        "latent_channels": p.z_channels,
        "norm_num_groups": 32,
        "sample_size": p.resolution,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "use_quant_conv": p.use_quant_conv,
        "use_post_quant_conv": p.use_quant_conv,
    }
