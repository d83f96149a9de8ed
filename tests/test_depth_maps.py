"""pictor.depth_maps must draw the depth maps users make elsewhere, pixel for pixel.

The reference for the default rule is transformers' own ``pipeline("depth-estimation")`` on the same local
folder (what diffusers' ControlNet docs feed their pipelines), run here with DPT's PIL image processor: it
is the one transformers picks without torchvision, which this environment (and pictor) does not install;
the test pins it so that a torchvision install cannot swap the reference. The "bfl" rule is compared with
BFL's ``DepthImageEncoder`` written out below. Tiny random Depth Anything and DPT models stand in for the
real ones; their preprocessor configs carry the real models' settings.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessorPil,
    pipeline,
)

from pictor.depth_maps import (
    DepthMapError,
    DepthModel,
    depth_map,
    depth_pixel_values,
    load_depth_model,
)

# LiheYoung/depth-anything-large-hf's preprocessor_config.json (Depth Anything V2's is the same).
DEPTH_ANYTHING_PREPROCESSOR = {
    "do_normalize": True,
    "do_pad": False,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 14,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "keep_aspect_ratio": True,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 518, "width": 518},
    "size_divisor": None,
}
# An old-style DPT (MiDaS) config: one number for a square size, a feature-extractor name, bilinear.
# DPT's plain ViT only reads square inputs, hence no keep_aspect_ratio here.
DPT_PREPROCESSOR = {
    "feature_extractor_type": "DPTFeatureExtractor",
    "do_resize": True,
    "size": 64,
    "resample": 2,
    "keep_aspect_ratio": False,
    "ensure_multiple_of": 32,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _photo(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour regions, as a resized photo has, so the depth varies across the picture."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    small = rng.integers(0, 256, (max(2, height // 9), max(2, width // 9), bands), dtype=np.uint8)
    im = Image.fromarray(small if bands > 1 else small[:, :, 0])
    return im.resize((width, height), Image.Resampling.BICUBIC)


def _pictures() -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(2024)
    pics = [
        ("landscape-odd-61x37", _photo(rng, 37, 61)),
        ("portrait-odd-45x83", _photo(rng, 83, 45)),
        ("square-64", _photo(rng, 64, 64)),
        ("wide-300x120", _photo(rng, 120, 300)),
        ("tall-90x331", _photo(rng, 331, 90)),
        ("grey-L-77x53", _photo(rng, 53, 77, "L")),
        ("rgba-59x71", _photo(rng, 71, 59, "RGBA")),
        ("palette-P-50x40", _photo(rng, 40, 50).convert("P")),
        ("tiny-5x3", _photo(rng, 3, 5)),
    ]
    # A camera picture: landscape pixels with an EXIF tag saying "rotate 90 degrees" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _photo(rng, 30, 48).save(buf, "PNG", exif=exif)
    buf.seek(0)
    pics.append(("exif-rotated-48x30", Image.open(buf)))
    return pics


PICTURES = _pictures()


def _write_folder(folder: Path, model: torch.nn.Module, preprocessor: dict) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def depth_anything_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # transformers' own tiny Depth Anything test config, with DINOv2's real patch size 14.
    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2"],
        apply_layernorm=False,
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        reassemble_factors=[1, 0.5],
        neck_hidden_sizes=[8, 8],
        fusion_hidden_size=8,
        head_hidden_size=4,
    )
    model = DepthAnythingForDepthEstimation(config).eval()
    # Random weights give depths near 1e-6; scale the last conv (before the ReLU) so that depths span
    # about 0..300 like a real model's, which the "bfl" rule (raw depths as grey levels) needs to be tested.
    with torch.no_grad():
        probe = model(pixel_values=torch.randn(1, 3, 98, 126)).predicted_depth.max()
        model.head.conv3.weight.mul_(300 / probe)
        model.head.conv3.bias.mul_(300 / probe)
    return _write_folder(tmp_path_factory.mktemp("depth-anything"), model, DEPTH_ANYTHING_PREPROCESSOR)


@pytest.fixture(scope="module")
def dpt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
    )
    model = DPTForDepthEstimation(config).eval()
    return _write_folder(tmp_path_factory.mktemp("dpt"), model, DPT_PREPROCESSOR)


@pytest.fixture(scope="module")
def depth_anything(depth_anything_folder: Path) -> DepthModel:
    return load_depth_model(depth_anything_folder)


def _reference(folder: Path) -> Any:
    return pipeline(
        "depth-estimation", model=str(folder), image_processor=DPTImageProcessorPil.from_pretrained(folder)
    )


@pytest.fixture(scope="module")
def reference(depth_anything_folder: Path) -> Any:
    """transformers' depth-estimation pipeline on the tiny Depth Anything folder, PIL image processor."""
    return _reference(depth_anything_folder)


def _assert_same_map(got: Image.Image, expected: Image.Image, name: str) -> None:
    assert got.mode == "RGB" and got.size == expected.size, name
    a = np.asarray(got)
    assert (a == a[:, :, :1]).all(), f"{name}: the three channels differ"
    b = np.asarray(expected.convert("RGB"))
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    assert diff == 0, f"{name}: differs from transformers' pipeline by up to {diff} grey levels"


@pytest.mark.parametrize("name,picture", PICTURES, ids=[n for n, _ in PICTURES])
def test_equals_transformers_pipeline(
    depth_anything: DepthModel, reference: Any, name: str, picture: Image.Image
) -> None:
    expected = reference(picture)["depth"]
    got = depth_map(picture, depth_anything)
    _assert_same_map(got, expected, name)
    levels = np.unique(np.asarray(got))
    if not name.startswith("tiny"):
        assert levels.size > 60, f"{name}: a near-flat map would make the comparison weak"


def test_dpt_equals_transformers_pipeline(dpt_folder: Path) -> None:
    model = load_depth_model(dpt_folder)
    assert model.info["model_type"] == "dpt"
    reference = _reference(dpt_folder)
    for name, picture in PICTURES[::2]:
        _assert_same_map(depth_map(picture, model), reference(picture)["depth"], f"dpt {name}")


def test_orientation_alpha_and_grey(depth_anything: DepthModel) -> None:
    by_name = dict(PICTURES)
    # The camera picture's map is upright: 30 wide and 48 high, as the picture is shown.
    assert depth_map(by_name["exif-rotated-48x30"], depth_anything).size == (30, 48)
    # Alpha is dropped, not composited (as convert("RGB")): the visible colours alone decide the map.
    rgba = by_name["rgba-59x71"]
    opaque = rgba.copy()
    opaque.putalpha(255)
    assert np.array_equal(
        np.asarray(depth_map(rgba, depth_anything)), np.asarray(depth_map(opaque, depth_anything))
    )
    grey = by_name["grey-L-77x53"]
    assert np.array_equal(
        np.asarray(depth_map(grey, depth_anything)),
        np.asarray(depth_map(grey.convert("RGB"), depth_anything)),
    )
    # 16-bit grey is scaled to 8 bits (pictor's to_rgb), where the pipeline's convert("RGB") would clip it.
    wide = Image.fromarray(np.asarray(grey, np.uint16) * np.uint16(257))
    assert np.array_equal(
        np.asarray(depth_map(wide, depth_anything)), np.asarray(depth_map(grey, depth_anything))
    )


def test_preprocessing_equals_dpt_processor(depth_anything_folder: Path, tmp_path: Path) -> None:
    # pixel_values themselves, also for settings no shipped model uses: padding, no rescale, no normalise.
    variants = {
        "depth-anything": {},
        "pad-to-32": {"do_pad": True, "size_divisor": 32},
        "no-rescale-no-normalize": {"do_rescale": False, "do_normalize": False},
        "no-resize": {"do_resize": False},
        "lanczos-square": {"resample": 1, "keep_aspect_ratio": False, "ensure_multiple_of": 1},
    }
    for variant, changes in variants.items():
        folder = _copy(depth_anything_folder, tmp_path / variant)
        (folder / "preprocessor_config.json").write_text(
            json.dumps({**DEPTH_ANYTHING_PREPROCESSOR, **changes})
        )
        processor = DPTImageProcessorPil.from_pretrained(folder)
        preprocess = load_depth_model(folder).preprocess
        for name, picture in PICTURES[:5]:
            rgb = picture.convert("RGB")
            # uint8 when neither rescaled nor normalised; the pipeline casts it to the model's float32
            expected = processor(rgb, return_tensors="pt")["pixel_values"].to(torch.float32)
            got = depth_pixel_values(np.asarray(rgb), preprocess)
            assert got.dtype == torch.float32 and got.shape == expected.shape, (variant, name)
            assert torch.equal(got, expected), (variant, name)


def test_comparison_catches_wrong_preprocessing(depth_anything: DepthModel, reference: Any) -> None:
    # The test above must be able to fail: each of these slips changes some map.
    picture = dict(PICTURES)["landscape-odd-61x37"]
    expected = np.asarray(reference(picture)["depth"].convert("RGB"))
    p = depth_anything.preprocess
    for slip in (
        replace(p, resample=Image.Resampling.BILINEAR),
        replace(p, keep_aspect_ratio=False),
        replace(p, ensure_multiple_of=28),
        replace(p, mean=[0.5, 0.5, 0.5]),
        replace(p, rescale=1 / 256),
    ):
        wrong = DepthModel(model=depth_anything.model, preprocess=slip, info=depth_anything.info)
        assert not np.array_equal(np.asarray(depth_map(picture, wrong)), expected), slip


def _bfl_depth_image_encoder(
    model: torch.nn.Module, processor: DPTImageProcessorPil, pixels: np.ndarray
) -> torch.Tensor:
    """flux `prepare_control` + `DepthImageEncoder.__call__`, as BFL wrote them (the picture already at
    the generation size): [1, 3, H, W] floats in the autoencoder's input range."""
    img = torch.from_numpy(pixels.copy()).float() / 127.5 - 1.0
    img = img.permute(2, 0, 1)[None]  # rearrange "h w c -> 1 c h w"
    hw = img.shape[-2:]
    img = torch.clamp(img, -1.0, 1.0)
    img_byte = ((img + 1.0) * 127.5).byte()
    img = processor(img_byte, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        depth = model(img).predicted_depth
    depth = depth[:, None].expand(-1, 3, -1, -1)  # repeat "b h w -> b 3 h w"
    depth = torch.nn.functional.interpolate(depth, hw, mode="bicubic", antialias=True)
    return depth / 127.5 - 1.0


def test_bfl_rule_equals_depth_image_encoder(depth_anything: DepthModel, depth_anything_folder: Path) -> None:
    processor = DPTImageProcessorPil.from_pretrained(depth_anything_folder)
    clipped_any = inside_any = False
    # Leaving BFL's float round trip out moves these maps by up to 4 grey levels: the bound below sees it.
    for name, picture in PICTURES[:4]:
        pixels = np.asarray(picture.convert("RGB"))
        bfl = _bfl_depth_image_encoder(depth_anything.model, processor, pixels)[0].numpy()  # [3, H, W]
        got = np.asarray(depth_map(picture, depth_anything, rule="bfl")).transpose(2, 0, 1)
        ours = got.astype(np.float32) / 127.5 - 1.0  # what pictor's control path makes of the picture
        inside = (bfl >= -1.0) & (bfl <= 1.0)
        assert np.abs(ours - bfl)[inside].max() <= 0.5 / 127.5 + 1e-6, name
        # Beyond [-1, 1] BFL's tensor runs on; pictor's picture stops at black or white.
        assert np.all(ours[bfl > 1.0] == 1.0) and np.all(ours[bfl < -1.0] == -1.0), name
        clipped_any |= bool((~inside).any())
        inside_any |= bool(inside.mean() > 0.5)
    assert clipped_any and inside_any  # the scaled tiny model reaches both regimes


def test_flat_prediction_is_black(depth_anything_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    shutil.copytree(depth_anything_folder, folder)
    state = load_file(folder / "model.safetensors")
    state["head.conv3.weight"] = torch.zeros_like(state["head.conv3.weight"])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = depth_map(dict(PICTURES)["square-64"], load_depth_model(folder))
    assert out.size == (64, 64) and not np.asarray(out).any()


def test_a_512_picture_keeps_its_size(depth_anything: DepthModel) -> None:
    picture = _photo(np.random.default_rng(5), 512, 512)
    assert depth_map(picture, depth_anything).size == (512, 512)


# --- refusals ------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_missing_folder_and_files(depth_anything_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DepthMapError, match="no such folder"):
        load_depth_model(tmp_path / "nowhere")
    with pytest.raises(DepthMapError, match=re.escape("no config.json")):
        load_depth_model(tmp_path)
    folder = _copy(depth_anything_folder, tmp_path / "no-pre")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(DepthMapError, match=re.escape("no preprocessor_config.json")):
        load_depth_model(folder)
    folder = _copy(depth_anything_folder, tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DepthMapError, match=re.escape("no model.safetensors")):
        load_depth_model(folder)


def test_refuses_pickled_weights(depth_anything_folder: Path, tmp_path: Path) -> None:
    folder = _copy(depth_anything_folder, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # never opened, whatever it holds
    with pytest.raises(DepthMapError, match=r"pickle.*safe_serialization=True"):
        load_depth_model(folder)


def test_refuses_other_models(depth_anything_folder: Path, tmp_path: Path) -> None:
    cases = {
        "bert": ({"model_type": "bert"}, "a bert model, not Depth Anything or DPT"),
        "zoedepth": ({"model_type": "zoedepth"}, "a zoedepth model"),
        "segmentation": (
            {"model_type": "dpt", "architectures": ["DPTForSemanticSegmentation"]},
            "not a depth-estimation model",
        ),
        "metric": ({"depth_estimation_type": "metric"}, "metric depth model"),
    }
    for name, (changes, message) in cases.items():
        folder = _copy(depth_anything_folder, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(DepthMapError, match=message):
            load_depth_model(folder)


def test_refuses_bad_preprocessor_configs(depth_anything_folder: Path, tmp_path: Path) -> None:
    cases = {
        "zoe": ({"image_processor_type": "ZoeDepthImageProcessor"}, "DPT's image processor only"),
        "shortest-edge": ({"size": {"shortest_edge": 518}}, "size must be"),
        "zero-std": ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
        "two-means": ({"image_mean": [0.5, 0.5]}, "3 numbers"),
        "filter": ({"resample": 9}, "not a PIL filter"),
        "multiple": ({"ensure_multiple_of": -14}, "positive"),
        "flag": ({"do_resize": "yes"}, "true or false"),
    }
    for name, (changes, message) in cases.items():
        folder = _copy(depth_anything_folder, tmp_path / name)
        (folder / "preprocessor_config.json").write_text(
            json.dumps({**DEPTH_ANYTHING_PREPROCESSOR, **changes})
        )
        with pytest.raises(DepthMapError, match=message):
            load_depth_model(folder)
    folder = _copy(depth_anything_folder, tmp_path / "garbled")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(DepthMapError, match="not readable JSON"):
        load_depth_model(folder)


def test_refuses_incomplete_weights(depth_anything_folder: Path, tmp_path: Path) -> None:
    # transformers would fill the gap with random weights and only log it; pictor refuses.
    folder = _copy(depth_anything_folder, tmp_path / "partial")
    state = load_file(folder / "model.safetensors")
    del state["head.conv3.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DepthMapError, match=r"missing or mismatches 1 weights \(head.conv3.weight\)"):
        load_depth_model(folder)


def test_refuses_bad_pictures_and_rules(depth_anything: DepthModel) -> None:
    with pytest.raises(DepthMapError, match="must be a PIL image"):
        depth_map(np.zeros((8, 8, 3), np.uint8), depth_anything)  # type: ignore[arg-type]
    with pytest.raises(DepthMapError, match="empty"):
        depth_map(Image.new("RGB", (0, 5)), depth_anything)
    with pytest.raises(DepthMapError, match="too thin"):
        depth_map(Image.new("RGB", (2000, 5)), depth_anything)
    with pytest.raises(DepthMapError, match="rule must be one of pipeline, bfl"):
        depth_map(Image.new("RGB", (8, 8)), depth_anything, rule="midas")  # type: ignore[arg-type]
