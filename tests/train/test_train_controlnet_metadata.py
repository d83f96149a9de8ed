"""`pictor train controlnet --control metadata`: each image's control picture named by its metadata.jsonl
line, as Hugging Face's ControlNet datasets lay them out (images/ and conditioning_images/ side by side,
`conditioning_image_file_name` as `imagefolder` names a second image, or diffusers' `conditioning_image`);
the pictures so named are controls, never training images, and are cropped and mirrored with their images."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.cli_args import build_parser
from pictor.data.folder import ImageFolderDataset
from pictor.train import controlnet as controlnet_stage
from pictor.train.command import config_from_args
from pictor.train.config import ConfigError
from pictor.train.data import data_fingerprint, make_dataset, micro_batches
from pictor.train.loop import train
from tests.train.square_world import SIZE
from tests.train.test_train_controlnet import _config, one_thread, world  # noqa: F401  (fixtures)


def _hf_layout(root: Path, n: int = 6) -> Path:
    """images/i.png (40x32, a pattern each) and conditioning_images/i.png (the same inverted), named by
    one metadata.jsonl at the root: line 4 with diffusers' key, line 5 with no control at all."""
    (root / "images").mkdir(parents=True)
    (root / "conditioning_images").mkdir()
    rng = np.random.default_rng(2)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        Image.fromarray(255 - pixels).save(root / "conditioning_images" / f"{i}.png")
        line: dict[str, str] = {"file_name": f"images/{i}.png", "text": f"picture {i}"}
        if i < 4:
            line["conditioning_image_file_name"] = f"conditioning_images/{i}.png"
        elif i == 4:
            line["conditioning_image"] = f"conditioning_images/{i}.png"
        lines.append(json.dumps(line))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_controls_named_by_metadata_are_cropped_and_mirrored_with_their_images(tmp_path: Path) -> None:
    root = _hf_layout(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = make_dataset(str(root), 32, seed=3, flip=True, control_metadata=True)
    said = " ".join(str(w.message) for w in caught)
    assert "images/5.png" in said and "no control picture" in said  # the line without one
    folder = ds.folder  # type: ignore[attr-defined]
    # the named pictures are left out before the scan, not skipped as images without a control of their own
    # (conditioning_images/5.png, which no line names, is an image without one)
    skipped = sorted(Path(p).relative_to(root).as_posix() for p, _ in folder.skipped)
    assert skipped == ["conditioning_images/5.png", "images/5.png"]
    # the conditioning pictures are not training images, though they lie in the data folder
    assert [folder.rel_path(i) for i in range(len(folder))] == [f"images/{i}.png" for i in range(5)]
    assert folder.captions == [f"picture {i}" for i in range(5)]
    mirrored = 0
    for batch in micro_batches(ds, seed=3, position=0, batch_size=2):
        assert batch.images is not None and batch.controls is not None
        assert batch.controls.shape == batch.images.shape == (2, 3, 32, 32)
        assert torch.equal(batch.controls, 255 - batch.images)  # the same centre crop and mirror
        mirrored += sum(bool(ds.augment.mirrors(3, k)) for k in batch.indices)  # type: ignore[union-attr]
        if batch.indices[-1] >= 15:
            break
    assert 0 < mirrored < 16  # both kinds of sample were checked
    # the control pictures are data too: a resume notices when one changes
    before = data_fingerprint(ds)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "conditioning_images" / "4.png")
    assert data_fingerprint(make_dataset(str(root), 32, seed=3, control_metadata=True)) != before
    # without --control metadata, the keys mean nothing and every picture is an image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(ImageFolderDataset(root, size=32, buckets=False)) == 12


def test_bad_control_entries_are_reported_and_their_images_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "d", "e", "f", "g"):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(root / "sub" / f"{name}.png")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(root / "a-control.png")
    lines = [  # in sub/, so file names are relative to sub/ and a control may lie a folder up
        {"file_name": "a.png", "text": "a", "conditioning_image_file_name": "../a-control.png"},
        {"file_name": "b.png", "text": "b", "conditioning_image_file_name": 3},
        {"file_name": "c.png", "conditioning_image_file_name": "x.png", "conditioning_image": "y.png"},
        {"file_name": "d.png", "text": "d", "conditioning_image": "missing.png"},
        {"file_name": "e.png", "text": "e", "conditioning_image_file_name": "f.png"},
        {"file_name": "f.png", "text": "f", "conditioning_image_file_name": "../a-control.png"},
        {
            "file_name": "a.png",
            "conditioning_image": "./../a-control.png",
        },  # the same picture, spelt otherwise
        {"file_name": "g.png", "conditioning_image_file_name": "../a-control.png"},
        {"file_name": "g.png", "conditioning_image_file_name": "./g.png"},  # the later line wins
    ]
    (root / "sub" / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageFolderDataset(root, size=32, buckets=False, control_metadata=True)
    said = " ".join(str(w.message) for w in caught)
    assert "must be a path string, got 3" in said
    assert "conditioning_image_file_name and conditioning_image name different pictures" in said
    assert "1 images given a control picture twice" in said and "./g.png used instead of" in said
    skipped = {Path(path).name: reason for path, reason in folder.skipped}
    assert "missing.png" in skipped["d.png"]  # d's control does not exist: d is skipped at the scan
    assert "named as a control picture in metadata.jsonl too" in skipped["f.png"]  # e's, with one itself
    assert "names itself as its control picture" in skipped["g.png"]
    assert "no metadata.jsonl line names one" in skipped["b.png"] and "c.png" in skipped
    kept = {folder.rel_path(i): folder.control_name(i) for i in range(len(folder))}
    assert kept == {"sub/a.png": "a-control.png", "sub/e.png": "sub/f.png"}, kept
    levels = [round(float(((folder.load_control(i) + 1) * 127.5).mean())) for i in range(2)]
    assert levels == [200, 100]
    with pytest.raises(ValueError, match="not both"):
        ImageFolderDataset(root, size=32, control_dir=root / "sub", control_metadata=True)


def test_a_controlnet_trains_on_controls_named_by_metadata(
    world: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "conditioning_images").mkdir()
    lines = []
    for line in (world["folder"] / "metadata.jsonl").read_text().splitlines():
        rec = json.loads(line)
        shutil.copyfile(world["folder"] / rec["file_name"], root / "images" / rec["file_name"])
        mask = np.zeros((SIZE, SIZE, 3), np.uint8)
        x0, y0, x1, y1 = (round(v * SIZE) for v in rec["layout"][0]["box"])
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(root / "conditioning_images" / rec["file_name"])
        name = f"images/{rec['file_name']}"
        lines.append({"file_name": name, "text": rec["text"], "conditioning_image": f"conditioning_{name}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    seen: list[torch.Tensor] = []
    encode = controlnet_stage.ControlNetStage._encode_controls

    def spy(self: controlnet_stage.ControlNetStage, pictures: torch.Tensor) -> torch.Tensor:
        seen.append(pictures.clone())
        return encode(self, pictures)

    monkeypatch.setattr(controlnet_stage.ControlNetStage, "_encode_controls", spy)
    monkeypatch.setattr(controlnet_stage, "canny_control_picture", None)  # never drawn: they are read
    out = tmp_path / "controlnet"
    train(_config(world, out, data=str(root), control="metadata", max_steps=3, save_every=0))
    assert len(seen) >= 3 and all(((p < 40) | (p > 215)).float().mean() > 0.9 for p in seen)  # the masks
    written = json.loads((out / "controlnet" / "config.json").read_text())
    assert written["_class_name"] == "FluxControlNetModel"

    with pytest.raises(ConfigError, match="--control metadata is for controlnet training on an image folder"):
        train(_config(world, tmp_path / "s", data="shapes", control="metadata"))
    with pytest.raises(ConfigError, match="--control-dir needs --control folder"):
        train(_config(world, tmp_path / "d", control="metadata", control_dir=str(root)))
    args = ["train", "controlnet", "--out", str(tmp_path), "--data", str(root), "--control", "metadata"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.control == "metadata" and cfg.control_dir is None


def test_links_to_one_blob_stay_different_files(tmp_path: Path) -> None:
    """A dataset in the Hugging Face cache: every file a link into blobs/, files of equal contents one blob.
    Pairing and the exclusion of controls go by the paths as written, so no image borrows another's control
    and no image is taken for a control because its pixels equal one."""
    blobs, root = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    (root / "images").mkdir(parents=True)
    (root / "conditioning_images").mkdir()

    def blob(name: str, value: int) -> Path:
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(blobs / name, format="PNG")
        return blobs / name

    same, shared = blob("same", 10), blob("shared", 20)
    links = {
        "images/0.png": shared,  # its pixels are image 2's control's
        "images/1.png": same,
        "images/2.png": same,  # the same pixels as image 1
        "conditioning_images/0.png": blob("c0", 100),
        "conditioning_images/1.png": blob("c1", 110),
        "conditioning_images/2.png": shared,
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    lines = [
        {"file_name": f"images/{i}.png", "text": str(i), "conditioning_image": f"conditioning_images/{i}.png"}
        for i in range(3)
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    folder = ImageFolderDataset(root, size=32, buckets=False, control_metadata=True)
    pairs = {folder.rel_path(i): folder.control_name(i) for i in range(len(folder))}
    assert pairs == {f"images/{i}.png": f"conditioning_images/{i}.png" for i in range(3)}
    levels = [round(float(((folder.load_control(i) + 1) * 127.5).mean())) for i in range(3)]
    assert levels == [100, 110, 20]


def test_the_control_folder_fingerprint_names_controls_as_before(tmp_path: Path) -> None:
    """A --control-dir run's resume fingerprint names each control relative to the control folder as
    written (a linked control file keeps its name), as runs before --control metadata stored it."""
    images, controls, elsewhere = tmp_path / "images", tmp_path / "controls", tmp_path / "elsewhere"
    for folder in (images, controls, elsewhere):
        folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).save(images / f"{name}.png")
    Image.fromarray(np.full((32, 32, 3), 60, np.uint8)).save(controls / "a.png")
    Image.fromarray(np.full((32, 32, 3), 70, np.uint8)).save(elsewhere / "b_real.png")
    (controls / "b.png").symlink_to(elsewhere / "b_real.png")
    ds = make_dataset(str(images), 32, seed=0, control_dir=str(controls))
    folder = ds.folder  # type: ignore[attr-defined]
    assert [folder.control_name(i) for i in range(len(folder))] == ["a.png", "b.png"]
    digest = hashlib.sha256()
    for i, (path, caption) in enumerate(zip(folder.paths, folder.captions, strict=True)):
        control = folder.controls[i]
        line = f"{folder.rel_path(i)}\t{path.stat().st_size}\t{caption}"
        line += f"\t{control.relative_to(folder.control_dir).as_posix()}\t{control.stat().st_size}"
        digest.update(f"{line}\n".encode())
    assert data_fingerprint(ds) == {"images": 2, "sha256": digest.hexdigest()}
