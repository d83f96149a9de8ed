"""The tiny preset's parts with seeded random weights, for tests that need a bundle or its pieces.

Shared by test_checkpoint.py, test_convert_dtype.py and test_bundle_defaults.py (importable because
pyproject puts tests/ on the path).
"""

from __future__ import annotations

from typing import Any

import torch

from pictor.checkpoint import BundleConfig
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
