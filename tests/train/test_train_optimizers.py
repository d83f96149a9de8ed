"""`--optimizer adamw|adafactor|prodigy`: each trains, its state goes through a checkpoint so that a resume
is bit for bit, and a resume with another optimizer is refused by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from prodigyopt import Prodigy
from transformers.optimization import Adafactor

from pictor.checkpoint import read_safetensors
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import TrainingError, train
from pictor.train.optim import build_optimizer

COMMON = {
    "preset": "tiny",
    "data": "shapes",
    "image_size": 16,
    "batch_size": 2,
    "warmup_steps": 2,
    "eval_every": 0,
    "sample_every": 0,
    "progress": False,
    "latent_stats_images": 4,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "ae"
    train(TrainConfig(stage="autoencoder", out=str(out), max_steps=1, **COMMON))  # type: ignore[arg-type]
    return out


def _run(ae: Path, out: Path, steps: int, resume: bool = False, **settings: object) -> list[float]:
    cfg = TrainConfig(
        stage="t2i",
        out=str(out),
        autoencoder_path=str(ae),
        max_steps=steps,
        **{**COMMON, **settings},  # type: ignore[arg-type]
    )
    train(cfg, resume=resume)
    return [row["loss"] for row in read_jsonl(out / "log.jsonl")]


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_each_optimizer_trains_and_resumes_bit_for_bit(
    autoencoder: Path, tmp_path: Path, optimizer: str
) -> None:
    adamw = _run(autoencoder, tmp_path / "adamw", 4)
    whole = _run(autoencoder, tmp_path / "whole", 4, optimizer=optimizer)
    assert all(np.isfinite(whole))
    assert whole[0] == adamw[0]  # the same first batch and weights ...
    assert whole[1:] != adamw[1:]  # ... then other updates
    _run(autoencoder, tmp_path / "parts", 2, optimizer=optimizer, save_every=2)
    assert _run(autoencoder, tmp_path / "parts", 4, resume=True, optimizer=optimizer) == whole
    with pytest.raises(TrainingError, match=f"optimizer state is {optimizer}'s; resume with --optimizer"):
        _run(autoencoder, tmp_path / "parts", 6, resume=True)


def test_adafactor_steps_by_the_learning_rate(autoencoder: Path, tmp_path: Path) -> None:
    """--lr is Adafactor's step size as it is AdamW's: zero-initialised layers (the final layer here, LoRA's
    B, adaLN-Zero) move as far (torch's Adafactor scales steps by max(1e-3, RMS(weight)): ~1000x less)."""
    moved = {}
    for optimizer in ("adamw", "adafactor"):
        out = tmp_path / optimizer
        _run(autoencoder, out, 4, optimizer=optimizer, save_every=4)
        weights = read_safetensors(out / "checkpoints" / "step-000004" / "model.safetensors")
        moved[optimizer] = float(weights["final_layer.linear.weight"].abs().max())
    assert moved["adamw"] > 0
    assert moved["adafactor"] > 0.1 * moved["adamw"], moved


def test_the_optimizers_are_what_they_say(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    base = TrainConfig(stage="t2i", out=str(tmp_path), preset="tiny")
    assert isinstance(build_optimizer(model, base.resolve()), torch.optim.AdamW)
    assert isinstance(
        build_optimizer(model, TrainConfig(**{**base.to_dict(), "optimizer": "adafactor"}).resolve()),
        Adafactor,
    )
    prodigy = TrainConfig(**{**base.to_dict(), "optimizer": "prodigy"}).resolve()
    assert prodigy.lr == 1.0  # Prodigy's lr scales its own estimate
    opt = build_optimizer(model, prodigy)
    assert isinstance(opt, Prodigy)
    assert opt.param_groups[0]["decouple"] and opt.param_groups[0]["use_bias_correction"]


def test_a_changed_optimizer_is_refused_before_anything_runs(autoencoder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer \(--optimizer\) must be one of"):
        TrainConfig(stage="t2i", out=str(tmp_path), preset="tiny", optimizer="sgd").resolve()
    with pytest.raises(ConfigError, match="--fsdp trains with AdamW only"):
        TrainConfig(stage="t2i", out=str(tmp_path), preset="tiny", optimizer="prodigy", fsdp=True).resolve()
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    run = tmp_path / "run"
    _run(autoencoder, run, 1, optimizer="adafactor")
    args = parser.parse_args(["train", "t2i", "--out", str(run), "--resume", "--max-steps", "2"])
    assert config_from_args(args).optimizer == "adafactor"  # the run's own, without the flag
    args = parser.parse_args(["train", "t2i", "--out", str(run), "--resume", "--optimizer", "prodigy"])
    with pytest.raises(
        ConfigError, match="optimizer state is adafactor's; resume with --optimizer adafactor"
    ):
        config_from_args(args)
