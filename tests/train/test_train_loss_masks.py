"""Loss masks (`--alpha-mask`, `--mask-dir`): the flow loss weighted by a grey mask per picture, cropped and
mirrored with it, as kohya's --alpha_mask and --masked_loss weigh it."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.data import folder as folder_module
from pictor.data.folder import DatasetWarning, ImageFolderDataset
from pictor.data.loss_masks import alpha_band, fitted_mask, read_mask
from pictor.models.flux import pack_latents
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import SampleDraws, data_fingerprint, make_dataset, micro_batches, validation_items
from pictor.train.distributed import DistInfo
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from pictor.train.lora import LoRAStage
from pictor.train.validation import validation_loss

SIZE = 16
CPU = DistInfo(0, 1, 0, torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


def _half_transparent(w: int, h: int, seed: int) -> Image.Image:
    """Dark random colours, opaque in the left third only (the rest composites to white)."""
    rgba = np.random.default_rng(seed).integers(0, 100, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:, : w // 3, 3] = 255
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def cutouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pictures with alpha of three shapes (wide, tall, square), captioned."""
    root = tmp_path_factory.mktemp("cutouts")
    for i, (w, h) in enumerate([(40, 20), (20, 40), (24, 24), (32, 32)]):
        _half_transparent(w, h, i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"cutout {i}")
    return root


def test_the_alpha_band_or_a_mask_picture_is_read_as_grey() -> None:
    assert alpha_band(Image.new("RGB", (4, 4))) is None
    la = Image.new("LA", (4, 4), (9, 77))
    assert np.array(alpha_band(la)).tolist() == [[77] * 4] * 4  # type: ignore[arg-type]
    keyed = Image.new("P", (2, 1))
    keyed.putpalette([0, 0, 0, 255, 255, 255])
    keyed.putpixel((1, 0), 1)
    keyed.info["transparency"] = 1  # a palette entry that means "transparent"
    assert np.array(alpha_band(keyed)).tolist() == [[255, 0]]  # type: ignore[arg-type]


def test_a_mask_is_cropped_and_mirrored_exactly_as_its_image(cutouts: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(cutouts, SIZE, buckets=True, multiple=4, loss_mask="alpha")
    for i in range(len(ds)):
        for flip in (False, True):
            image = ds.load_image(i, flip)  # transparent pixels are composited on white
            mask = ds.load_mask(i, flip)
            assert mask.shape == (1, *image.shape[1:]) and mask.dtype == torch.uint8
            # where the mask counts the picture is its dark opaque part; where not, the white cut-out
            brightness = image.mean(0)
            assert bool((brightness[mask[0] > 250] < 0).all()) and bool((brightness[mask[0] < 5] > 0.9).all())
            assert int((mask[0] > 250).sum()) > 0 and int((mask[0] < 5).sum()) > 0
    # a mask drawn at another size is resized to its picture first
    small = Image.new("L", (5, 10), 0)
    small.paste(255, (0, 0, 5, 5))  # the top half counts
    got = fitted_mask(small, (20, 40), (16, 32), flip=False)
    assert got.shape == (1, 32, 16) and got[0, :12].min() >= 250 and got[0, 20:].max() <= 5


def test_a_mask_folder_pairs_by_relative_path_and_stem(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "images" / "masks"  # inside: not scanned as images
    (images / "a").mkdir(parents=True)
    (masks / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(images / "a" / "x.jpg")
    Image.new("RGB", (16, 16), "blue").save(images / "y.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(masks / "a" / "x.png")  # a colour mask counts by brightness
    for name in ("x.jpg", "y.png"):
        (images / ("a" if name == "x.jpg" else ".") / Path(name).with_suffix(".txt")).write_text(name)
    with pytest.warns(DatasetWarning, match=r"have no mask in .*masks .*trained whole"):
        ds = ImageFolderDataset(images, SIZE, loss_mask="folder", mask_dir=masks)
    assert [ds.rel_path(i) for i in range(len(ds))] == ["y.png", "a/x.jpg"]
    assert ds.masks == [None, masks / "a" / "x.png"] and ds.unmasked == [str(images / "y.png")]
    assert int(ds.load_mask(0).min()) == 255 and int(ds.load_mask(1).max()) == 0
    assert np.array(read_mask(masks / "a" / "x.png", "folder")).max() == 0
    with pytest.raises(ValueError, match="the mask folder is the image folder itself"):
        ImageFolderDataset(images, SIZE, loss_mask="folder", mask_dir=images)
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        ImageFolderDataset(images, SIZE, loss_mask="folder", mask_dir=tmp_path / "none")
    # the masks are data: another mask is another fingerprint
    before = data_fingerprint(make_dataset(str(images), SIZE, 0, loss_mask="folder", mask_dir=str(masks)))
    Image.new("RGB", (16, 16), (255, 255, 255)).save(masks / "a" / "x.png")
    assert (
        data_fingerprint(make_dataset(str(images), SIZE, 0, loss_mask="folder", mask_dir=str(masks)))
        != before
    )


def test_the_stream_mirrors_each_mask_with_its_image(cutouts: Path) -> None:
    ds = make_dataset(str(cutouts), SIZE, 0, flip=True, loss_mask="alpha")
    draws = SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2)
    stream = micro_batches(ds, 0, 0, 2, draws=draws)
    mirrored = 0
    for _ in range(8):
        batch = next(stream)
        assert batch.images is not None and batch.draws["mask"].shape == (2, 1, SIZE, SIZE)
        for image, mask in zip(batch.images, batch.draws["mask"], strict=True):
            opaque_left = bool(mask[0, :, :4].float().mean() > 128)
            assert opaque_left != bool(mask[0, :, -4:].float().mean() > 128)  # one side counts
            brightness = image.float().mean(0)
            assert bool((brightness[mask[0] > 250] < 128).all()) and bool(
                (brightness[mask[0] < 5] > 240).all()
            )
            mirrored += not opaque_left
    assert 0 < mirrored < 16


def _stage(base: Path, data: Path, out: Path, **settings: object) -> LoRAStage:
    cfg = TrainConfig(
        stage="lora",
        out=str(out),
        base=str(base),
        data=str(data),
        image_size=SIZE,
        **settings,  # type: ignore[arg-type]
    ).resolve()
    ds = make_dataset(str(data), SIZE, 0, loss_mask="alpha" if cfg.alpha_mask else None)
    return LoRAStage(cfg, ds, CPU)


def test_the_loss_is_the_flow_loss_weighted_by_the_mask_per_latent_pixel(
    base: Path, cutouts: Path, tmp_path: Path
) -> None:
    stage = _stage(base, cutouts, tmp_path / "r", alpha_mask=True)
    draws = SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2)
    batch = next(micro_batches(stage.ds, 0, 0, 2, draws=draws))

    def loss(mask: torch.Tensor) -> float:
        batch.draws["mask"] = mask
        with torch.no_grad():
            return float(stage.loss(stage.flux, batch)[0])

    ones = torch.full((2, 1, SIZE, SIZE), 255, dtype=torch.uint8)
    batch.draws.pop("mask")
    with torch.no_grad():
        plain = float(stage.loss(stage.flux, batch)[0])
    assert loss(ones) == pytest.approx(plain, rel=1e-6)
    assert loss(torch.zeros_like(ones)) == 0.0
    left, right = ones.clone(), ones.clone()
    left[..., SIZE // 2 :] = 0
    right[..., : SIZE // 2] = 0
    assert loss(left) + loss(right) == pytest.approx(plain, rel=1e-5)  # the weights add up
    assert loss(left) != pytest.approx(loss(right), rel=1e-3)
    # a mask is averaged over each latent pixel (factor 2 here): one counted pixel in four weighs 1/4
    one = torch.zeros_like(ones)
    one[:, :, 0, 0] = 255
    z = torch.zeros(2, 4, SIZE // 2, SIZE // 2)
    weights = stage._mask_weights(type(batch)(None, ["", ""], [0, 1], {"mask": one}), z)
    expected = torch.zeros(2, 4, SIZE // 2, SIZE // 2)
    expected[:, :, 0, 0] = 0.25
    torch.testing.assert_close(weights, pack_latents(expected))


def test_a_run_with_cached_latents_reads_the_masks_and_trains_as_without_the_cache(
    base: Path, cutouts: Path, tmp_path: Path
) -> None:
    common = {
        "stage": "lora",
        "base": str(base),
        "data": str(cutouts),
        "image_size": SIZE,
        "batch_size": 2,
        "sample_every": 0,
        "eval_every": 0,
        "progress": False,
        "warmup_steps": 0,
        "max_steps": 3,
        "flip_aug": True,
        "buckets": True,
    }

    def run(name: str, **settings: object) -> list[float]:
        train(TrainConfig(out=str(tmp_path / name), **{**common, **settings}))  # type: ignore[arg-type]
        return [row["loss"] for row in read_jsonl(tmp_path / name / "log.jsonl")]

    masked = run("masked", alpha_mask=True)
    np.testing.assert_allclose(run("cached", alpha_mask=True, cache_latents=True), masked, rtol=1e-4)
    plain = run("plain")
    assert all(m < p for m, p in zip(masked, plain, strict=True))  # a third of each picture counts


def test_the_validation_loss_is_measured_under_the_masks(base: Path, tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture {i}")
        Image.new("L", (SIZE, SIZE), 0).save(masks / f"{i}.png")  # nothing counts
    cfg = TrainConfig(
        stage="lora",
        out=str(tmp_path / "r"),
        base=str(base),
        data=str(images),
        image_size=SIZE,
        mask_dir=str(masks),
    ).resolve()
    ds = make_dataset(str(images), SIZE, 0, loss_mask="folder", mask_dir=str(masks), validation_split=0.5)
    stage = LoRAStage(cfg, ds, CPU)
    held = validation_items(ds)
    assert validation_loss(stage, stage.flux, ds, held)["val_loss"] == 0.0
    plain = make_dataset(str(images), SIZE, 0, validation_split=0.5)
    assert validation_loss(stage, stage.flux, plain, held)["val_loss"] > 0.0


def test_the_options_reach_the_run_and_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", "b", "--data", str(tmp_path), "--out", "o"]
    assert config_from_args(parser.parse_args([*argv, "--alpha-mask"])).alpha_mask is True
    cfg = config_from_args(parser.parse_args([*argv, "--mask-dir", "m"]))
    assert cfg.mask_dir == str(Path("m").resolve())
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99]}
    for settings, words in (
        ({"data": "shapes", "alpha_mask": True}, "--alpha-mask: loss masks are for image folders"),
        ({"stage": "layout", "mask_dir": "m"}, "--mask-dir: loss masks are for image folders"),
        ({"alpha_mask": True, "mask_dir": "m"}, "not both; drop one"),
    ):
        settings = {"stage": "t2i", "data": str(tmp_path), **config, **settings}
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", **settings).validate()  # type: ignore[arg-type]


def test_a_mask_that_does_not_decode_trains_its_image_whole(tmp_path: Path) -> None:
    """Found by the scan: listed, the image trained whole; found later (the quick check passed, or the file
    changed): reported once, the image still its own (no stand-in), the run going on."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (40 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture {i}")
        Image.new("L", (SIZE, SIZE), 0).save(masks / f"{i}.png")
    (masks / "1.png").write_bytes((masks / "1.png").read_bytes()[:40])  # truncated
    with pytest.warns(DatasetWarning, match=r"(?s)mask pictures that do not decode .*1\.png"):
        ds = ImageFolderDataset(images, SIZE, loss_mask="folder", mask_dir=masks)
    assert len(ds) == 3 and ds.masks[1] is None and str(images / "1.png") in ds.unmasked
    assert int(ds.load_mask(1).min()) == 255 and int(ds.load_mask(0).max()) == 0
    (masks / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nno longer a picture")  # after the scan
    with pytest.warns(DatasetWarning, match=r"cannot decode the mask .*2\.png.*trained whole"):
        item = ds[2]
    assert item["rel_path"] == "2.png" and int(item["mask"].min()) == 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert ds[2]["rel_path"] == "2.png"


def test_alpha_masks_open_only_pictures_with_transparency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (SIZE, SIZE), "red").save(tmp_path / "opaque.jpg")
    _half_transparent(SIZE, SIZE, 0).save(tmp_path / "cut.png")
    for name in ("opaque", "cut"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = ImageFolderDataset(tmp_path, SIZE, loss_mask="alpha")
    opened: list[str] = []
    real = folder_module.read_mask
    monkeypatch.setattr(
        folder_module, "read_mask", lambda path, kind: opened.append(path.name) or real(path, kind)
    )
    masks = {ds.rel_path(i): ds.load_mask(i) for i in range(len(ds))}
    assert (
        opened == ["cut.png"] and int(masks["opaque.jpg"].min()) == 255 and int(masks["cut.png"].min()) == 0
    )
