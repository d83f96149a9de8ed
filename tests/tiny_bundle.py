"""The tiny preset's parts with seeded random weights, for tests that need a bundle or its pieces.

Shared by test_checkpoint.py, test_convert_dtype.py, test_bundle_defaults.py and the prompt-pass tests
(test_regional_prompts.py, test_regional_attention.py, test_composable_prompts.py) (importable because
pyproject puts tests/ on the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pictor.checkpoint import BundleConfig, save_bundle
from pictor.generation_request import GenerationRequest
from pictor.guided_velocity import Velocity, guided_velocity
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.presets import get_preset


def tiny_models(name: str = "tiny-random", **config: Any) -> tuple[BundleConfig, Flux, AutoEncoder]:
    """A bundle config for the tiny preset (extra BundleConfig fields in `config`) and default-initialised
    models (no zeroed layers: every weight matters), seeded so every test gets the same weights."""
    p = get_preset("tiny")
    torch.manual_seed(0)
    cfg = BundleConfig(
        name=name,
        preset="tiny",
        model=p["model"],
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults=p["defaults"],
        **config,
    )
    flux = Flux(FluxParams.from_dict(p["model"]))
    return cfg, flux, AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"]))


def saved_tiny_bundle(folder: Path, name: str) -> Path:
    """`tiny_models(name, trained=True)` saved as the bundle folder `folder / "tiny"`."""
    path = folder / "tiny"
    cfg, flux, ae = tiny_models(name, trained=True)
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


def velocity_32(pipe: Any, prompt: str, **kw: Any) -> Velocity:
    """The velocity of a resolved 32x32 request (4 steps, seed 1, `kw`) for a run of 2 images on the 8x8
    latent grid of the tiny preset: what the prompt-pass tests (regions, AND) compare."""
    r = pipe.resolve_request(GenerationRequest(prompt, width=32, height=32, steps=4, seed=1, **kw))
    return guided_velocity(pipe, r, 2, 8, 8)
