"""`pictor train controlnet --control-dir DIR`: control pictures read from a folder (kohya's
conditioning_data_dir), paired with the training images by relative path, cropped and mirrored with them;
a ControlNet trained on masks of the squares world puts the square where a mask says."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.cli_args import build_parser
from pictor.loading import load
from pictor.pipeline import GenerationRequest
from pictor.train import controlnet as controlnet_stage
from pictor.train.command import config_from_args
from pictor.train.config import ConfigError
from pictor.train.data import data_fingerprint, make_dataset, micro_batches
from pictor.train.loop import train
from tests.train.square_world import SIZE, blue_x
from tests.train.test_train_controlnet import _config, one_thread, world  # noqa: F401  (fixtures)


def _mask(box: list[float], size: int = SIZE) -> np.ndarray:
    """White where the box is, black elsewhere: a segmentation-like control picture."""
    out = np.zeros((size, size, 3), np.uint8)
    x0, y0, x1, y1 = (round(v * size) for v in box)
    out[y0:y1, x0:x1] = 255
    return out


@pytest.fixture(scope="module")
def masks(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A mask of each squares-world image's square, at twice its size (resized to the image's on loading)."""
    folder = tmp_path_factory.mktemp("masks")
    for line in (world["folder"] / "metadata.jsonl").read_text().splitlines():
        rec = json.loads(line)
        big = _mask(rec["layout"][0]["box"], 2 * SIZE)
        Image.fromarray(big).save(folder / rec["file_name"].replace(".png", ".webp"), lossless=True)
    return folder


def _pictures(root: Path, n: int = 6) -> tuple[Path, Path]:
    """Images 40x32 with a distinct pattern each, and as control the same picture inverted (exactly
    predictable after any crop and mirror); one image without a control picture."""
    images, controls = root / "images", root / "controls"
    (images / "sub").mkdir(parents=True)
    (controls / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / "sub" / f"{i}.png")
        (images / "sub" / f"{i}.txt").write_text(f"picture {i}")
        if i < n - 1:
            Image.fromarray(255 - pixels).save(controls / "sub" / f"{i}.png")
    return images, controls


def test_control_pictures_are_cropped_and_mirrored_with_their_images(tmp_path: Path) -> None:
    images, controls = _pictures(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = make_dataset(str(images), 32, seed=3, flip=True, control_dir=str(controls), validation_split=0.2)
    assert any("no control picture sub/5.* in" in str(w.message) for w in caught)  # the one without
    assert len(ds) == 5
    mirrored = 0
    for batch in micro_batches(ds, seed=3, position=0, batch_size=2):
        assert batch.images is not None and batch.controls is not None
        assert batch.controls.shape == batch.images.shape == (2, 3, 32, 32)
        assert torch.equal(batch.controls, 255 - batch.images)  # the same centre crop and mirror
        mirrored += sum(bool(ds.augment.mirrors(3, k)) for k in batch.indices)  # type: ignore[union-attr]
        if batch.indices[-1] >= 15:
            break
    assert 0 < mirrored < 16  # both kinds of sample were checked
    held_out = ds.validation  # type: ignore[attr-defined]
    image, _, info = ds[int(held_out[0])]
    assert np.array_equal(info["control"], 255 - image)  # the validation loss reads them too
    # the control pictures are data too: a resume notices when they change
    before = data_fingerprint(ds)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(controls / "sub" / "0.png")
    assert data_fingerprint(make_dataset(str(images), 32, seed=3, control_dir=str(controls))) != before


def test_a_controlnet_follows_the_masks_of_its_control_folder(
    world: dict[str, Path],  # noqa: F811
    masks: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.Tensor] = []
    encode = controlnet_stage.ControlNetStage._encode_controls

    def spy(self: controlnet_stage.ControlNetStage, pictures: torch.Tensor) -> torch.Tensor:
        seen.append(pictures.clone())
        return encode(self, pictures)

    monkeypatch.setattr(controlnet_stage.ControlNetStage, "_encode_controls", spy)
    monkeypatch.setattr(controlnet_stage, "canny_control_picture", None)  # never drawn: they are read
    out = tmp_path / "controlnet"
    config = _config(
        world, out, max_steps=200, batch_size=8, lr_schedule="cosine", save_every=0, flip_aug=True,
        control="folder", control_dir=str(masks), sample_every=100, num_samples=4,
    )  # fmt: skip
    train(config)
    assert len(seen) >= 200 and all(((p < 40) | (p > 215)).float().mean() > 0.9 for p in seen[:5])
    training = json.loads((out / "controlnet" / "config.json").read_text())
    assert training["_class_name"] == "FluxControlNetModel"
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())  # previews from the masks

    pipe = load(str(world["base"]), device="cpu")
    pipe.add_controlnet(out / "controlnet")

    def sides(box: list[float]) -> list[float | None]:
        request = GenerationRequest(
            "a blue square", seed=0, num_images=16, steps=12, controlnet_images=[_mask(box)]
        )
        return [blue_x(np.asarray(g.image)) for g in pipe.generate(request)]

    left, right = (
        sides([1 / SIZE, 5 / SIZE, 6 / SIZE, 10 / SIZE]),
        sides([10 / SIZE, 5 / SIZE, 15 / SIZE, 10 / SIZE]),
    )
    hits = [x is not None and x < 0.5 for x in left] + [x is not None and x > 0.5 for x in right]
    assert np.mean(hits) >= 0.85, (left, right)


def test_control_dir_is_refused_where_it_cannot_be_used(
    world: dict[str, Path],  # noqa: F811
    masks: Path,
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="--control-dir is for controlnet training on an image folder"):
        train(_config(world, tmp_path / "s", data="shapes", control="folder", control_dir=str(masks)))
    with pytest.raises(ConfigError, match="--control folder reads its pictures from --control-dir"):
        train(_config(world, tmp_path / "f", control="folder"))
    with pytest.raises(FileNotFoundError, match="control picture folder not found"):
        train(_config(world, tmp_path / "m", control="folder", control_dir=str(tmp_path / "missing")))
    args = ["train", "controlnet", "--out", str(tmp_path), "--control-dir", str(masks)]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.control == "folder" and cfg.control_dir == str(masks.resolve())


def test_controls_are_found_by_full_stem_any_case_and_checked_at_the_scan(tmp_path: Path) -> None:
    images, controls = tmp_path / "images", tmp_path / "controls"
    images.mkdir()
    controls.mkdir()
    grey = {"cat.png": 10, "cat.v1.png": 20, "dog.png": 30, "fox.png": 40, "owl.png": 50, "yak.png": 60}
    for name, value in grey.items():
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(images / name)
    Image.fromarray(np.full((32, 32, 3), 110, np.uint8)).save(controls / "cat.png")
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(controls / "cat.v1.png")  # not cat.png's
    Image.fromarray(np.full((32, 32, 3), 130, np.uint8)).save(controls / "dog.PNG")  # upper-case extension
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[:16, :, 3] = 140, 255  # the top half opaque, the bottom transparent
    Image.fromarray(rgba).save(controls / "fox.png")
    (controls / "owl.png").write_bytes(b"not a picture")  # unreadable: owl is skipped at the scan
    Image.fromarray(np.full((16, 48, 3), 150, np.uint8)).save(controls / "yak.png")  # another aspect ratio
    from pictor.data.folder import ImageFolderDataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageFolderDataset(images, size=32, buckets=False, control_dir=controls)
    said = " ".join(str(w.message) for w in caught)
    assert "owl.png" in said and "control picture" in said and "stretched" in said and "48x16" in said
    controls_of = {Path(folder.paths[i]).name: folder.load_control(i) for i in range(len(folder))}
    assert set(controls_of) == {"cat.png", "cat.v1.png", "dog.png", "fox.png", "yak.png"}

    def level(name: str) -> float:
        return float(((controls_of[name] + 1) * 127.5).mean())

    assert (
        round(level("cat.png")) == 110
        and round(level("cat.v1.png")) == 120
        and round(level("dog.png")) == 130
    )
    fox = (controls_of["fox.png"] + 1) * 127.5
    assert torch.allclose(fox, torch.full_like(fox, 140), atol=0.5)  # alpha dropped, not put on white
    with pytest.raises(ValueError, match="is the image folder itself"):
        ImageFolderDataset(images, size=32, control_dir=images)
