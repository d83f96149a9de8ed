"""Tiny FLUX-layout transformers for the tests: one small config, every weight random, diffusers' reference.

Shared by tests/models/test_flux.py and test_lora.py (importable because pyproject puts tests/ on the path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents

LAT_C = 4  # latent channels; the transformer sees 2x2 patches of them
LAT_H, LAT_W = 6, 10  # non-square latent -> 3x5 packed tokens
N_TXT, BATCH = 7, 2


def load_reference() -> ModuleType:
    """benchmarks/_flux_reference.py: diffusers' FluxTransformer2DModel built from our weights via diffusers'
    own key converter (diffusers is a test-only dependency, so it lives beside the benchmarks)."""
    return load_benchmark_module("_flux_reference")


def load_benchmark_module(name: str) -> ModuleType:
    """A helper module of benchmarks/ (not a package), shared by the tests and the benchmarks."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_params(depth: int = 1, guidance_embed: bool = False) -> FluxParams:
    """`depth` double and `depth` single blocks, diffusers' mlp_ratio 4, RoPE axes summing to head size."""
    return FluxParams(
        in_channels=4 * LAT_C,
        out_channels=4 * LAT_C,
        vec_in_dim=24,
        context_in_dim=20,
        hidden_size=32,
        mlp_ratio=4.0,
        num_heads=2,
        depth=depth,
        depth_single_blocks=depth,
        axes_dim=[4, 6, 6],
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm gains around 1, everything else N(0, 0.1)): no zero-init shortcut hides a
    wrong layer or a wrong update."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if name.endswith(".scale") else 0.1 * noise)


def random_flux(params: FluxParams, seed: int = 0) -> Flux:
    model = Flux(params).eval()
    randomize_(model, seed)
    return model


def make_inputs(params: FluxParams, seed: int = 1) -> dict[str, torch.Tensor | None]:
    """A batch of 2 with every input random (guidance only for a guidance-embedding model)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(BATCH, LAT_C, LAT_H, LAT_W, generator=gen)
    return {
        "img": pack_latents(z),
        "img_ids": make_img_ids(BATCH, LAT_H, LAT_W),
        "txt": torch.randn(BATCH, N_TXT, params.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(BATCH, N_TXT),
        "timesteps": torch.tensor([0.3, 0.85]),
        "y": torch.randn(BATCH, params.vec_in_dim, generator=gen),
        "guidance": torch.tensor([3.5, 1.0]) if params.guidance_embed else None,
    }
