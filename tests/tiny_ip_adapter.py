"""Tiny XLabs-layout IP-Adapter files and CLIP vision folders for the tests (random weights, made in tmp)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pictor.models.ip_adapter import IPAdapter

from tiny_flux import randomize_

IMAGE_DIM, CLIP_SIZE = 12, 30  # CLIP's projection width and picture size


def clip_vision_folder(folder: Path, seed: int = 1) -> Path:
    """A `save_pretrained` CLIPVisionModelWithProjection (and its image processor) with random weights."""
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_SIZE,
        patch_size=6,
        projection_dim=IMAGE_DIM,
    )
    torch.manual_seed(seed)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size=CLIP_SIZE, crop_size=CLIP_SIZE).save_pretrained(folder)
    return folder


def ip_adapter_file(
    path: Path, context_dim: int, hidden_size: int, depth: int, seed: int = 2, tokens: int = 4
) -> Path:
    """An ip_adapter.safetensors with XLabs' keys; its block projections are strong enough that the picture
    clearly shows in a tiny random model."""
    adapter = IPAdapter(IMAGE_DIM, context_dim, hidden_size, tokens, depth)
    randomize_(adapter, seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "double_blocks" in name:
                p.mul_(6.0)
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, path)
    return path
