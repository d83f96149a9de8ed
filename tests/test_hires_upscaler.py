"""The hires fix with an upscale model (A1111's "Hires upscaler: 4x-UltraSharp"): the first pass enlarged by
the model, then Lanczos to the second pass's size; recorded with the file's hash, reproduced bit-exactly,
refused where the model is not the one loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import pictor
from pictor.hires import upscale
from pictor.models.upscalers import CompactNet, CompactParams
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import ProvenanceError, read_record, read_text_chunks, save_png
from pictor.reproduce import check_record, reproduce
from pictor.upscaler_files import load_upscaler
from pictor.upscaling import upscale_image


def make_upscaler(path: Path, seed: int = 0, scale: int = 4) -> Path:
    """A tiny compact net with weights large enough that its output is not the nearest-neighbour base."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = CompactNet(CompactParams(features=8, convs=2, scale=scale))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def test_the_model_enlarges_the_first_pass_before_lanczos(tmp_path: Path) -> None:
    model = load_upscaler(make_upscaler(tmp_path / "4x-tiny.safetensors"))
    first = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))]
    by_model = upscale(first, 40, 40, model)
    want = np.asarray(upscale_image(model, first[0]).resize((40, 40), Image.LANCZOS))  # 64 px, then 40
    np.testing.assert_array_equal(by_model[0], want)
    assert np.abs(by_model.astype(int) - upscale(first, 40, 40).astype(int)).max() > 10  # not Lanczos


def test_hires_with_an_upscaler_is_recorded_and_reproduces(pipe: Pipeline, tmp_path: Path) -> None:
    file = make_upscaler(tmp_path / "4x-tiny.safetensors")
    info = pipe.set_upscaler(file)
    assert info["scale"] == 4 and info["architecture"] == "Compact"
    try:
        request = GenerationRequest(
            "a red circle", seed=2, steps=2, hires_scale=1.5, hires_upscaler="4x-tiny"
        )
        (image,) = pipe.generate(request)
        (plain,) = pipe.generate(GenerationRequest("a red circle", seed=2, steps=2, hires_scale=1.5))
        assert image.image.size == (96, 96)
        assert np.abs(np.asarray(image.image, int) - np.asarray(plain.image, int)).max() > 0
        hires = image.record["hires"]
        assert hires["upscaler"] == "4x-tiny" and plain.record["hires"]["upscaler"] == "lanczos"
        assert hires["upscaler_file"]["sha256"] == pipe.upscaler.sha256  # type: ignore[union-attr]
        assert hires["upscaler_file"]["file"] == str(file)
        path = save_png(image.image, image.record, tmp_path / "hires.png")
        assert "Hires upscaler: 4x-tiny," in read_text_chunks(path)["parameters"]
        again = reproduce(pipe, read_record(path))
        np.testing.assert_array_equal(np.asarray(again.image), np.asarray(image.image))

        # Another file under the same name is not the same model: its hash is what counts.
        pipe.set_upscaler(make_upscaler(tmp_path / "other" / "4x-tiny.safetensors", seed=5))
        with pytest.raises(GenerationError, match="pass that file with --hires-upscaler"):
            reproduce(pipe, read_record(path))
        pipe.upscaler = None
        with pytest.raises(GenerationError, match="loaded one is none"):
            reproduce(pipe, read_record(path))
    finally:
        pipe.upscaler = None


def test_an_upscaler_that_is_not_loaded_is_refused(pipe: Pipeline, tmp_path: Path) -> None:
    request = GenerationRequest("a red circle", steps=2, hires_scale=2.0, hires_upscaler="4x-UltraSharp")
    with pytest.raises(GenerationError, match=r"'4x-UltraSharp' is not loaded \(none is\)"):
        pipe.generate(request)
    with pytest.raises(GenerationError, match="need a hires scale"):
        pipe.generate(GenerationRequest("a red circle", steps=2, hires_upscaler="4x-UltraSharp"))
    # "lanczos", in any case, is the built-in one
    (image,) = pipe.generate(GenerationRequest("a", steps=2, hires_scale=1.5, hires_upscaler="Lanczos"))
    assert image.record["hires"]["upscaler"] == "lanczos"


def test_a_record_naming_an_upscaler_without_its_file_is_damaged(pipe: Pipeline) -> None:
    (image,) = pipe.generate(GenerationRequest("a", steps=2, hires_scale=1.5))
    record = {**image.record, "hires": {**image.record["hires"], "upscaler": "4x-tiny"}}
    with pytest.raises(ProvenanceError, match="not its file and sha256"):
        check_record(record)
