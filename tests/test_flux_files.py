from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pictor.checkpoint import CheckpointError, load_into
from pictor.flux_files import (
    import_flux_autoencoder,
    import_flux_transformer,
    infer_autoencoder_params,
    infer_flux_params,
)
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.presets import get_preset

from tiny_bundle import tiny_models


def _models() -> tuple[Flux, AutoEncoder]:
    _, flux, ae = tiny_models()
    return flux, ae


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_flux_single_file_import(tmp_path: Path, prefix: str) -> None:
    flux, ae = _models()
    path = tmp_path / "flux1.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in flux.state_dict().items()}, str(path))
    sd = import_flux_transformer(path)
    params = infer_flux_params(sd)
    tiny = get_preset("tiny")["model"]
    for key in (
        "in_channels",
        "hidden_size",
        "num_heads",
        "depth",
        "depth_single_blocks",
        "guidance_embed",
        "context_in_dim",
        "vec_in_dim",
        "mlp_ratio",
        "qkv_bias",
    ):
        assert params[key] == tiny[key], key
    model = Flux(FluxParams.from_dict({**params, "axes_dim": tiny["axes_dim"]}))
    load_into(model, sd, str(path))
    assert torch.equal(model.final_layer.linear.weight, flux.final_layer.linear.weight)

    ae_path = tmp_path / "ae.safetensors"
    save_file(
        {("first_stage_model." if prefix else "") + k: v.contiguous() for k, v in ae.state_dict().items()},
        str(ae_path),
    )
    ae_sd = import_flux_autoencoder(ae_path)
    inferred = infer_autoencoder_params(ae_sd, 1.0, 0.0)
    expected = get_preset("tiny")["autoencoder"]
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch"):
        assert inferred[key] == expected[key], key
    load_into(AutoEncoder(AutoEncoderParams.from_dict(inferred)), ae_sd, str(ae_path))


def test_not_a_flux_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"x_embedder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"not a FLUX\.1 transformer"):
        import_flux_transformer(path)
    ae = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(ae))
    with pytest.raises(CheckpointError, match="not an LDM/FLUX autoencoder"):
        import_flux_autoencoder(ae)


def test_pickles_are_refused_without_opening(tmp_path: Path) -> None:
    path = tmp_path / "flux1.ckpt"
    path.write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        import_flux_transformer(path)
