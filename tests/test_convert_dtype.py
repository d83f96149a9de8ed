"""`pictor convert dtype`: a bundle's weights stored in fp16 or bf16 (half the bytes of fp32), the same
config, and pictures that differ from the fp32 bundle's only by the rounding of the weights."""

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
    load_bundle,
    read_safetensors,
    save_bundle,
)
from pictor.cli import main
from pictor.loading import load
from pictor.pipeline import GenerationRequest

from tiny_bundle import tiny_models


def _bundle(path: Path, big: float | None = None) -> Path:
    """A tiny bundle with random (seeded) weights; ``big`` puts that value into one transformer weight."""
    cfg, flux, ae = tiny_models(description="random weights for a test", training={"stage": "t2i", "step": 7})
    sd = flux.state_dict()
    if big is not None:
        sd = {**sd, "img_in.bias": sd["img_in.bias"].clone().index_fill_(0, torch.tensor([0]), big)}
    save_bundle(path, cfg, sd, ae.state_dict())
    return path


def _picture(model: Path) -> np.ndarray:
    pipe = load(model, device="cpu")
    assert pipe.dtype == torch.float32  # the CPU computes in float32 whatever the storage
    (result,) = pipe.generate(GenerationRequest("a red circle", steps=4, seed=5, width=32, height=32))
    return np.asarray(result.image).astype(np.float64)


def test_fp16_halves_the_bundle_and_keeps_its_config_and_pictures(tmp_path: Path) -> None:
    src = _bundle(tmp_path / "fp32")
    out = cast_bundle(src, tmp_path / "fp16", "fp16")
    for name in (TRANSFORMER_FILE, AUTOENCODER_FILE):
        ratio = (out / name).stat().st_size / (src / name).stat().st_size
        assert 0.49 < ratio < 0.52, (name, ratio)
    bundle = load_bundle(out, verify=True)  # the new files match the new hashes
    original = load_bundle(src)
    for mine, theirs in (
        (bundle.transformer, original.transformer),
        (bundle.autoencoder, original.autoencoder),
    ):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == torch.float16
            assert torch.equal(mine[key], theirs[key].half()), key
    new_cfg = json.loads((out / "config.json").read_text())
    old_cfg = json.loads((src / "config.json").read_text())
    assert new_cfg.pop("hashes") != old_cfg.pop("hashes")
    assert new_cfg == old_cfg  # name, architecture, defaults and training record stay

    full, half = _picture(src), _picture(out)
    assert full.std() > 5  # random weights still draw a non-constant picture to compare
    assert np.abs(full - half).mean() < 1.0, np.abs(full - half).mean()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_fp16_refuses_weights_beyond_its_range_and_bf16_keeps_them(tmp_path: Path) -> None:
    src = _bundle(tmp_path / "big", big=1e6)
    with pytest.raises(CheckpointError, match=r"img_in\.bias holds 1e\+06.*bf16"):
        cast_bundle(src, tmp_path / "fp16", "fp16")
    assert not (tmp_path / "fp16").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staged folder is gone
    out = cast_bundle(src, tmp_path / "bf16", "bf16")
    assert read_safetensors(out / TRANSFORMER_FILE)["img_in.bias"][0].item() == 999424.0  # bf16's nearest


def test_cli_casts_in_place_and_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _bundle(tmp_path / "b")
    before = read_safetensors(src / TRANSFORMER_FILE)
    assert main(["convert", "dtype", str(src), "--dtype", "fp16", "--out", str(src)]) == 0
    assert "fp16:" in capsys.readouterr().out
    assert read_safetensors(src / TRANSFORMER_FILE)["img_in.weight"].dtype == torch.float16
    assert main(["convert", "dtype", str(src), "--dtype", "fp32", "--out", str(tmp_path / "back")]) == 0
    back = read_safetensors(tmp_path / "back" / TRANSFORMER_FILE)
    assert all(
        back[k].dtype == torch.float32 and torch.equal(back[k], before[k].half().float()) for k in back
    )

    assert main(["convert", "dtype", str(tmp_path / "nothing"), "--dtype", "fp16", "--out", "x"]) == 2
    assert "not a pictor model bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert", "dtype", str(src), "--dtype", "int8", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_an_out_folder_that_is_not_just_a_bundle_is_refused_and_kept(tmp_path: Path) -> None:
    src = _bundle(tmp_path / "b")
    models = tmp_path / "models"
    (models / "other").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is not a model bundle"):
        cast_bundle(src, models, "fp16")  # replacing it would delete every model in it
    assert (models / "other").is_dir()
    (src / "notes.txt").write_text("kept")
    with pytest.raises(CheckpointError, match=r"notes\.txt"):
        cast_bundle(src, src, "fp16")  # in place, the notes would be lost
    assert (src / "notes.txt").read_text() == "kept"
    assert read_safetensors(src / TRANSFORMER_FILE)["img_in.weight"].dtype == torch.float32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
