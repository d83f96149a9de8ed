"""`--validation-split`: a seeded part of a folder held out of training, and the flow loss on it at fixed
timesteps and noise reported at every eval."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.data.folder import DatasetWarning
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import (
    Batch,
    SampleDraws,
    make_dataset,
    micro_batches,
    sample_generator,
    to_tensor,
    validation_items,
)
from pictor.train.distributed import DistInfo
from pictor.train.holdout_split import STREAM_VALIDATION, split_indices
from pictor.train.layout import LayoutStage
from pictor.train.logs import read_jsonl
from pictor.train.loop import train
from pictor.train.lora import LoRAStage
from pictor.train.reference import ReferenceStage
from pictor.train.validation import VALIDATION_TIMESTEPS, validation_loss

from broken_images import undecodable_png

SIZE = 16
COMMON = {
    "image_size": SIZE,
    "sample_every": 0,
    "progress": False,
    "warmup_steps": 0,
    "batch_size": 2,
    "lr": 1e-2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    for i in range(8):
        w, h = (32, 16) if i % 2 else (16, 32)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}")
    return root


def test_the_split_is_seeded_and_leaves_something_on_each_side() -> None:
    train_a, val_a = split_indices(10, 0.2, seed=0)
    _, val_b = split_indices(10, 0.2, seed=0)
    assert val_a.tolist() == val_b.tolist() and len(val_a) == 2
    assert sorted([*train_a.tolist(), *val_a.tolist()]) == list(range(10))
    assert len(split_indices(10, 0.01, seed=0)[1]) == 1  # at least one held out
    assert len(split_indices(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_indices(1, 0.5, seed=0)


@pytest.mark.parametrize("buckets", [False, True])
def test_the_training_stream_never_shows_a_held_out_image(folder: Path, buckets: bool) -> None:
    ds = make_dataset(str(folder), SIZE, 0, buckets=buckets, multiple=4, validation_split=0.25)
    held = set(validation_items(ds).tolist())
    assert len(held) == 2
    seen: set[str] = set()
    batches = micro_batches(ds, 0, 0, 2, draws=SampleDraws(0, (4, 8, 8), timesteps=True, latent_factor=2))
    for _ in range(24):  # 8 epochs of the 6 training images
        seen |= set(next(batches).captions)
    assert seen == {f"picture {i}" for i in range(8) if i not in held}


def test_the_validation_loss_is_the_documented_mean(base: Path, folder: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        stage="lora",
        out=str(tmp_path / "r"),
        base=str(base),
        data=str(folder),
        validation_split=0.25,
        **COMMON,
    ).resolve()  # type: ignore[arg-type]
    ds = make_dataset(str(folder), SIZE, 0, validation_split=0.25)
    stage = LoRAStage(cfg, ds, DistInfo(0, 1, 0, torch.device("cpu")))
    held = validation_items(ds)
    got = validation_loss(stage, stage.flux, ds, held)
    losses = []
    for index in held.tolist():  # one sample at a time, by the module docstring's definition
        image, caption, _ = ds[index]
        for j, t in enumerate(VALIDATION_TIMESTEPS):
            g = sample_generator(0, index * 16 + j, STREAM_VALIDATION)
            noise = torch.randn((4, SIZE // 2, SIZE // 2), generator=g)[None]
            draws = {"drop": torch.zeros(1, dtype=torch.bool), "t": torch.tensor([t]), "noise": noise}
            with torch.no_grad():
                loss, _ = stage.loss(stage.flux, Batch(to_tensor([image]), [caption], [index], draws))
            losses.append(float(loss))
    assert got["val_images"] == 2
    assert got["val_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_a_run_reports_it_at_each_eval_and_resumes_to_the_same_numbers(
    base: Path, folder: Path, tmp_path: Path
) -> None:
    def run(out: Path, steps: int, resume: bool = False) -> list[dict]:
        cfg = TrainConfig(
            stage="lora",
            out=str(out),
            base=str(base),
            data=str(folder),
            validation_split=0.25,
            max_steps=steps,
            eval_every=2,
            save_every=2,
            **COMMON,  # type: ignore[arg-type]
        )
        train(cfg, resume=resume)
        return read_jsonl(out / "eval.jsonl")

    whole = run(tmp_path / "whole", 4)
    assert [e["step"] for e in whole] == [2, 4] and all(e["val_images"] == 2 for e in whole)
    assert whole[0]["val_loss"] != whole[1]["val_loss"]  # the model moved
    run(tmp_path / "parts", 2)
    assert run(tmp_path / "parts", 4, resume=True) == whole


def test_a_validation_split_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    for settings, words in (
        ({"stage": "t2i", "data": "shapes"}, "--validation-split: for image folders"),
        ({"stage": "autoencoder", "data": str(tmp_path)}, "layout, reference and controlnet stages"),
        ({"stage": "t2i", "data": str(tmp_path), "validation_split": 1.0}, "must lie in"),
    ):
        # resolved settings, so that validate() reaches the split (a layout stage would resolve a base)
        config = {"validation_split": 0.1, "lr": 1e-4, "ema_decay": 0.0, "betas": [0.9, 0.99], **settings}
        with pytest.raises(ConfigError, match=words):
            TrainConfig(out=str(tmp_path / "r"), preset="tiny", **config).validate()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def boxed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pictures with captions and boxes in metadata.jsonl: data for the layout and reference stages."""
    root = tmp_path_factory.mktemp("boxed")
    rng = np.random.default_rng(4)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
        box = [0.0, 0.0, 0.5, 1.0] if i % 2 else [0.5, 0.0, 1.0, 1.0]
        layout = [{"box": box, "phrase": f"thing {i}"}]
        lines.append({"file_name": f"{i}.png", "text": f"picture {i}", "layout": layout})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return root


@pytest.mark.parametrize("stage_name", ["layout", "reference"])
def test_an_adapter_stage_is_measured_with_its_ema_adapter_and_conditions(
    base: Path, boxed_folder: Path, tmp_path: Path, stage_name: str
) -> None:
    """The adapter stages' validation loss runs the base with the EMA adapter on each held-out image's
    own layout or reference picture: the documented mean, computed here by hand, and a different adapter
    gives a different number. The live adapter is left as it was."""
    cfg = TrainConfig(
        stage=stage_name,
        out=str(tmp_path / "r"),
        base=str(base),
        data=str(boxed_folder),
        validation_split=0.25,
        **COMMON,
    ).resolve()  # type: ignore[arg-type]
    ds = make_dataset(str(boxed_folder), SIZE, 0, validation_split=0.25)
    kind = LayoutStage if stage_name == "layout" else ReferenceStage
    stage = kind(cfg, ds, DistInfo(0, 1, 0, torch.device("cpu")))
    live = [p.detach().clone() for p in stage.module.parameters()]
    ema = copy.deepcopy(stage.module)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    got = stage.evaluate(ema)
    assert got is not None and got["val_images"] == 2
    assert all(torch.equal(a, b) for a, b in zip(live, stage.module.parameters(), strict=True))
    assert stage.evaluate(stage.module)["val_loss"] != pytest.approx(got["val_loss"], rel=1e-4)
    with torch.no_grad():
        for p, e in zip(stage.module.parameters(), ema.parameters(), strict=True):
            p.copy_(e)
    stage.forward_module.eval()
    losses = []
    for index in validation_items(stage.ds).tolist():  # one sample at a time, with its own conditions
        image, caption, meta = stage.ds[index]
        reference = meta.get("reference")
        refs = (to_tensor([reference[0]]), [reference[1]]) if reference is not None else (None, None)
        assert (reference is not None) == (stage_name == "reference") and meta["layout"] is not None
        for j, t in enumerate(VALIDATION_TIMESTEPS):
            g = sample_generator(0, index * 16 + j, STREAM_VALIDATION)
            noise = torch.randn((4, SIZE // 2, SIZE // 2), generator=g)[None]
            draws = {"drop": torch.zeros(1, dtype=torch.bool), "t": torch.tensor([t]), "noise": noise}
            batch = Batch(to_tensor([image]), [caption], [index], draws, [meta["layout"]], *refs)
            with torch.no_grad():
                loss, parts = stage.loss(stage.forward_module, batch)
            if stage_name == "reference":  # its adapter's own loss is part of training's, not of val_loss
                assert float(parts["aux_loss"]) > 0.01 * float(loss)
            losses.append(float(parts.get("flow_loss", loss)))
    assert got["val_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_a_broken_training_image_never_brings_a_held_out_one_into_training(tmp_path: Path) -> None:
    """An undecodable file takes a stand-in from its own side of the split, not the next image of its
    bucket when that one is held out."""
    _, held = split_indices(10, 0.2, seed=0)
    broken = next(t for t in range(10) if (t + 1) % 10 in held and t not in held)
    rng = np.random.default_rng(5)
    for i in range(10):
        if i == broken:
            undecodable_png(tmp_path / f"{i}.png", size=SIZE)
        else:
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    ds = make_dataset(str(tmp_path), SIZE, 0, validation_split=0.2)
    assert validation_items(ds).tolist() == held.tolist()
    seen: set[str] = set()
    batches = micro_batches(ds, 0, 0, 2, draws=SampleDraws(0, (4, 8, 8), timesteps=True))
    with pytest.warns(DatasetWarning, match=f"{broken}.png"):
        for _ in range(16):  # 4 epochs of the 8 training images
            seen |= set(next(batches).captions)
    assert seen == {f"picture {i}" for i in range(10) if i not in held and i != broken}
