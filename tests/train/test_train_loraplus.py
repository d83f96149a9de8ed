"""`--loraplus-lr-ratio R` (LoRA+, kohya's loraplus_lr_ratio): a LoRA's B matrices learn R times faster."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig, resume_refusal
from pictor.train.loop import train
from pictor.train.optim import param_groups, set_lr

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def test_the_up_matrices_form_a_group_whose_rate_is_scaled() -> None:
    model = torch.nn.Module()
    model.lora_A = torch.nn.Linear(3, 2, bias=True)  # a "lora_A.weight" and a 1-D bias
    model.lora_B = torch.nn.Linear(2, 3, bias=False)
    model.other = torch.nn.Module()
    model.other.lora_up = torch.nn.Linear(2, 2, bias=False)
    plain = param_groups(model, 0.01)
    assert [len(g["params"]) for g in plain] == [3, 1] and "lr_scale" not in plain[0]
    groups = param_groups(model, 0.01, up_ratio=16.0)
    assert [len(g["params"]) for g in groups] == [1, 2, 1]
    assert groups[1]["params"] == [model.lora_B.weight, model.other.lora_up.weight]
    assert groups[1]["lr_scale"] == 16.0 and groups[1]["weight_decay"] == 0.01
    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1.6e-2, 1e-3])


def _run(base: Path, folder: Path, out: Path, **settings: object) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(
        stage="lora",
        out=str(out),
        base=str(base),
        data=str(folder),
        image_size=SIZE,
        batch_size=2,
        sample_every=0,
        save_every=1,
        progress=False,
        warmup_steps=0,
        lr=1e-3,
        **settings,  # type: ignore[arg-type]
    )
    train(cfg)
    return load_file(str(out / "checkpoints" / f"step-{cfg.max_steps:06d}" / "model.safetensors"))


def test_a_run_moves_b_ratio_times_as_far_on_its_first_step(base: Path, folder: Path, tmp_path: Path) -> None:
    """AdamW's first step moves every weight with a gradient by the learning rate (its update is the sign
    of the gradient), and A has none while B is zero: so B moves by lr x R, A not at all; a ratio of 1 is
    the plain run bit for bit."""
    plain = _run(base, folder, tmp_path / "plain", max_steps=1)
    fast = _run(base, folder, tmp_path / "fast", max_steps=1, loraplus_lr_ratio=16.0)
    same = _run(base, folder, tmp_path / "same", max_steps=1, loraplus_lr_ratio=1.0)
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)
    ups = [k for k in plain if k.endswith("lora_B.weight")]
    assert ups
    for key in ups:
        assert float(plain[key].abs().max()) == pytest.approx(1e-3, rel=1e-3)
        assert float(fast[key].abs().max()) == pytest.approx(16e-3, rel=1e-3)
    for key in (k for k in plain if k.endswith("lora_A.weight")):
        assert torch.equal(plain[key], fast[key])  # no gradient yet: B is zero


def test_it_is_refused_where_it_cannot_apply_and_fixed_on_resume(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    config = {"lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99], "data": str(folder)}
    for settings, words in (
        ({"stage": "t2i", "loraplus_lr_ratio": 4.0}, "drop it for this t2i run"),
        ({"stage": "lora", "lora_algo": "lokr", "loraplus_lr_ratio": 4.0}, r"this lora run \(lokr\)"),
        ({"stage": "lora", "loraplus_lr_ratio": 0.0}, "must be above 0"),
        ({"stage": "lora", "loraplus_lr_ratio": 16.0, "optimizer": "prodigy"}, "Prodigy estimates one step"),
    ):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", **{**config, **settings}).validate()  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    argv = ["train", "lora", "--base", "b", "--data", str(folder), "--out", "o", "--loraplus-lr-ratio", "16"]
    assert config_from_args(parser.parse_args(argv)).loraplus_lr_ratio == 16.0

    saved = TrainConfig("lora", "o", base=str(base), loraplus_lr_ratio=16.0)
    assert "--loraplus-lr-ratio" in str(resume_refusal(saved, {"loraplus_lr_ratio": 4.0}, "ckpt"))
    assert resume_refusal(saved, {"loraplus_lr_ratio": 16.0}, "ckpt") is None
