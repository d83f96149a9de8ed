"""`pictor convert flux`: FLUX.1 original single files (ComfyUI's prefix included) become a bundle."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pictor.checkpoint import CheckpointError, load_bundle
from pictor.convert import convert_flux
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.presets import get_preset

# Head size 32 split 1:7:7 as FLUX.1 does (axes 4, 14, 14): the architecture is read off the shapes.
PARAMS = {**get_preset("tiny")["model"], "hidden_size": 64, "num_heads": 2, "axes_dim": [4, 14, 14]}


def _files(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    flux = Flux(FluxParams.from_dict(PARAMS))
    ae = AutoEncoder(AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]))
    paths = {"transformer": root / "flux1-dev.safetensors", "ae": root / "ae.safetensors"}
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in flux.state_dict().items()}
    save_file(comfy, paths["transformer"])
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, paths["ae"])
    for name in ("t5", "clip"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
        paths[name] = root / name
    return paths


def test_single_files_become_a_bundle(tmp_path: Path) -> None:
    f = _files(tmp_path)
    out = convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], tmp_path / "bundle")
    bundle = load_bundle(out, verify=True)
    original = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(f["transformer"]).items()}
    assert bundle.transformer.keys() == original.keys()
    assert all(torch.equal(bundle.transformer[k], original[k]) for k in original)
    assert bundle.config.model["axes_dim"] == [4, 14, 14] and bundle.config.name == "flux1-dev"
    assert bundle.config.text_encoder["t5"]["path"] == str(f["t5"].resolve())
    assert stat.S_IMODE(out.stat().st_mode) & 0o044  # readable by others under the usual umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_wrong_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    f = _files(tmp_path)
    with pytest.raises(CheckpointError, match="not a T5 model folder"):
        convert_flux(f["transformer"], f["ae"], tmp_path / "nowhere", f["clip"], tmp_path / "bundle")
    with pytest.raises(CheckpointError, match="not an LDM/FLUX autoencoder"):
        convert_flux(f["transformer"], f["transformer"], f["t5"], f["clip"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_out_folder_that_is_not_a_bundle_is_never_replaced(tmp_path: Path) -> None:
    f = _files(tmp_path)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "important.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists and is not a model bundle"):
        convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], photos)
    assert (photos / "important.txt").read_text() == "precious" and (photos / "sub").is_dir()
    # A bundle may be converted over (the same command run again).
    out = convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], tmp_path / "bundle")
    assert convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], out) == out


def test_a_fill_transformer_becomes_a_flux_fill_bundle(tmp_path: Path) -> None:
    """FLUX.1 Fill [dev] is known by its input width (noise, masked-picture latents and the folded mask:
    2 x 64 + 256 channels at FLUX.1's scale); its bundle takes the flux-fill-dev preset's defaults."""
    torch.manual_seed(0)
    params = {**PARAMS, "guidance_embed": True}
    factor = AutoEncoderParams.from_dict(get_preset("tiny")["autoencoder"]).downsample_factor  # _files' AE
    params["in_channels"] = 2 * params["out_channels"] + 4 * factor * factor
    flux = Flux(FluxParams.from_dict(params))
    f = _files(tmp_path)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, f["transformer"])
    bundle = load_bundle(convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], tmp_path / "fill"))
    assert bundle.config.preset == "flux-fill-dev"
    assert bundle.config.model["in_channels"] == params["in_channels"]
    assert bundle.config.defaults["guidance"] == 30.0 and bundle.config.defaults["steps"] == 50
    with pytest.raises(CheckpointError, match="no Kontext model"):
        convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], tmp_path / "k", kontext=True)


def test_a_transformer_with_other_extra_inputs_is_refused(tmp_path: Path) -> None:
    """An input width that is neither FLUX.1's, Fill's (2 x out + 4 f^2) nor Canny/Depth's (2 x out) is
    something pictor cannot feed, so the conversion says so instead of labelling it as one of them."""
    torch.manual_seed(0)
    params = {**PARAMS, "guidance_embed": True}
    params["in_channels"] = 2 * params["out_channels"] + 8  # tiny AE: Fill would be + 4 x 2^2 = 16
    f = _files(tmp_path)
    save_file(
        {k: v.contiguous() for k, v in Flux(FluxParams.from_dict(params)).state_dict().items()},
        f["transformer"],
    )
    with pytest.raises(CheckpointError, match="extra inputs that pictor does not know"):
        convert_flux(f["transformer"], f["ae"], f["t5"], f["clip"], tmp_path / "other")
    assert not (tmp_path / "other").exists()
