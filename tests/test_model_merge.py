"""`pictor merge`: weighted sums and add-difference of bundles, tensor by tensor, in model A's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    TRANSFORMER_FILE,
    CheckpointError,
    read_safetensors,
    save_bundle,
)
from pictor.cli import main
from pictor.loading import load
from pictor.model_merge import merge_models
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.pipeline import GenerationRequest

from tiny_bundle import tiny_models


def _bundle(path: Path, seed: int, name: str, **model: object) -> Path:
    cfg, _, ae = tiny_models(name=name)
    cfg.model = {**cfg.model, **model}
    torch.manual_seed(seed)
    flux = Flux(FluxParams.from_dict(cfg.model))
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    return path


def _pixels(model: Path) -> np.ndarray:
    (result,) = load(model, device="cpu").generate(GenerationRequest("a red circle", steps=3, seed=5))
    return np.asarray(result.image).astype(int)


def test_weighted_and_add_difference_follow_their_formulas(tmp_path: Path) -> None:
    a, b, c = (_bundle(tmp_path / n, seed, n) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    wa, wb, wc = (read_safetensors(m / TRANSFORMER_FILE) for m in (a, b, c))

    out = merge_models(a, b, tmp_path / "w", 0.25)
    merged = read_safetensors(out / TRANSFORMER_FILE)
    assert merged.keys() == wa.keys()
    assert all(torch.equal(merged[k], 0.75 * wa[k] + 0.25 * wb[k]) for k in wa)
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "a-b-weighted-0.25" and config["description"] == "merged: 0.75 * a + 0.25 * b"
    assert config["training"]["method"] == "weighted" and config["training"]["alpha"] == 0.25
    assert [m["name"] for m in config["training"]["models"]] == ["a", "b"]
    assert (out / AUTOENCODER_FILE).read_bytes() == (a / AUTOENCODER_FILE).read_bytes()

    diff = merge_models(a, b, tmp_path / "d", 0.5, "add-difference", c, name="a+(b-c)")
    merged = read_safetensors(diff / TRANSFORMER_FILE)
    assert all(torch.equal(merged[k], wa[k] + 0.5 * (wb[k] - wc[k])) for k in wa)
    assert json.loads((diff / "config.json").read_text())["name"] == "a+(b-c)"

    # alpha 0 is A, bit for bit, and draws A's picture; alpha 0.5 draws neither A's nor B's.
    zero = merge_models(a, b, tmp_path / "zero", 0.0)
    assert all(torch.equal(v, wa[k]) for k, v in read_safetensors(zero / TRANSFORMER_FILE).items())
    pa, pb, half = _pixels(a), _pixels(b), _pixels(merge_models(a, b, tmp_path / "half", 0.5))
    assert np.array_equal(_pixels(zero), pa)
    assert np.abs(half - pa).max() > 10 and np.abs(half - pb).max() > 10


def test_the_result_takes_model_as_dtype_and_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    a, b = _bundle(tmp_path / "a", 1, "a"), _bundle(tmp_path / "b", 2, "b")
    a8 = cast_bundle(a, tmp_path / "a8", "fp8")
    out = merge_models(a8, b, tmp_path / "m8", 0.5)
    merged, w8, wb = (read_safetensors(m / TRANSFORMER_FILE) for m in (out, a8, b))
    key = "single_blocks.0.linear1.weight"
    assert merged[key].dtype == torch.float8_e4m3fn
    assert torch.equal(merged[key], (0.5 * w8[key].float() + 0.5 * wb[key]).to(torch.float8_e4m3fn))
    a16 = cast_bundle(a, tmp_path / "a16", "fp16")
    with pytest.raises(CheckpointError, match=r"does not fit float16.*bf16 or fp32 copy"):
        merge_models(a16, b, tmp_path / "x", 1e6, "add-difference", a)
    assert not (tmp_path / "x").exists()


def test_bad_merges_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    a, b = _bundle(tmp_path / "a", 1, "a"), _bundle(tmp_path / "b", 2, "b")
    wide = _bundle(tmp_path / "wide", 3, "wide", hidden_size=64, axes_dim=[4, 14, 14])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="B wide is another architecture than a: model axes_dim"):
        merge_models(a, wide, out, 0.5)
    with pytest.raises(CheckpointError, match="needs a third model"):
        merge_models(a, b, out, 0.5, "add-difference")
    with pytest.raises(CheckpointError, match="for add-difference only"):
        merge_models(a, b, out, 0.5, c=b)
    with pytest.raises(CheckpointError, match="finite"):
        merge_models(a, b, out, float("inf"))
    with pytest.raises(CheckpointError, match="preset"):
        merge_models(a, "tiny", out, 0.5)
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match="not a model bundle"):
        merge_models(a, b, tmp_path / "notes", 0.5)
    damaged = b / TRANSFORMER_FILE
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="damaged"):
        merge_models(a, b, out, 0.5)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_autoencoders_are_refused_too(tmp_path: Path) -> None:
    a = _bundle(tmp_path / "a", 1, "a")
    cfg, flux, _ = tiny_models(name="b")
    cfg.autoencoder = {**cfg.autoencoder, "ch": 64}
    save_bundle(
        tmp_path / "b",
        cfg,
        flux.state_dict(),
        AutoEncoder(AutoEncoderParams.from_dict(cfg.autoencoder)).state_dict(),
    )
    with pytest.raises(CheckpointError, match="autoencoder ch is 64, not 32"):
        merge_models(a, tmp_path / "b", tmp_path / "out", 0.5)


def test_cli_merges_and_explains_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _bundle(tmp_path / "a", 1, "a"), _bundle(tmp_path / "b", 2, "b")
    assert main(["merge", str(a), str(b), "--alpha", "0.3", "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert main(["merge", str(a), str(b), "--alpha", "0.3", "--method", "add-difference", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "needs a third model" in err and len(err.strip().splitlines()) == 1


def test_shapes_nan_and_history(tmp_path: Path) -> None:
    """Another shape is named before anything is merged; a broken input is named as such; alpha 0 keeps A's
    bytes (-0.0 included); A's history and C's name are kept."""
    a, b, c = (_bundle(tmp_path / n, seed, n) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    cfg, flux, ae = tiny_models(name="odd")
    sd = {**flux.state_dict(), "double_blocks.0.img_attn.qkv.bias": torch.zeros(10)}
    save_bundle(tmp_path / "odd", cfg, sd, ae.state_dict())
    with pytest.raises(CheckpointError, match=r"model B .*qkv.bias is \[10\], in model A \[\d+\]"):
        merge_models(a, tmp_path / "odd", tmp_path / "x", 0.5)

    cfg, flux, ae = tiny_models(name="broken")
    sd = {k: v.clone() for k, v in flux.state_dict().items()}
    sd["img_in.weight"][0, 0] = float("nan")
    save_bundle(tmp_path / "broken", cfg, sd, ae.state_dict())
    with pytest.raises(CheckpointError, match=r"model broken: img_in.weight holds NaN.*that model is broken"):
        merge_models(a, tmp_path / "broken", tmp_path / "x", 0.5)
    with pytest.raises(CheckpointError, match=r"does not fit float32 \(it overflows\); alpha 1e\+39 is far"):
        merge_models(a, b, tmp_path / "x", 1e39)
    assert not (tmp_path / "x").exists()

    wa = read_safetensors(a / TRANSFORMER_FILE)
    wa["img_in.bias"][0] = -0.0
    save_bundle(a, load(a, device="cpu").config, wa, read_safetensors(a / AUTOENCODER_FILE))
    zero = merge_models(a, b, tmp_path / "zero", 0.0)
    assert (zero / TRANSFORMER_FILE).read_bytes() == (a / TRANSFORMER_FILE).read_bytes()

    diff = merge_models(a, b, tmp_path / "d", 0.5, "add-difference", c)
    config = json.loads((diff / "config.json").read_text())
    assert config["name"] == "a-b-minus-c-add-difference-0.5"
    assert config["training"]["base_training"] == json.loads((a / "config.json").read_text())["training"]


def test_a_canny_and_a_depth_model_do_not_merge(tmp_path: Path) -> None:
    """Both are control models of one architecture, but one reads edge maps and the other depth maps."""
    made = []
    for seed, kind in ((1, "canny"), (2, "depth")):
        cfg, _, ae = tiny_models(name=kind)
        cfg.model = {**cfg.model, "in_channels": 2 * cfg.model["out_channels"]}
        cfg.control = kind
        torch.manual_seed(seed)
        save_bundle(tmp_path / kind, cfg, Flux(FluxParams.from_dict(cfg.model)).state_dict(), ae.state_dict())
        made.append(tmp_path / kind)
    with pytest.raises(CheckpointError, match="B depth reads depth control pictures, canny reads canny"):
        merge_models(made[0], made[1], tmp_path / "out", 0.5)
    out = merge_models(made[0], made[0], tmp_path / "same", 0.5)
    assert json.loads((out / "config.json").read_text())["control"] == "canny"
