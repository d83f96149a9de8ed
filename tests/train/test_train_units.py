"""Trainer parts without a training run: config, schedule, EMA, data stream, checkpoint state, logs."""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pictor.checkpoint import CheckpointError
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.data import (
    SampleDraws,
    make_dataset,
    micro_batches,
    rank_indices,
    sample_generator,
    stream_index,
)
from pictor.train.ema import EMA
from pictor.train.logs import read_jsonl, truncate_jsonl
from pictor.train.optim import build_optimizer, lr_at, param_groups
from pictor.train.state import (
    clean_leftovers,
    find_latest,
    list_checkpoints,
    optimizer_from_flat,
    optimizer_to_flat,
    rng_from_flat,
    rng_to_flat,
    write_checkpoint,
)

# -- config ----------------------------------------------------------------------------------------------


def test_resolve_fills_preset_and_stage_defaults() -> None:
    c = TrainConfig(stage="autoencoder", out="x", preset="tiny").resolve()
    assert c.image_size == 32 and c.autoencoder is not None and c.autoencoder["ch"] == 32
    assert c.lr == 2e-4 and c.betas == [0.9, 0.99] and c.ema_decay == 0.999
    t = TrainConfig(stage="t2i", out="x", lr=1e-3).resolve()
    assert t.lr == 1e-3 and t.image_size == 64 and t.model is not None


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"stage": "vae"}, "stage"),
        ({"batch_size": 0}, "batch_size"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"image_size": 30}, "multiple of 4"),
        ({"preset": "nope"}, "unknown preset"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"eval_prompts": 0}, "eval_prompts"),
        ({"eval_images_per_prompt": 0}, "eval_images_per_prompt"),
    ],
)
def test_resolve_rejects_bad_settings(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**{"stage": "t2i", "out": "x", "preset": "tiny", **changes}).resolve()


def test_config_json_round_trip_and_unknown_keys(tmp_path) -> None:
    c = TrainConfig(stage="t2i", out="x", preset="tiny").resolve()
    c.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text(json.dumps({"stage": "t2i", "out": "x", "lr_warmup": 3}))
    with pytest.raises(ConfigError, match="lr_warmup"):
        TrainConfig.from_json(tmp_path / "bad.json")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_flags_override_config_file(tmp_path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny", "lr": 1e-3, "batch_size": 7}))
    args = _parse("t2i", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.json"), "--lr", "5e-4")
    cfg = config_from_args(args)
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.stage) == ("tiny", 5e-4, 7, "t2i")


def test_eval_size_flags() -> None:
    cfg = config_from_args(_parse("t2i", "--out", "o", "--eval-prompts", "48", "--eval-images", "3"))
    assert (cfg.eval_prompts, cfg.eval_images_per_prompt) == (48, 3)


# -- schedule and EMA ------------------------------------------------------------------------------------


def test_lr_warmup_then_constant_or_cosine() -> None:
    c = TrainConfig(stage="t2i", out="x", lr=1.0, warmup_steps=10, max_steps=110).resolve()
    assert [lr_at(s, c) for s in (1, 5, 10, 50, 110)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = TrainConfig(stage="t2i", out="x", lr=1.0, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    cos = cos.resolve()
    assert lr_at(10, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.5)
    assert lr_at(110, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, cos) == pytest.approx(0.5)


def test_ema_follows_the_formula_with_warmup() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    d = min(0.9, 2 / 11)
    assert torch.allclose(ema.module.weight, d * start + (1 - d) * model.weight)
    assert EMA(model, 0.9, warmup=False).decay_at(1) == 0.9


def test_weight_decay_skips_biases_and_gains() -> None:
    groups = param_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0


# -- data stream -----------------------------------------------------------------------------------------


def test_rank_shards_are_disjoint_and_cover_the_global_batch() -> None:
    shards = [rank_indices(40, 3, r, 4) for r in range(4)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(40, 52))


def test_stream_is_a_seeded_permutation_per_epoch() -> None:
    epoch0 = [stream_index(5, k, seed=3) for k in range(5)]
    epoch1 = [stream_index(5, k, seed=3) for k in range(5, 10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(5))
    assert epoch0 == [stream_index(5, k, seed=3) for k in range(5)]
    assert stream_index(None, 123, seed=3) == 123


def test_sample_generators_are_deterministic_and_distinct() -> None:
    a = torch.randn(4, generator=sample_generator(0, 7))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 7)))


def test_micro_batches_resume_at_a_position_and_match_workers() -> None:
    ds = make_dataset("shapes", 16, seed=0)
    full = micro_batches(ds, 0, 0, 2)
    first = [next(full) for _ in range(3)]
    later = next(micro_batches(ds, 0, 4, 2))
    assert later.indices == first[2].indices == [4, 5]
    assert torch.equal(later.images, first[2].images) and later.captions == first[2].captions
    draws = SampleDraws(0, (4, 2, 2), timesteps=True, caption_dropout=0.5)
    inline = next(micro_batches(ds, 0, 4, 2, draws=draws))
    worker = next(micro_batches(ds, 0, 4, 2, num_workers=1, draws=draws))
    assert torch.equal(worker.images, later.images)
    for key in ("noise", "t", "drop"):
        assert torch.equal(worker.draws[key], inline.draws[key])
    assert inline.draws["noise"].shape == (2, 4, 2, 2) and inline.draws["t"].shape == (2,)


def test_sample_draws_are_per_sample_and_follow_the_settings() -> None:
    draws = SampleDraws(5, (3,), timesteps=True, caption_dropout=0.25)
    many = [draws(k) for k in range(2000)]
    assert torch.equal(draws(17)["noise"], many[17]["noise"])
    assert 0.2 < sum(bool(d["drop"]) for d in many) / 2000 < 0.3
    t = torch.cat([d["t"] for d in many])
    assert t.min() > 0 and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.02  # logit-normal(0, 1)
    assert all(bool(SampleDraws(5, (3,), timesteps=True, caption_dropout=1.0)(k)["drop"]) for k in range(20))
    assert set(SampleDraws(5, (3,))(0)) == {"noise"}


def test_folder_data_and_missing_folder(tmp_path) -> None:
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 24), color).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    ds = make_dataset(str(tmp_path), 16, seed=0)
    image, caption, _ = ds[1]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and caption == "caption 1"
    assert tuple(image[8, 8]) == (0, 0, 255)
    with pytest.raises(FileNotFoundError, match="shapes"):
        make_dataset(str(tmp_path / "nope"), 16, seed=0)


# -- checkpoint state ------------------------------------------------------------------------------------


def _trained_pair() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = build_optimizer(model, TrainConfig(stage="t2i", out="x", weight_decay=0.1).resolve())
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_state_round_trips_exactly() -> None:
    model, opt = _trained_pair()
    tensors, groups = optimizer_to_flat(opt, model)
    assert "0.weight.exp_avg" in tensors and "2.bias.step" in tensors
    json.dumps(groups)  # JSON-able hyperparameters
    clone, fresh = _trained_pair()
    clone.load_state_dict(model.state_dict())
    fresh = build_optimizer(clone, TrainConfig(stage="t2i", out="x", weight_decay=0.1).resolve())
    # Copies, as from a file: the flat tensors alias the live state, which the next step updates in place.
    optimizer_from_flat(fresh, clone, {k: v.clone() for k, v in tensors.items()}, groups)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (clone, fresh)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_refuses_another_model() -> None:
    model, opt = _trained_pair()
    tensors, groups = optimizer_to_flat(opt, model)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 1))
    with pytest.raises(CheckpointError, match="parameters"):
        optimizer_from_flat(
            build_optimizer(other, TrainConfig(stage="t2i", out="x").resolve()), other, tensors, groups
        )


def test_rng_states_round_trip() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    tensors, scalars = rng_to_flat()
    json.dumps(scalars)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    rng_from_flat(tensors, scalars)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def _write(tmp_path, step: int, keep: int = 2):  # type: ignore[no-untyped-def]
    model, opt = _trained_pair()

    def weights(folder):  # type: ignore[no-untyped-def]
        folder.mkdir()
        (folder / "w.txt").write_text(str(step))

    state = {"step": step, "data_position": 4 * step}
    flat = optimizer_to_flat(opt, model)
    return write_checkpoint(tmp_path, step, weights, model.state_dict(), flat, state, keep)


def test_checkpoints_keep_the_newest_and_point_latest(tmp_path) -> None:
    for step in (2, 4, 6):
        _write(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-000006"
    assert find_latest(tmp_path) == tmp_path / "checkpoints" / "step-000006"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_write_are_ignored_and_cleaned(tmp_path) -> None:
    _write(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".step-000004.tmp").mkdir()  # killed while writing step 4
    (root / ".step-000004.tmp" / "model.safetensors").write_text("partial")
    (root / "step-000009").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert find_latest(tmp_path) == root / "step-000002"
    clean_leftovers(tmp_path)
    assert not (root / ".step-000004.tmp").exists()


def test_truncate_jsonl_cuts_back_and_drops_torn_lines(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
    )
    truncate_jsonl(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert math.isclose(read_jsonl(path)[2]["loss"], 1 / 3)


def test_lineage_steps_add_up_a_chain_of_warm_starts() -> None:
    from pictor.train.t2i import lineage_steps

    chain = {"step": 3, "init": {"path": "b", "training": {"step": 5, "init": {"training": {"step": 7}}}}}
    assert lineage_steps(chain) == 15
    assert lineage_steps({"step": 7}) == 7 and lineage_steps({}) == 0


def test_a_resume_refuses_tensors_of_another_shape() -> None:
    """load_full_state checks shapes itself: copy_ would broadcast a [D] tensor into [K, D] silently."""
    from pictor.train.distributed import load_full_state

    model = torch.nn.Linear(3, 2)
    state = {"weight": torch.zeros(3), "bias": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"weight is \(3,\), the model's is \(2, 3\)"):
        load_full_state(model, state)
    with pytest.raises(RuntimeError, match="missing"):
        load_full_state(model, {"weight": torch.zeros(2, 3)})
    load_full_state(model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert torch.equal(model.weight.detach(), torch.ones(2, 3))
