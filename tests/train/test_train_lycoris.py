"""`pictor train lora --lora-algo lokr|loha [--dora]`: LyCORIS adapters trained by the LoRA stage on a frozen
(random, tiny) base; the file they write is LyCORIS' (kohya names), read back by pictor's loader and by the
LyCORIS library alike; resume is bit-identical; bad options are refused by name.

The adapters themselves (shapes, init, exactness against LyCORIS) are tested in
tests/models/test_lycoris_train.py; here the stage around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris_from_weights
from PIL import Image

from pictor.checkpoint import (
    CheckpointError,
    load_bundle,
    read_safetensors,
    read_safetensors_metadata,
    save_bundle,
)
from pictor.lora_files import apply_lora
from pictor.models.flux import Flux, FluxParams, make_img_ids, make_txt_ids, pack_latents
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import ConfigError, TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import train

from tiny_bundle import tiny_models

SIZE = 16
TOL = 1e-5
COMMON = {"preset": "tiny", "image_size": SIZE, "sample_every": 0, "eval_every": 0, "progress": False}
# --lora-algo / --dora as TrainConfig fields
KINDS: dict[str, dict[str, Any]] = {
    "lokr": {"lora_algo": "lokr", "lokr_factor": 4},
    "loha": {"lora_algo": "loha"},
    "lora+dora": {"lora_algo": "lora", "lora_dora": True},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny base bundle (every weight nonzero) and eight captioned 16x16 pictures."""
    root = tmp_path_factory.mktemp("lycoris-world")
    cfg, flux, ae = tiny_models("tiny-base")
    save_bundle(root / "base", cfg, flux.state_dict(), ae.state_dict())
    folder = root / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img = np.full((SIZE, SIZE, 3), 40, np.uint8)
        x, y = rng.integers(2, 8, size=2)
        img[y : y + 7, x : x + 7] = (255, 0, 255)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a magenta square")
    return {"base": root / "base", "data": folder}


def config(world: dict[str, Path], out: Path, kind: str, **changes: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "stage": "lora",
        "out": str(out),
        "base": str(world["base"]),
        "data": str(world["data"]),
        "lora_rank": 2,
        "lora_alpha": 1.0,
        "lora_targets": "all",
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 0,
        "save_every": 2,
        **COMMON,
        **KINDS[kind],
    }
    return TrainConfig(**{**settings, **changes})


def base_flux(world: dict[str, Path]) -> Flux:
    bundle = load_bundle(world["base"])
    flux = Flux(FluxParams.from_dict(dict(bundle.config.model)))
    flux.load_state_dict(bundle.transformer)
    return flux.eval()


def flux_inputs(flux: Flux) -> dict[str, torch.Tensor]:
    p, gen = flux.params, torch.Generator().manual_seed(1)
    latents = torch.randn(2, p.in_channels // 4, 4, 4, generator=gen)
    return {
        "img": pack_latents(latents),
        "img_ids": make_img_ids(2, 4, 4),
        "txt": torch.randn(2, 3, p.context_in_dim, generator=gen),
        "txt_ids": make_txt_ids(2, 3),
        "timesteps": torch.tensor([0.3, 0.8]),
        "y": torch.randn(2, p.vec_in_dim, generator=gen),
    }


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_and_its_file_reads_back_in_pictor_and_lycoris(
    kind: str, world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With EMA and a sample grid on (the EMA adapters swapped into the base): the adapters move from their
    start, the file names its algorithm, and pictor's loader and LyCORIS' give the same transformer output,
    one that differs from the base's."""
    result = train(config(world, tmp_path / "run", kind, ema_decay=0.5, sample_every=4))
    assert (tmp_path / "run" / "samples" / "step-000004.png").is_file()
    final = read_safetensors(result.final)
    first = read_safetensors(tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors")
    assert set(final) == set(first) and all(k.startswith("lora_unet_") for k in final)
    zeroed = ("lokr_w2", "lokr_w2_b", "hada_w2_a", "lora_up.weight")
    assert all(final[k].abs().max() > 0 for k in final if k.endswith(zeroed))  # trained away from zero
    assert all(final[k].dtype == torch.float32 for k in final)
    meta = read_safetensors_metadata(result.final)
    assert meta["lora_algo"] == kind and meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["pictor_training"])["algo"] == KINDS[kind]["lora_algo"]
    if kind == "lokr":
        assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "4"}
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 4 and all(np.isfinite(losses))

    x = flux_inputs(base_flux(world))
    plain = base_flux(world)
    ours = base_flux(world)
    apply_lora(ours, result.final)
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    theirs = base_flux(world)
    net, _ = create_lycoris_from_weights(1.0, str(result.final), theirs)
    assert len(net.loras) == len({k.split(".")[0] for k in final})
    net.apply_to()
    with torch.no_grad():
        a, b, c = plain(**x), ours(**x), theirs(**x)
    assert (b - a).abs().max() > 1e-3
    assert (b - c).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_falls(kind: str, world: dict[str, Path], tmp_path: Path) -> None:
    """Each kind fits the one repeated picture: the last steps' loss well below the first steps' (seen:
    1.33 -> 0.65 LoKr, 1.28 -> 0.55 LoHa, 1.25 -> 0.68 LoRA+DoRA)."""
    train(config(world, tmp_path / "run", kind, max_steps=40, save_every=0, lr=3e-2, lora_rank=4))
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


@pytest.mark.parametrize("kind", ["loha", "lora+dora"])
def test_resume_continues_bit_identically(kind: str, world: dict[str, Path], tmp_path: Path) -> None:
    """LoKr, LoHa and DoRA share one adapter class, file writer and EMA path; LoHa and LoRA+DoRA (whose
    magnitudes are trained too) cover them. Losses and final tensors equal bit for bit."""
    whole = train(config(world, tmp_path / "whole", kind, max_steps=6, save_every=3))
    train(config(world, tmp_path / "split", kind, max_steps=3, save_every=3))
    resumed = train(config(world, tmp_path / "split", kind, max_steps=6, save_every=3), resume=True)
    assert resumed.resumed_from == 3
    a = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "log.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "split" / "log.jsonl")]
    assert len(a) == 6 and a == b
    x, y = read_safetensors(whole.final), read_safetensors(resumed.final)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    other = {"lora_algo": "lokr"} if kind == "loha" else {"lora_dora": False}
    with pytest.raises(
        CheckpointError, match=r"other settings \(lora_(algo 'loha' -> 'lokr'|dora True -> False)\)"
    ):
        train(config(world, tmp_path / "split", kind, max_steps=8, **other), resume=True)
    # alpha is a buffer in a LyCORIS file: loading the checkpoint would silently put the old one back
    with pytest.raises(CheckpointError, match=r"other settings \(lora_alpha 1.0 -> 2.0\)"):
        train(config(world, tmp_path / "split", kind, max_steps=8, lora_alpha=2.0), resume=True)
    # the command line says so before anything runs (and before warning of a changed loss curve)
    line = f"train lora --base {world['base']} --data {world['data']} --out {tmp_path / 'split'} --resume"
    with pytest.raises(ConfigError, match=r"other settings \(lora_alpha 1.0 -> 2.0\)"):
        _parse(f"{line} --alpha 2")
    with pytest.raises(ConfigError, match=r"other settings \(lora_rank 2 -> 3\)"):
        _parse(f"{line} --rank 3")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_an_fp8_base_trains_a_dora_lokr(precision: str, world: dict[str, Path], tmp_path: Path) -> None:
    """DoRA reads the base weight (FP8 here, widened) for its norm; the run and its file work, also under
    bf16 autocast on the CPU."""
    cfg = config(world, tmp_path / "fp8", "lokr", lora_dora=True, fp8_base=True, mixed_precision=precision)
    result = train(dataclasses.replace(cfg, max_steps=2))
    losses = [r["loss"] for r in read_jsonl(tmp_path / "fp8" / "log.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(k.endswith(".dora_scale") for k in read_safetensors(result.final))


def _parse(line: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(line.split()))


def test_cli_flags_reach_the_config_and_bad_ones_are_named(world: dict[str, Path]) -> None:
    cfg = _parse("train lora --base B --data D --out O --lora-algo lokr --lokr-factor 8 --dora --rank 4")
    assert (cfg.lora_algo, cfg.lokr_factor, cfg.lora_dora, cfg.lora_rank) == ("lokr", 8, True, 4)
    plain = _parse("train lora --base B --data D --out O")
    assert (plain.lora_algo, plain.lokr_factor, plain.lora_dora) == ("lora", -1, False)
    bad = {
        "--lora-algo locon": r"lora_algo \(--lora-algo\) must be one of lora, lokr, loha, got 'locon'",
        "--lora-algo lokr --lokr-factor 0": r"must be -1 \(as balanced as possible\) or >= 1, got 0",
        "--lora-algo loha --lokr-factor 4": "--lokr-factor applies to --lora-algo lokr, not loha",
        "--lora-algo lokr --lora-dropout 0.1": "--lora-dropout applies to a plain LoRA",
        "--dora --lora-dropout 0.1": "--lora-dropout applies to a plain LoRA",
    }
    line = f"train lora --base {world['base']} --data {world['data']} --out O"
    _parse(f"{line} --lora-algo loha --dora").resolve()  # every algorithm takes --dora
    for flags, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            _parse(f"{line} {flags}").resolve()


def test_torchrun_two_ranks_train_what_one_process_trains(world: dict[str, Path], tmp_path: Path) -> None:
    """DDP over the frozen base carrying a DoRA LoKr (its magnitudes and alpha buffers included): two ranks of
    batch 2 log the losses of one process of batch 4 and write the same file."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    flags = f"--base {world['base']} --data {world['data']} --rank 2 --alpha 1 --targets all --lora-algo lokr"
    flags += " --dora --max-steps 3 --lr 1e-2 --warmup-steps 0 --save-every 0 --sample-every 0 --eval-every 0"
    flags += f" --image-size {SIZE} --no-progress --device cpu"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "ddp": [*torchrun, "-m", "pictor.cli", "train", "lora", *flags.split(), "--batch-size", "2"],
        "one": [sys.executable, "-m", "pictor.cli", "train", "lora", *flags.split(), "--batch-size", "4"],
    }
    for name, command in runs.items():
        proc = subprocess.run(
            [*command, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    a, b = (read_jsonl(tmp_path / name / "log.jsonl") for name in runs)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    x, y = (read_safetensors(tmp_path / name / "lora.safetensors") for name in runs)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)
