"""FP8 bundles: `pictor convert dtype --dtype fp8`, FP8 FLUX.1 single files, and generation from them with the
block weights kept FP8 in memory: the pictures are the float32 model's with the weights rounded to FP8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    TRANSFORMER_FILE,
    CheckpointError,
    read_safetensors,
    save_bundle,
)
from pictor.cli import main
from pictor.convert import convert_flux
from pictor.loading import load
from pictor.lora_files import save_lora
from pictor.models.flux import Flux, FluxParams
from pictor.models.lora import add_lora
from pictor.models.weight_storage import FP8_STORAGE, STORED_PREFIXES
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.presets import get_preset

from tiny_bundle import tiny_models

REQUEST = GenerationRequest("a red circle", steps=3, seed=5, width=32, height=32)


def _is_stored(key: str, t: torch.Tensor) -> bool:
    return key.startswith(STORED_PREFIXES) and key.endswith(".weight") and t.ndim == 2


def _bundle(path: Path, round_to_fp8: bool = False, big: float | None = None) -> Path:
    cfg, flux, ae = tiny_models(description="random weights for a test")
    sd = {k: v.clone() for k, v in flux.state_dict().items()}
    for k, v in sd.items():
        if round_to_fp8 and _is_stored(k, v):
            sd[k] = v.to(FP8_STORAGE).float()
    if big is not None:
        sd["double_blocks.0.img_mlp.2.weight"][0, 0] = big
    save_bundle(path, cfg, sd, ae.state_dict())
    return path


def _pixels(pipe: Pipeline, request: GenerationRequest = REQUEST) -> np.ndarray:
    (result,) = pipe.generate(request)
    return np.asarray(result.image)


def test_fp8_bundle_stays_fp8_in_memory_and_draws_the_rounded_models_pictures(tmp_path: Path) -> None:
    src = _bundle(tmp_path / "fp32")
    out = cast_bundle(src, tmp_path / "fp8", "fp8")
    before, after = read_safetensors(src / TRANSFORMER_FILE), read_safetensors(out / TRANSFORMER_FILE)
    assert after.keys() == before.keys()
    for key, tensor in after.items():
        if _is_stored(key, tensor):
            assert tensor.dtype == FP8_STORAGE and torch.equal(tensor, before[key].to(FP8_STORAGE)), key
        else:  # embedders, norms, biases, the final layer: as stored
            assert tensor.dtype == torch.float32 and torch.equal(tensor, before[key]), key
    assert (out / AUTOENCODER_FILE).read_bytes() == (src / AUTOENCODER_FILE).read_bytes()
    stored_bytes = sum(t.numel() for k, t in before.items() if _is_stored(k, t))
    shrink = (src / TRANSFORMER_FILE).stat().st_size - (out / TRANSFORMER_FILE).stat().st_size
    assert shrink > 2.95 * stored_bytes  # 4 bytes -> 1 per stored weight (headers differ a little)

    pipe = load(out, device="cpu")
    weights = dict(pipe.transformer.named_parameters())
    assert sum(t.dtype == FP8_STORAGE for t in weights.values()) == sum(
        _is_stored(k, t) for k, t in before.items()
    )
    assert all(t.dtype in (FP8_STORAGE, torch.float32) for t in weights.values())
    (result,) = pipe.generate(REQUEST)
    assert result.record["weight_dtype"] == "float8_e4m3fn"
    rounded = load(_bundle(tmp_path / "rounded", round_to_fp8=True), device="cpu")
    assert "weight_dtype" not in rounded.generate(REQUEST)[0].record
    want = _pixels(rounded)
    assert want.std() > 5  # a non-constant picture to compare
    assert np.array_equal(np.asarray(result.image), want)  # per-layer casting is exact


def test_loras_apply_to_an_fp8_bundle_as_to_the_rounded_float32_one(tmp_path: Path) -> None:
    _, flux, _ = tiny_models()
    torch.manual_seed(1)
    add_lora(flux, "style", rank=2)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    lora = tmp_path / "style.safetensors"
    save_lora(flux, lora, "style")
    fp8 = load(cast_bundle(_bundle(tmp_path / "fp32"), tmp_path / "fp8", "fp8"), device="cpu")
    rounded = load(_bundle(tmp_path / "rounded", round_to_fp8=True), device="cpu")
    plain = _pixels(fp8)
    for pipe in (fp8, rounded):
        pipe.add_lora(lora, 1.0)
    assert fp8.transformer.double_blocks[0].img_attn.qkv.weight.dtype == FP8_STORAGE  # still FP8 after
    got, want = _pixels(fp8), _pixels(rounded)
    assert np.abs(got.astype(int) - plain).max() > 10  # the LoRA changes the picture
    assert np.abs(got.astype(int) - want).max() <= 1  # the same picture, up to one 8-bit level


def test_fp8_refuses_weights_beyond_its_range_reproduces_and_casts_back(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    big = _bundle(tmp_path / "big", big=500.0)
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_mlp\.2\.weight holds 500.*bf16"):
        cast_bundle(big, tmp_path / "fp8", "fp8")
    assert not (tmp_path / "fp8").exists()
    src = _bundle(tmp_path / "src")
    assert main(["convert", "dtype", str(src), "--dtype", "fp8", "--out", str(tmp_path / "f8")]) == 0
    assert "fp8:" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "f8")]) == 0
    storage = json.loads(capsys.readouterr().out)["storage"]
    n_stored = sum(_is_stored(k, t) for k, t in read_safetensors(src / TRANSFORMER_FILE).items())
    assert storage["transformer.safetensors"]["F8_E4M3"] == n_stored
    assert set(storage["autoencoder.safetensors"]) == {"F32"}
    args = ["--model", str(tmp_path / "f8"), "--steps", "2", "--size", "32x32", "--seed", "4"]
    assert main(["generate", "a red circle", *args, "-o", str(tmp_path / "gen")]) == 0
    (made,) = sorted((tmp_path / "gen").glob("*.png"))
    capsys.readouterr()
    assert main(["reproduce", str(made), "-o", str(tmp_path / "again")]) == 0
    assert "identical" in "".join(capsys.readouterr())
    assert (
        main(["convert", "dtype", str(tmp_path / "f8"), "--dtype", "bf16", "--out", str(tmp_path / "b")]) == 0
    )
    back = read_safetensors(tmp_path / "b" / TRANSFORMER_FILE)
    assert all(t.dtype == torch.bfloat16 for t in back.values())


def _flux_file_bundle(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`pictor convert flux` of a FLUX.1 single file holding `tensors` (ComfyUI's key prefix added), made
    loadable with the tiny preset's text encoder (the tiny files are no FLUX.1)."""
    transformer = tmp_path / "flux1.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in tensors.items()}, transformer)
    save_file(
        {k: v.contiguous() for k, v in tiny_models()[2].state_dict().items()}, tmp_path / "ae.safetensors"
    )
    for name in ("t5", "clip"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    out = convert_flux(
        transformer, tmp_path / "ae.safetensors", tmp_path / "t5", tmp_path / "clip", tmp_path / "b"
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_encoder"] = tiny_models()[0].text_encoder
    cfg["defaults"] = {**cfg["defaults"], "guidance_mode": "cfg"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _flux_width_64() -> Flux:
    # Head size 32 split 1:7:7 as FLUX.1 does: the architecture is read off the shapes.
    return Flux(
        FluxParams.from_dict({**get_preset("tiny")["model"], "hidden_size": 64, "axes_dim": [4, 14, 14]})
    )


def test_an_fp8_flux_single_file_converts_and_generates(tmp_path: Path) -> None:
    """ComfyUI-style flux1-dev-fp8 files hold every tensor in FP8: the blocks stay FP8, the rest widens."""
    sd = {k: v.to(FP8_STORAGE) for k, v in _flux_width_64().state_dict().items()}
    out = _flux_file_bundle(tmp_path, sd)
    assert all(t.dtype == FP8_STORAGE for t in read_safetensors(out / TRANSFORMER_FILE).values())
    pipe = load(out, device="cpu")
    dtypes = {k: t.dtype for k, t in pipe.transformer.named_parameters()}
    assert dtypes["double_blocks.0.img_attn.qkv.weight"] == FP8_STORAGE
    assert (
        dtypes["img_in.weight"] == dtypes["double_blocks.0.img_attn.norm.query_norm.scale"] == torch.float32
    )
    image = _pixels(pipe, GenerationRequest("a red circle", steps=2, seed=1, width=32, height=32))
    assert np.isfinite(image).all() and image.std() > 0


def _scaled_fp8(sd: dict[str, torch.Tensor], per_channel: bool = False) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-FP8 layout of `sd`: block linear weights as FP8 with a scale (amax / 448, one per
    tensor or per output channel), the rest in bf16, the `scaled_fp8` marker and unit input scales."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8_STORAGE)}
    for k, v in sd.items():
        if not _is_stored(k, v):
            out[k] = v.to(torch.bfloat16)
            continue
        amax = v.abs().amax(dim=1, keepdim=True) if per_channel else v.abs().max()
        scale = (amax / 448).float()
        out[k] = (v / scale).to(FP8_STORAGE)
        out[k.removesuffix(".weight") + ".scale_weight"] = scale
        out[k.removesuffix(".weight") + ".scale_input"] = torch.ones(())
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_scaled_fp8_flux_file_is_widened_to_its_true_weights(tmp_path: Path, per_channel: bool) -> None:
    """ComfyUI's scaled FP8 (`<layer>.scale_weight`): each weight is W8 * scale, closer to the true weights
    than a plain FP8 cast of them."""
    gen = torch.Generator().manual_seed(0)  # a trained FLUX.1's weight spread: std about 0.02
    sd = {k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in _flux_width_64().state_dict().items()}
    scaled = _scaled_fp8(sd, per_channel)
    out = _flux_file_bundle(tmp_path, scaled)
    stored = read_safetensors(out / TRANSFORMER_FILE)
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in stored)
    key, scale = "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.scale_weight"
    assert torch.equal(stored[key], (scaled[key].float() * scaled[scale]).to(torch.bfloat16))
    true = sd[key]
    widened_err = (stored[key].float() - true).norm() / true.norm()
    plain_err = (true.to(FP8_STORAGE).float() - true).norm() / true.norm()
    assert widened_err < 0.9 * plain_err  # why the scales matter (measured: 2.6% against 3.3%)
    assert "scaled FP8 widened to bf16" in json.loads((out / "config.json").read_text())["description"]
    pipe = load(out, device="cpu")
    image = _pixels(pipe, GenerationRequest("a red circle", steps=2, seed=1, width=32, height=32))
    assert np.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("orphan", "scales no 2-D weight"),
        ("nan", "holds NaN or infinite values"),
        ("shape", "a scale is one number or one per output channel"),
        ("overflow", "qkv.weight times double_blocks.0.img_attn.qkv.scale_weight holds NaN or infinite"),
        ("nan byte", "qkv.weight times double_blocks.0.img_attn.qkv.scale_weight holds NaN or infinite"),
    ],
)
def test_a_damaged_scaled_fp8_file_is_refused_by_name(tmp_path: Path, damage: str, message: str) -> None:
    scaled = _scaled_fp8(_flux_width_64().state_dict())
    scale = "double_blocks.0.img_attn.qkv.scale_weight"
    if damage == "orphan":
        scaled["double_blocks.0.nothing.scale_weight"] = torch.ones(())
    elif damage == "nan":
        scaled[scale] = torch.tensor(float("nan"))
    elif damage == "overflow":  # finite, but W8 * scale is past bf16's range
        scaled[scale] = torch.tensor(1e36)
    elif damage == "nan byte":
        weight = scaled["double_blocks.0.img_attn.qkv.weight"]
        weight.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    else:
        scaled[scale] = torch.ones(3)
    with pytest.raises(CheckpointError, match=message):
        _flux_file_bundle(tmp_path, scaled)
    assert not (tmp_path / "b").exists()


def test_input_scales_alone_mark_a_scaled_file_and_are_dropped(tmp_path: Path) -> None:
    """A file with `scale_input` keys but no weight scales and no marker: nothing to widen, and the keys
    (which FLUX.1 has no place for) do not reach the bundle."""
    sd = {k: v.to(torch.bfloat16) for k, v in _flux_width_64().state_dict().items()}
    sd["double_blocks.0.img_attn.qkv.scale_input"] = torch.ones(())
    out = _flux_file_bundle(tmp_path, sd)
    assert not any(k.endswith(".scale_input") for k in read_safetensors(out / TRANSFORMER_FILE))
    load(out, device="cpu")  # strict keys: loads
