"""Loading: a ready `Pipeline` from a bundle folder, a local bundle name, ``default`` or a preset name.
`pictor.load` is `load` here.
"""

from __future__ import annotations

import os

import torch

from pictor.checkpoint import Bundle, BundleConfig, load_bundle, load_into, state_dict_hash
from pictor.layout_files import LAYOUT_FILE
from pictor.locate import resolve
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.weight_storage import store_fp8
from pictor.pipeline import Pipeline
from pictor.pipeline_offload import check_offload
from pictor.presets import get_preset
from pictor.reference_files import REFERENCE_FILE
from pictor.t5_gguf_files import build_text_encoder


def build_models(config: BundleConfig) -> tuple[Flux, AutoEncoder]:
    return Flux(FluxParams.from_dict(config.model)), AutoEncoder(
        AutoEncoderParams.from_dict(config.autoencoder)
    )


def pipeline_from_bundle(
    bundle: Bundle,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    offload: str | None = None,
    blocks_on_device: int = 0,
) -> Pipeline:
    config = bundle.config
    with torch.device("meta"):
        transformer, autoencoder = build_models(config)
    where = str(bundle.path) if bundle.path else config.name
    load_into(transformer, bundle.transformer, f"{where}: transformer")
    store_fp8(transformer)  # an FP8 bundle's block weights stay FP8 in memory, cast per layer
    load_into(autoencoder, bundle.autoencoder, f"{where}: autoencoder")
    text = build_text_encoder(config.text_encoder)
    return Pipeline(
        transformer,
        autoencoder,
        text,
        config,
        device,
        dtype,
        offload=offload,
        blocks_on_device=blocks_on_device,
    )


def pipeline_from_preset(
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    offload: str | None = None,
    blocks_on_device: int = 0,
) -> Pipeline:
    """An untrained model with a preset's architecture; seeded, so the same every time."""
    preset = get_preset(name)
    config = BundleConfig(
        name=f"{name} (untrained)",
        preset=name,
        model=preset["model"],
        autoencoder=preset["autoencoder"],
        text_encoder=preset["text_encoder"],
        defaults=preset["defaults"],
        trained=False,
        description=preset.get("description", ""),
        kontext=bool(preset.get("kontext", False)),
        control=preset.get("control"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, autoencoder = build_models(config)
    digest = state_dict_hash({**transformer.state_dict(), **autoencoder.state_dict()})
    text = build_text_encoder(config.text_encoder)
    return Pipeline(
        transformer,
        autoencoder,
        text,
        config,
        device,
        dtype,
        model_id_hash=digest,
        offload=offload,
        blocks_on_device=blocks_on_device,
    )


def load(
    model: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    offload: str | None = None,
    blocks_on_device: int = 0,
) -> Pipeline:
    """A ready Pipeline from a bundle folder, a local bundle name, ``default``, or a preset name.

    `offload`: None (every model on `device`), "model" (each model moved onto `device` only while it runs)
    or "blocks" (the transformer's blocks too, one at a time; its first `blocks_on_device` stay in while it
    runs); see `Pipeline.set_offload`."""
    check_offload(offload, blocks_on_device)  # before a FLUX.1-size model is read for nothing
    ref = resolve(model)
    if ref.kind == "preset":
        pipe = pipeline_from_preset(
            ref.name, device, dtype, offload=offload, blocks_on_device=blocks_on_device
        )
        pipe.ref = ref.name
    else:
        assert ref.path is not None
        pipe = pipeline_from_bundle(load_bundle(ref.path), device, dtype, offload, blocks_on_device)
        pipe.ref = str(ref.path.resolve()) if model not in (None, "default") else "default"
        # A bundle may carry its layout adapter (`pictor train layout` output copied beside its weights).
        if (ref.path / LAYOUT_FILE).is_file():
            pipe.set_layout_adapter(ref.path / LAYOUT_FILE)
        if (ref.path / REFERENCE_FILE).is_file():  # likewise `pictor train reference` output
            pipe.set_reference_adapter(ref.path / REFERENCE_FILE)
    return pipe
