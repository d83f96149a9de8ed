"""`pictor convert dtype|gguf --dtype q6_k ... q2_k`: bundles and GGUF files with llama.cpp's K-quants.

The tiny preset's rows (32 and 64 values) are too short for 256-value super-blocks, so the models here are
the tiny preset widened to hidden size 256 (every block linear then has rows of 256, 512 or 768 values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import BundleConfig, CheckpointError, load_bundle, save_bundle
from pictor.cli import main
from pictor.convert import convert_flux
from pictor.loading import pipeline_from_bundle
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.ggml_quants import dequantize, quantize
from pictor.pipeline import GenerationRequest
from pictor.presets import get_preset

from gguf_writing import block_linear_keys
from tiny_bundle import saved_tiny_bundle


def _bundle_256(folder: Path) -> tuple[Path, Flux]:
    """The tiny preset at hidden size 256 (2 heads of 128), seeded random weights, as an fp32 bundle."""
    p = get_preset("tiny")
    model = {**p["model"], "hidden_size": 256, "axes_dim": [32, 48, 48]}
    torch.manual_seed(0)
    flux = Flux(FluxParams.from_dict(model))
    ae = AutoEncoder(AutoEncoderParams.from_dict(p["autoencoder"]))
    cfg = BundleConfig(
        name="tiny-256",
        preset="tiny",
        model=model,
        autoencoder=p["autoencoder"],
        text_encoder=p["text_encoder"],
        defaults=p["defaults"],
    )
    save_bundle(folder, cfg, flux.state_dict(), ae.state_dict())
    return folder, flux


def _image(pipe: object, req: GenerationRequest) -> tuple[np.ndarray, dict]:
    out = pipe.generate(req)[0]  # type: ignore[attr-defined]
    return np.asarray(out.image, np.float32), out.record


def test_k_quant_bundles_hold_llama_cpps_bytes_and_draw_close_to_the_dense_model(tmp_path: Path) -> None:
    src, flux = _bundle_256(tmp_path / "fp32")
    req = GenerationRequest(prompt="a red circle", width=32, height=32, steps=3, seed=1, num_images=1)
    base, _ = _image(pipeline_from_bundle(load_bundle(src), "cpu"), req)
    dense = flux.state_dict()
    blocks = block_linear_keys(flux)
    errors = {}
    for fmt in ("q6_k", "q4_k", "q2_k"):
        sd = load_bundle(cast_bundle(src, tmp_path / fmt, fmt)).transformer
        for key in blocks:  # every block linear quantized, each exactly as quantize() (= llama.cpp) makes it
            assert torch.equal(sd[key], quantize(dense[key], fmt.upper())), key
            assert int(sd[key[: -len("weight")] + "ggml_type"]) == {"q6_k": 14, "q4_k": 12, "q2_k": 10}[fmt]
        assert sd["img_in.weight"].dtype == torch.float32  # the rest stays wide
        pipe = pipeline_from_bundle(load_bundle(tmp_path / fmt), "cpu")
        assert pipe.weight_dtype == fmt.upper()
        image, record = _image(pipe, req)
        assert record["weight_dtype"] == fmt.upper()
        errors[fmt] = float(np.abs(image - base).mean())
    assert errors["q6_k"] < errors["q4_k"] < errors["q2_k"], errors
    assert errors["q6_k"] < 2.0 and errors["q4_k"] < 8.0, errors  # of 255


def test_gguf_export_with_k_quants_reads_back_in_gguf_and_in_pictor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, flux = _bundle_256(tmp_path / "src")
    out = tmp_path / "tiny-Q4_K.gguf"
    assert main(["convert", "gguf", str(src), "--dtype", "q4_k", "--out", str(out)]) == 0
    assert "MiB" in capsys.readouterr().out
    blocks = block_linear_keys(flux)
    ref = GGUFReader(str(out))
    for t in ref.tensors:
        want = flux.state_dict()[t.name]
        if t.name in blocks:
            assert t.tensor_type == GGMLQuantizationType.Q4_K, t.name
            raw = np.asarray(t.data).reshape(want.shape[0], -1)
            assert np.array_equal(raw, quantize(want, "Q4_K").numpy())
            ours = dequantize(torch.from_numpy(raw.copy()), "Q4_K", want.shape).numpy()
            assert np.array_equal(gguf_dequantize(raw, GGMLQuantizationType.Q4_K), ours)
        else:
            assert t.tensor_type == GGMLQuantizationType.F32, t.name
    # Back into a bundle: the same tensors as `convert dtype --dtype q4_k` makes.
    for name in ("t5", "clip"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    back = convert_flux(
        out, src / "autoencoder.safetensors", tmp_path / "t5", tmp_path / "clip", tmp_path / "back"
    )
    q4 = load_bundle(cast_bundle(src, tmp_path / "q4", "q4_k")).transformer
    imported = load_bundle(back).transformer
    assert imported.keys() == q4.keys() and all(torch.equal(imported[k], q4[k]) for k in q4)


def test_rows_too_short_for_super_blocks_are_refused_by_layer_with_the_formats_that_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = saved_tiny_bundle(tmp_path, "tiny")  # hidden size 32: rows of 32 and 64 values
    pattern = (
        r"(double|single)_blocks\.0\.\S+\.weight has rows of (32|64) values, not a multiple of 256, so it "
        r"cannot be stored as Q4_K; formats that fit: q8_0, q5_1, q5_0, q4_1, q4_0"
    )
    with pytest.raises(CheckpointError, match=pattern):
        cast_bundle(src, tmp_path / "q4k", "q4_k")
    assert not (tmp_path / "q4k").exists()
    out = tmp_path / "x.gguf"
    assert main(["convert", "gguf", str(src), "--dtype", "q3_k", "--out", str(out)]) != 0
    assert "not a multiple of 256" in capsys.readouterr().err and not out.exists()
    # the 32-value formats still fit the same bundle
    assert main(["convert", "dtype", str(src), "--dtype", "q5_0", "--out", str(tmp_path / "q5")]) == 0
