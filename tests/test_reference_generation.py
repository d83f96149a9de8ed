"""Generation with a reference picture: adapter files (safetensors, checked against the model), fitting
the picture, the pipeline's request, record and reproduce, edits, `pictor eval shapes --references`, and
the console script (`--reference`, `--reference-adapter`, a bundle's own reference.safetensors)."""

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
from pictor.guided_velocity import guided_velocity
from pictor.loading import load, pipeline_from_preset
from pictor.models.reference import ReferenceAdapter, ReferenceParams
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record
from pictor.reference_files import (
    ReferenceImageError,
    load_reference_adapter,
    reference_params_for,
    reference_pixels,
    save_reference_adapter,
)
from pictor.reproduce import reproduce

PICTOR = shutil.which("pictor")
pytestmark = pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")


def _adapter(pipe: Pipeline, seed: int = 1) -> ReferenceAdapter:
    torch.manual_seed(seed)
    params = reference_params_for(pipe.transformer.params, pipe.text_encoder.max_length)
    adapter = ReferenceAdapter(params).init_weights()
    with torch.no_grad():  # open, as once trained (a new adapter adds nothing)
        adapter.out.weight.normal_(0, 0.2)
        adapter.vec_out.weight.normal_(0, 0.3)
        adapter.img_in.weight.mul_(30)  # the picture, not the grid positions, dominates its features
    return adapter


def _save(adapter: ReferenceAdapter, path: Path, base_hash: str = "") -> Path:
    save_reference_adapter(
        adapter, adapter.params, path, {"base_model": "tiny", "base_model_hash": base_hash}
    )
    return path


def _picture(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    pipe = pipeline_from_preset("tiny", device="cpu")
    # torch's default init instead of adaLN-Zero's zero gates, so the text stream (and with it the
    # reference's tokens) reaches the image as in a trained model
    torch.manual_seed(0)
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return pipe


@pytest.fixture(scope="module")
def adapter_file(pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(_adapter(pipe), tmp_path_factory.mktemp("reference") / "reference.safetensors", pipe.hash)


def _request(**kw: object) -> GenerationRequest:
    return GenerationRequest("a red circle", seed=5, steps=3, width=32, height=32, **kw)  # type: ignore[arg-type]


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# -- files and pictures ------------------------------------------------------------------------------------


def test_adapter_files_round_trip(pipe: Pipeline, tmp_path: Path) -> None:
    adapter = _adapter(pipe)
    path = _save(adapter, tmp_path / "a.safetensors", "abc")
    loaded, header = load_reference_adapter(path)
    assert loaded.params == adapter.params and header["base_model_hash"] == "abc"
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_other_files_are_refused_with_the_reason(pipe: Pipeline, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ReferenceImageError, match="not a pictor reference adapter"):
        load_reference_adapter(tmp_path / "lora.safetensors")
    (tmp_path / "reference.pt").write_bytes(b"not opened")
    with pytest.raises(ReferenceImageError, match="pickles"):
        load_reference_adapter(tmp_path / "reference.pt")
    with pytest.raises(ReferenceImageError, match="no such weight file"):
        load_reference_adapter(tmp_path / "missing.safetensors")
    fits = reference_params_for(pipe.transformer.params, pipe.text_encoder.max_length)
    wrong = ReferenceAdapter(
        ReferenceParams(fits.latent_dim, 48, fits.pooled_dim, fits.num_tokens)
    ).init_weights()
    path = _save(wrong, tmp_path / "wide.safetensors")
    with pytest.raises(GenerationError, match=r"makes \d+ 48-dim tokens"):
        pipe.set_reference_adapter(path)
    with pytest.raises(ReferenceImageError, match=r"written as \.safetensors"):
        save_reference_adapter(wrong, wrong.params, tmp_path / "x.bin", {})


def test_pictures_are_fitted_to_the_image_and_bad_ones_named(tmp_path: Path) -> None:
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # a white middle third, black sides: the centre crop is the white third
    fitted = reference_pixels(Image.fromarray(wide), 32, 32)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    assert fitted.min() > 200  # squeezed instead of cropped, the black sides would show
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent: white, as on a page
    assert reference_pixels(rgba, 16, 16).min() == 255
    np.testing.assert_array_equal(reference_pixels(np.asarray(_picture()), 32, 32), np.asarray(_picture()))
    with pytest.raises(ReferenceImageError, match="no such file"):
        reference_pixels(tmp_path / "missing.png", 32, 32)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ReferenceImageError, match="not a readable image"):
        reference_pixels(tmp_path / "bad.png", 32, 32)
    with pytest.raises(ReferenceImageError, match="at least 8x8"):
        reference_pixels(Image.new("RGB", (4, 30)), 32, 32)
    with pytest.raises(ReferenceImageError, match=r"uint8 \[H, W, 3\]"):
        reference_pixels(np.zeros((8, 8), np.float32), 32, 32)


# -- the pipeline ------------------------------------------------------------------------------------------


def test_a_reference_needs_an_adapter(tmp_path: Path) -> None:
    fresh = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(GenerationError, match="no reference adapter"):
        fresh.generate(_request(reference=_picture()))
    fresh.set_reference_adapter(_save(_adapter(fresh), tmp_path / "a.safetensors", fresh.hash))
    with pytest.raises(GenerationError, match=r"reference image .*no such file"):
        fresh.generate(_request(reference=tmp_path / "missing.png"))


def test_the_reference_steers_and_is_recorded(pipe: Pipeline, adapter_file: Path) -> None:
    pipe.set_reference_adapter(adapter_file)
    plain = pipe.generate(_request())[0]
    a = pipe.generate(_request(reference=_picture(0)))[0]
    b = pipe.generate(_request(reference=_picture(1)))[0]
    assert np.abs(_px(a.image) - _px(plain.image)).max() > 2  # the tiny untrained decoder damps changes
    assert a.record["reference_image"]["width"] == 32
    assert a.record["reference_image"]["sha256"] != b.record["reference_image"]["sha256"]
    assert a.record["reference_adapter"]["sha256"] == pipe.reference_info["sha256"]  # type: ignore[index]
    assert "reference_image" not in plain.record and "reference_adapter" not in plain.record
    # In the velocity the sampler integrates, the picture itself matters, not just its presence.
    x, t = torch.randn(1, 16, 16), torch.full((1,), 0.5)
    velocity = {
        name: guided_velocity(pipe, pipe.resolve_request(_request(reference=ref)), 1, 8, 8)(x, t)
        for name, ref in (("none", None), ("a", _picture(0)), ("b", _picture(1)))
    }
    scale = velocity["none"].abs().mean()
    assert (velocity["a"] - velocity["none"]).abs().max() > 0.05 * scale
    assert (velocity["a"] - velocity["b"]).abs().max() > 0.01 * scale


def test_a_reference_applies_to_every_image_of_a_batch(pipe: Pipeline, adapter_file: Path) -> None:
    pipe.set_reference_adapter(adapter_file)
    batch = pipe.generate(_request(reference=_picture(), num_images=2))
    single = pipe.generate(
        GenerationRequest("a red circle", seed=6, steps=3, width=32, height=32, reference=_picture())
    )[0]
    assert np.abs(_px(batch[1].image) - _px(single.image)).max() <= 1


def test_reproduce_needs_the_same_picture_and_adapter(
    pipe: Pipeline, adapter_file: Path, tmp_path: Path
) -> None:
    pipe.set_reference_adapter(adapter_file)
    _picture().save(tmp_path / "ref.png")
    made = pipe.generate(_request(reference=tmp_path / "ref.png", num_images=2))[1]
    again = reproduce(pipe, made.record, reference=tmp_path / "ref.png")
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(made.image))
    with pytest.raises(GenerationError, match="pass it with --reference"):
        reproduce(pipe, made.record)
    with pytest.raises(GenerationError, match="not the one this image was made from"):
        reproduce(pipe, made.record, reference=_picture(7))
    with pytest.raises(GenerationError, match="without a reference image"):
        reproduce(pipe, pipe.generate(_request())[0].record, reference=_picture())
    other = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(GenerationError, match="--reference-adapter"):
        reproduce(other, made.record, reference=tmp_path / "ref.png")
    other.set_reference_adapter(_save(_adapter(other, seed=2), tmp_path / "b.safetensors", other.hash))
    with pytest.raises(GenerationError, match="pass the same file"):
        reproduce(other, made.record, reference=tmp_path / "ref.png")


def test_edits_take_a_reference_too(pipe: Pipeline, adapter_file: Path, tmp_path: Path) -> None:
    pipe.set_reference_adapter(adapter_file)
    source = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[:, :16] = 255
    mask = Image.fromarray(mask_px)
    common = {"image": source, "prompt": "a red circle", "mask": mask, "seed": 1, "steps": 3}
    plain = pipe.edit(EditRequest(**common))[0]  # type: ignore[arg-type]
    _picture().save(tmp_path / "ref.png")
    made = pipe.edit(EditRequest(**common, reference=tmp_path / "ref.png"))[0]  # type: ignore[arg-type]
    assert made.record["reference_image"]["sha256"] and made.record["mode"] == "inpaint"
    assert np.abs(_px(made.image) - _px(plain.image)).max() > 2
    again = reproduce(pipe, made.record, source=source, mask=mask, reference=tmp_path / "ref.png")
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(made.image))


def test_adapters_trained_on_another_model_are_loaded_with_a_warning(pipe: Pipeline, tmp_path: Path) -> None:
    path = _save(_adapter(pipe), tmp_path / "other.safetensors", "0" * 64)
    with pytest.warns(UserWarning, match="not on this one"):
        pipe.set_reference_adapter(path)


def test_eval_with_references_and_empty_prompts(pipe: Pipeline, adapter_file: Path) -> None:
    from pictor.eval.shapes_run import run_shapes_eval

    fresh = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(ValueError, match="no reference adapter"):
        run_shapes_eval(fresh, None, 1, 0, None, references=True, limit=1)
    with pytest.raises(ValueError, match="drop --ground-truth"):
        run_shapes_eval(None, None, 1, 0, None, ground_truth=True, references=True, limit=1)
    pipe.set_reference_adapter(adapter_file)
    report = run_shapes_eval(pipe, None, 1, 0, None, references=True, empty_prompts=True, limit=2, steps=2)
    assert report["empty_prompts"] is True and report["reference"]["adapter"] == pipe.reference_info
    assert report["n_images"] == 2


# -- the console script ------------------------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PICTOR
    return subprocess.run([PICTOR, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_generate_with_a_bundles_reference_adapter_and_reproduce(tmp_path: Path) -> None:
    base = pipeline_from_preset("tiny", device="cpu")
    bundle = tmp_path / "bundle"
    config = base.config
    config.trained = True
    save_bundle(bundle, config, base.transformer.state_dict(), base.autoencoder.state_dict())
    loaded = load(str(bundle), device="cpu")
    assert loaded.reference_adapter is None
    _save(_adapter(loaded), bundle / "reference.safetensors", loaded.hash)
    _picture(3, (48, 40)).save(tmp_path / "ref.png")
    common = ("--model", str(bundle), "--seed", "3", "--steps", "2", "--size", "32x32")

    made = _run("generate", "", *common, "--reference", "ref.png", "-o", "out", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    png = tmp_path / made.stdout.split()[0]
    record = read_record(png)
    assert record["reference_adapter"]["path"] == str(bundle / "reference.safetensors")
    assert record["reference_image"]["width"] == 32  # fitted to the image
    again = _run("reproduce", str(png), "--reference", "ref.png", "-o", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / again.stdout.split()[0])), np.asarray(Image.open(png))
    )
    missing = _run("reproduce", str(png), "-o", "again", cwd=tmp_path)
    assert missing.returncode == 2 and "--reference IMAGE" in missing.stderr

    shown = _run("info", str(bundle), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)["reference_adapter"]
    assert info["format"] == "pictor-reference" and info["reference_params"]["context_dim"] == 384
    # `pictor convert dtype` keeps the bundle's adapter, also in place.
    from pictor.bundle_storage import cast_bundle

    cast_bundle(bundle, tmp_path / "fp16", "fp16")
    assert (tmp_path / "fp16" / "reference.safetensors").read_bytes() == (
        bundle / "reference.safetensors"
    ).read_bytes()
    cast_bundle(bundle, bundle, "fp16")
    assert (bundle / "reference.safetensors").is_file()

    bad = _run("generate", "x", *common, "--reference", "nope.png", cwd=tmp_path)
    assert bad.returncode == 2 and "nope.png: no such file" in bad.stderr
    no_adapter = _run("generate", "x", "--model", "tiny", "--reference", "ref.png", cwd=tmp_path)
    assert no_adapter.returncode == 2 and "no reference adapter" in no_adapter.stderr
