"""`--loss-type l1|huber|smooth_l1` with `--huber-c`, `--huber-schedule`, `--huber-scale`: kohya's loss
types on the flow loss."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.flow import flow_loss, huber_threshold
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import SampleDraws, make_dataset, micro_batches
from pictor.train.distributed import DistInfo
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from pictor.train.lora import LoRAStage

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_errors_are_kohyas_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.tensor([0.05, 0.3, 2.0])
    d = pred.numpy() - (noise.numpy() - x0.numpy())  # the velocity target is noise - data
    cc = c.numpy()[:, None, None]
    expected = {
        "l2": d**2,
        "l1": np.abs(d),
        "huber": 2 * cc * (np.sqrt(d**2 + cc**2) - cc),
        "smooth_l1": 2 * (np.sqrt(d**2 + cc**2) - cc),
    }
    for kind, want in expected.items():
        got = flow_loss(pred, x0, noise, reduction="none", loss_type=kind, huber_c=c)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
        assert float(flow_loss(pred, x0, noise, loss_type=kind, huber_c=c)) == pytest.approx(
            want.mean(), rel=1e-5
        )
    # quadratic well under the threshold, linear well past it
    small, big = torch.full((1, 1), 1e-3), torch.full((1, 1), 1e3)
    zero, one = torch.zeros(1, 1), torch.ones(1)
    assert float(flow_loss(small, zero, zero, loss_type="huber", huber_c=one)) == pytest.approx(
        1e-6, rel=1e-3
    )
    assert float(flow_loss(big, zero, zero, loss_type="huber", huber_c=one)) == pytest.approx(2e3, rel=1e-2)
    with pytest.raises(ValueError, match="needs each sample's threshold"):
        flow_loss(pred, x0, noise, loss_type="huber")
    with pytest.raises(ValueError, match="unknown loss_type 'l3'"):
        flow_loss(pred, x0, noise, loss_type="l3")


def test_the_thresholds_are_kohyas_on_flux_timesteps() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert huber_threshold(t, 0.1, "constant", 2.0).tolist() == pytest.approx([0.2] * 4)
    # kohya: exp(-alpha * timesteps) * scale, alpha = -ln(c) / 1000, timesteps = t * 1000 on FLUX.1
    alpha = -math.log(0.1) / 1000
    kohya = [math.exp(-alpha * 1000 * float(v)) * 2.0 for v in t]
    assert huber_threshold(t, 0.1, "exponential", 2.0).tolist() == pytest.approx(kohya, rel=1e-6)
    assert huber_threshold(t, 0.1, "exponential", 2.0)[[0, -1]].tolist() == pytest.approx([2.0, 0.2])
    with pytest.raises(ValueError, match="unknown Huber schedule 'snr'"):
        huber_threshold(t, 0.1, "snr")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(2)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def test_the_stage_trains_on_the_loss_type_it_is_given(base: Path, folder: Path, tmp_path: Path) -> None:
    """On one batch: l1 is the mean absolute error; Huber with a huge threshold is l2, with a tiny one 2c
    times l1, and smooth_l1 with a tiny one twice l1 (each a limit of kohya's formula)."""
    batch = None

    def loss(**settings: object) -> float:
        nonlocal batch
        cfg = TrainConfig(
            stage="lora",
            out=str(tmp_path / "r"),
            base=str(base),
            data=str(folder),
            image_size=SIZE,
            **settings,  # type: ignore[arg-type]
        ).resolve()
        ds = make_dataset(str(folder), SIZE, 0)
        stage = LoRAStage(cfg, ds, DistInfo(0, 1, 0, torch.device("cpu")))
        if batch is None:
            draws = SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2)
            batch = next(micro_batches(ds, 0, 0, 2, draws=draws))
        with torch.no_grad():
            return float(stage.loss(stage.flux, batch)[0])

    l2, l1 = loss(), loss(loss_type="l1")
    assert l1 != pytest.approx(l2, rel=1e-2)
    assert loss(loss_type="huber", huber_c=1.0, huber_scale=1e4) == pytest.approx(l2, rel=1e-4)
    assert loss(loss_type="huber", huber_c=1e-3, huber_scale=1e-3) == pytest.approx(2e-6 * l1, rel=1e-3)
    assert loss(loss_type="smooth_l1", huber_c=1e-3, huber_scale=1e-3) == pytest.approx(2 * l1, rel=1e-3)
    # the exponential schedule's threshold depends on each sample's t: between the constant c and scale
    expo = loss(loss_type="huber", huber_c=0.01, huber_schedule="exponential")
    assert loss(loss_type="huber", huber_c=0.01) < expo < loss(loss_type="huber", huber_c=1.0)


def test_the_options_reach_a_run_and_are_refused_where_they_cannot_apply(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    argv = [
        "train",
        "lora",
        "--base",
        str(base),
        "--data",
        str(folder),
        "--out",
        str(out),
        "--max-steps",
        "2",
    ]
    argv += ["--image-size", str(SIZE), "--batch-size", "2", "--sample-every", "0", "--no-progress"]
    argv += ["--loss-type", "smooth_l1", "--huber-c", "0.2", "--huber-schedule", "exponential"]
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.loss_type, cfg.huber_c, cfg.huber_schedule, cfg.huber_scale) == (
        "smooth_l1",
        0.2,
        "exponential",
        1.0,
    )
    train(cfg)
    assert len(read_jsonl(out / "log.jsonl")) == 2
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99]}
    for settings, words in (
        ({"stage": "autoencoder", "loss_type": "huber"}, "the autoencoder stage's is --recon-loss"),
        ({"loss_type": "huber", "huber_c": 0.0}, r"huber_c \(--huber-c\) must lie in \(0, 1\]"),
        ({"loss_type": "huber", "huber_schedule": "snr"}, "kohya's 'snr' needs a DDPM scheduler"),
        ({"loss_type": "l3"}, "loss_type .* must be one of l2, l1, huber, smooth_l1"),
    ):
        settings = {"stage": "t2i", "data": "shapes", **config, **settings}
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", **settings).validate()  # type: ignore[arg-type]


def test_the_validation_loss_is_measured_with_the_runs_loss_type(base: Path, tmp_path: Path) -> None:
    """As kohya's validation: the held-out images' error is the one the run trains on (l1 is no l2)."""
    from pictor.train.data import validation_items
    from pictor.train.validation import validation_loss

    root = tmp_path / "pictures"
    root.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")

    def val(**settings: object) -> float:
        cfg = TrainConfig(
            stage="lora",
            out=str(tmp_path / "r"),
            base=str(base),
            data=str(root),
            image_size=SIZE,
            **settings,  # type: ignore[arg-type]
        ).resolve()
        ds = make_dataset(str(root), SIZE, 0, validation_split=0.5)
        stage = LoRAStage(cfg, ds, DistInfo(0, 1, 0, torch.device("cpu")))
        return float(validation_loss(stage, stage.flux, ds, validation_items(ds))["val_loss"])

    l2 = val()
    assert val(loss_type="huber", huber_c=1.0, huber_scale=1e4) == pytest.approx(l2, rel=1e-4)
    assert val(loss_type="l1") != pytest.approx(l2, rel=1e-2)
