"""Generation with a layout: adapter files (safetensors, checked against the model), the pipeline's request,
record and reproduce, edits, and the console script (`--layout`, `--layout-adapter`, a bundle's own
layout.safetensors)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import save_bundle
from pictor.editing import EditRequest
from pictor.layout_files import (
    LayoutError,
    layout_params_for,
    layout_tensors,
    load_layout_adapter,
    read_layout_arg,
    save_layout_adapter,
)
from pictor.loading import load, pipeline_from_preset
from pictor.models.layout import LayoutAdapter, LayoutParams
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record
from pictor.reproduce import reproduce

PICTOR = shutil.which("pictor")
pytestmark = pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")
LAYOUT = [
    {"box": [0.0, 0.0, 0.5, 1.0], "phrase": "a red circle"},
    {"box": [0.5, 0.2, 1.0, 0.8], "phrase": "sky"},
]


def _adapter(pipe: Pipeline, seed: int = 1, zero: bool = False) -> LayoutAdapter:
    params = layout_params_for(pipe.transformer.params, pipe.text_encoder.pooled_dim)
    torch.manual_seed(seed)
    adapter = LayoutAdapter(params).init_weights()
    if not zero:
        with torch.no_grad():
            for lin in adapter.block_out:
                lin.weight.normal_(0, 0.3)
    return adapter


def _save(adapter: LayoutAdapter, path: Path, base_hash: str = "") -> Path:
    save_layout_adapter(adapter, adapter.params, path, {"base_model": "tiny", "base_model_hash": base_hash})
    return path


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pipeline_from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def adapter_file(pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(_adapter(pipe), tmp_path_factory.mktemp("layout") / "layout.safetensors", pipe.hash)


def _request(**kw: object) -> GenerationRequest:
    return GenerationRequest("a red circle", seed=5, steps=3, width=32, height=32, **kw)  # type: ignore[arg-type]


# -- files ---------------------------------------------------------------------------------------------


def test_adapter_files_round_trip(pipe: Pipeline, tmp_path: Path) -> None:
    adapter = _adapter(pipe)
    path = _save(adapter, tmp_path / "a.safetensors", "abc")
    loaded, header = load_layout_adapter(path)
    assert loaded.params == adapter.params and header["base_model_hash"] == "abc"
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_other_files_are_refused_with_the_reason(pipe: Pipeline, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(LayoutError, match="not a pictor layout adapter"):
        load_layout_adapter(tmp_path / "lora.safetensors")
    (tmp_path / "layout.pt").write_bytes(b"not opened")
    with pytest.raises(LayoutError, match="pickles"):
        load_layout_adapter(tmp_path / "layout.pt")
    wrong = LayoutAdapter(LayoutParams(pipe.text_encoder.pooled_dim, 64, 2)).init_weights()
    path = _save(wrong, tmp_path / "wide.safetensors")
    with pytest.raises(GenerationError, match="hidden size 64"):
        pipe.set_layout_adapter(path)
    with pytest.raises(LayoutError, match=r"written as \.safetensors"):
        save_layout_adapter(wrong, wrong.params, tmp_path / "x.bin", {})


def test_layout_tensors_pad_with_boxes_that_cover_nothing(pipe: Pipeline) -> None:
    phrases, boxes = layout_tensors(pipe.text_encoder, [LAYOUT, LAYOUT[:1]])
    assert phrases.shape == (2, 2, pipe.text_encoder.pooled_dim) and boxes.shape == (2, 2, 4)
    assert boxes[1, 1].abs().sum() == 0 and phrases[1, 1].abs().sum() == 0
    torch.testing.assert_close(phrases[0, 0], phrases[1, 0])
    torch.testing.assert_close(phrases[0, 0], pipe.text_encoder.encode(["a red circle"]).pooled[0])


def test_layout_arguments_are_files_or_json(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps(LAYOUT))
    assert read_layout_arg(str(tmp_path / "l.json")) == read_layout_arg(json.dumps(LAYOUT))
    with pytest.raises(LayoutError, match="no such file"):
        read_layout_arg(str(tmp_path / "missing.json"))


# -- the pipeline --------------------------------------------------------------------------------------


def test_a_layout_needs_an_adapter(tmp_path: Path) -> None:
    fresh = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(GenerationError, match="no layout adapter"):
        fresh.generate(_request(layout=LAYOUT))
    fresh.set_layout_adapter(_save(_adapter(fresh), tmp_path / "a.safetensors", fresh.hash))
    with pytest.raises(GenerationError, match="'box' must be four numbers"):
        fresh.generate(_request(layout=[{"box": [0, 0, 1], "phrase": "x"}]))


def test_layouts_steer_only_through_the_adapter(pipe: Pipeline, adapter_file: Path, tmp_path: Path) -> None:
    plain = np.asarray(pipe.generate(_request())[0].image).astype(int)
    pipe.set_layout_adapter(_save(_adapter(pipe, zero=True), tmp_path / "zero.safetensors", pipe.hash))
    zero = np.asarray(pipe.generate(_request(layout=LAYOUT))[0].image).astype(int)
    np.testing.assert_array_equal(zero, plain)  # a new (zero) adapter: exactly the model without one
    pipe.set_layout_adapter(adapter_file)
    steered = pipe.generate(_request(layout=LAYOUT))[0]
    assert np.abs(np.asarray(steered.image).astype(int) - plain).max() > 8
    assert steered.record["layout"] == LAYOUT
    assert steered.record["layout_adapter"]["sha256"] == pipe.layout_info["sha256"]  # type: ignore[index]
    assert "layout" not in pipe.generate(_request())[0].record


def test_a_layout_applies_to_every_image_of_a_batch(pipe: Pipeline, adapter_file: Path) -> None:
    pipe.set_layout_adapter(adapter_file)
    batch = pipe.generate(_request(layout=LAYOUT, num_images=2))
    single = pipe.generate(
        GenerationRequest("a red circle", seed=6, steps=3, width=32, height=32, layout=LAYOUT)
    )[0]
    diff = np.abs(np.asarray(batch[1].image).astype(int) - np.asarray(single.image).astype(int))
    assert diff.max() <= 1


def test_reproduce_needs_the_same_adapter(pipe: Pipeline, adapter_file: Path, tmp_path: Path) -> None:
    pipe.set_layout_adapter(adapter_file)
    made = pipe.generate(_request(layout=LAYOUT))[0]
    again = reproduce(pipe, made.record)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(made.image))
    other = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(GenerationError, match="--layout-adapter"):
        reproduce(other, made.record)
    other.set_layout_adapter(_save(_adapter(other, seed=2), tmp_path / "b.safetensors", other.hash))
    with pytest.raises(GenerationError, match="pass the same file"):
        reproduce(other, made.record)


def test_edits_take_a_layout_too(pipe: Pipeline, adapter_file: Path) -> None:
    pipe.set_layout_adapter(adapter_file)
    source = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[:, :16] = 255
    mask = Image.fromarray(mask_px)
    common = {"image": source, "prompt": "a red circle", "mask": mask, "seed": 1, "steps": 3}
    plain = pipe.edit(EditRequest(**common))[0]  # type: ignore[arg-type]
    laid = pipe.edit(EditRequest(**common, layout=LAYOUT))[0]  # type: ignore[arg-type]
    assert laid.record["layout"] == LAYOUT
    assert np.abs(np.asarray(laid.image).astype(int) - np.asarray(plain.image).astype(int)).max() > 8


def test_adapters_trained_on_another_model_are_loaded_with_a_warning(pipe: Pipeline, tmp_path: Path) -> None:
    path = _save(_adapter(pipe), tmp_path / "other.safetensors", "0" * 64)
    with pytest.warns(UserWarning, match="not on this one"):
        pipe.set_layout_adapter(path)


# -- the console script --------------------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PICTOR
    return subprocess.run([PICTOR, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_generate_with_a_bundles_layout_adapter_and_reproduce(tmp_path: Path) -> None:
    base = pipeline_from_preset("tiny", device="cpu")
    bundle = tmp_path / "bundle"
    config = base.config
    config.trained = True
    save_bundle(bundle, config, base.transformer.state_dict(), base.autoencoder.state_dict())
    loaded = load(str(bundle), device="cpu")
    assert loaded.layout_adapter is None
    _save(_adapter(loaded), bundle / "layout.safetensors", loaded.hash)
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT))
    common = ("--model", str(bundle), "--seed", "3", "--steps", "2", "--size", "32x32")

    made = _run("generate", "a red circle", *common, "--layout", "layout.json", "-o", "out", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    png = tmp_path / made.stdout.split()[0]
    record = read_record(png)
    assert record["layout"] == LAYOUT and record["layout_adapter"]["path"] == str(
        bundle / "layout.safetensors"
    )
    again = _run("reproduce", str(png), "-o", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / again.stdout.split()[0])), np.asarray(Image.open(png))
    )

    shown = _run("info", str(bundle), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)["layout_adapter"]
    assert info["format"] == "pictor-layout" and info["layout_params"]["num_blocks"] == 2
    # `pictor convert dtype` keeps the bundle's adapter.
    from pictor.bundle_storage import cast_bundle

    cast_bundle(bundle, tmp_path / "fp16", "fp16")
    assert (tmp_path / "fp16" / "layout.safetensors").read_bytes() == (
        bundle / "layout.safetensors"
    ).read_bytes()

    bad = _run("generate", "x", *common, "--layout", '[{"box": [0, 0, 64, 64], "phrase": "x"}]', cwd=tmp_path)
    assert bad.returncode == 2 and "divide pixel coordinates" in bad.stderr
    no_adapter = _run("generate", "x", "--model", "tiny", "--layout", json.dumps(LAYOUT), cwd=tmp_path)
    assert no_adapter.returncode == 2 and "no layout adapter" in no_adapter.stderr
