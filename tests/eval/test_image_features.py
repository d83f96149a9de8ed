"""Feature extractors and folders for `pictor eval distribution`: the weightless shapes features, CLIP and
DINOv2 towers from local folders (tiny random ones, preprocessed exactly as transformers' own processors),
bad files skipped and named, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.cli import main
from pictor.eval.image_features import (
    SHAPES_FEATURE_NAMES,
    VisionModelFeatures,
    build_extractor,
    featurize_folder,
    shapes_features,
)
from pictor.eval.shapes import ground_truth_images, load_prompts


def _images(n: int, seed: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _write(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def test_shapes_features_describe_a_rendered_scene() -> None:
    spec = next(p for p in load_prompts() if p["tag"] == "counting" and p["objects"][0]["count"] == 3)
    image = ground_truth_images([spec], 1, seed=0)[0][0]
    f = dict(zip(SHAPES_FEATURE_NAMES, shapes_features(image).tolist(), strict=True))
    obj = spec["objects"][0]
    assert f[f"n_{obj['shape']}"] == 3 and f[f"n_{obj['color']}"] == 3 and f["n_objects"] == 3
    assert f["n_unclassified"] == 0
    assert 0 < f["area_fraction"] < 1 and 0 < f["mean_x"] < 1 and f["spread_x"] + f["spread_y"] > 0
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    g = dict(zip(SHAPES_FEATURE_NAMES, shapes_features(blank).tolist(), strict=True))
    assert g["n_objects"] == 0 and g["mean_x"] == 0.5 and g["area_fraction"] == 0


def test_folder_skips_unreadable_files_and_names_them(tmp_path: Path) -> None:
    folder = _write(tmp_path / "imgs", _images(3, 0))
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    sub = _write(folder / "nested", _images(1, 1))  # searched recursively
    feats, skipped = featurize_folder(folder, build_extractor("shapes"), batch_size=2)
    assert feats.shape == (4, len(SHAPES_FEATURE_NAMES))
    assert [Path(p).name for p, _ in skipped] == ["broken.png"] and "unreadable" in skipped[0][1]
    assert sub.is_dir()


def test_folder_with_too_few_images_or_missing_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "one", _images(1, 0))
    with pytest.raises(ValueError, match="at least 2"):
        featurize_folder(tmp_path / "one", build_extractor("shapes"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        featurize_folder(tmp_path / "nowhere", build_extractor("shapes"))


def _tiny_clip(folder: Path, with_processor: bool) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    if with_processor:
        processor = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
        processor.save_pretrained(folder)


def test_clip_features_equal_transformers_processor_and_model(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    _tiny_clip(tmp_path / "clip", with_processor=True)
    images = _images(2, 3, size=(48, 64))  # not square: the shorter side is resized, then centre-cropped
    ours = build_extractor(f"clip:{tmp_path / 'clip'}")
    assert isinstance(ours, VisionModelFeatures)
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path / "clip")
    pixels = torch.as_tensor(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))
    assert torch.allclose(torch.stack([ours.preprocess(im) for im in images]), pixels, atol=1e-6)
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).image_embeds
    got = ours(images)
    assert got.shape == (2, 16)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_processor_saved_whole_gives_its_image_settings(tmp_path: Path) -> None:
    """transformers 5's CLIPProcessor.save_pretrained keeps the image processor's settings under
    processor_config.json's "image_processor", with no preprocessor_config.json: read them there."""
    _tiny_clip(tmp_path / "clip", with_processor=True)
    images = _images(2, 3, size=(48, 64))
    separate = build_extractor(f"clip:{tmp_path / 'clip'}")(images)
    settings = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    whole = {"image_processor": settings, "processor_class": "CLIPProcessor"}
    (tmp_path / "clip" / "processor_config.json").write_text(json.dumps(whole))
    assert torch.equal(build_extractor(f"clip:{tmp_path / 'clip'}")(images), separate)
    (tmp_path / "clip" / "processor_config.json").unlink()  # and without either: the defaults, not these
    assert not torch.allclose(build_extractor(f"clip:{tmp_path / 'clip'}")(images), separate, atol=1e-3)


def test_clip_legacy_integer_size_is_the_shorter_side_as_in_transformers(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil

    _tiny_clip(tmp_path / "clip", with_processor=True)
    config = tmp_path / "clip" / "preprocessor_config.json"
    pre = json.loads(config.read_text())
    config.write_text(json.dumps({**pre, "size": 40, "crop_size": 32}))  # OpenAI's configs: plain ints
    images = _images(2, 3, size=(48, 64))
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path / "clip")
    pixels = torch.as_tensor(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))
    ours = build_extractor(f"clip:{tmp_path / 'clip'}")
    assert isinstance(ours, VisionModelFeatures)
    assert torch.allclose(torch.stack([ours.preprocess(im) for im in images]), pixels, atol=1e-6)


def test_clip_without_preprocessor_config_uses_the_towers_input_size(tmp_path: Path) -> None:
    _tiny_clip(tmp_path / "clip", with_processor=False)
    ours = build_extractor(f"clip:{tmp_path / 'clip'}")
    assert isinstance(ours, VisionModelFeatures)
    assert ours.preprocess(_images(1, 4)[0]).shape == (3, 32, 32)
    assert ours(_images(3, 4)).shape == (3, 16)


def test_dinov2_features_equal_transformers_processor_and_model(tmp_path: Path) -> None:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    processor = BitImageProcessorPil(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    processor.save_pretrained(tmp_path / "dino")
    images = _images(2, 5, size=(64, 40))
    ours = build_extractor(f"dinov2:{tmp_path / 'dino'}")
    assert isinstance(ours, VisionModelFeatures)
    pixels = torch.as_tensor(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))
    assert torch.allclose(torch.stack([ours.preprocess(im) for im in images]), pixels, atol=1e-6)
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output
    assert torch.allclose(ours(images), expected, atol=1e-5)


def test_bad_feature_specs_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown features"):
        build_extractor("inception")
    _tiny_clip(tmp_path / "clip", with_processor=False)
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'"):
        build_extractor(f"dinov2:{tmp_path / 'clip'}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights.*never loads pickles"):
        build_extractor(f"dinov2:{pickled}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_extractor(f"clip:{tmp_path / 'nowhere'}")


def test_cli_compares_folders_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = load_prompts()[::10]  # 30 prompts of every tag
    real = _write(tmp_path / "real", [ims[0] for ims in ground_truth_images(specs, 1, seed=0)])
    real2 = _write(tmp_path / "real2", [ims[0] for ims in ground_truth_images(specs, 1, seed=1)])
    noise = _write(tmp_path / "noise", _images(30, 6, size=(64, 64)))
    (noise / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "r.json"
    args = ["eval", "distribution", "--kid-subset-size", "20", "--kid-subsets", "5"]
    assert main([*args, str(real), str(real2), "--out", str(out)]) == 0
    same = json.loads(out.read_text())
    assert main([*args, str(real), str(noise), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    other = json.loads(out.read_text())
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "FD " in captured.out and "precision" in captured.out
    assert same["n_real"] == same["n_fake"] == 30 and other["n_fake"] == 30
    assert other["skipped"]["fake"][0]["path"].endswith("broken.png")
    assert same["features"] == "shapes" and same["dim"] == len(SHAPES_FEATURE_NAMES)
    # Renders of the same prompts at other seeds are far closer to the real set than noise is.
    assert same["fd"] * 5 < other["fd"] and same["kid"] < other["kid"]
    assert same["recall"] > other["recall"]
    assert main([*args, str(real), str(tmp_path / "nowhere")]) == 2


def test_cli_reports_cmmd_with_clip_features_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.eval.distribution import cmmd

    _tiny_clip(tmp_path / "clip", with_processor=True)
    real = _write(tmp_path / "real", _images(6, 1, size=(40, 40)))
    fake = _write(tmp_path / "fake", _images(5, 2, size=(40, 40)))
    out = tmp_path / "r.json"
    args = ["eval", "distribution", str(real), str(fake), "--kid-subset-size", "4", "--kid-subsets", "2"]
    assert main([*args, "--features", f"clip:{tmp_path / 'clip'}", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    extractor = build_extractor(f"clip:{tmp_path / 'clip'}")
    want = cmmd(*(featurize_folder(f, extractor)[0] for f in (real, fake)))
    assert report["cmmd"] == pytest.approx(want, rel=1e-9) and report["cmmd"] > 0
    assert "CMMD" in capsys.readouterr().out
    assert main([*args, "--out", str(out)]) == 0  # shapes features: CMMD's bandwidth means nothing there
    assert "cmmd" not in json.loads(out.read_text()) and "CMMD" not in capsys.readouterr().out
