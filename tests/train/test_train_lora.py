"""`pictor train lora`: a LoRA teaches a frozen base model a concept it has never seen; adapter-only
outputs; bit-identical resume; the base is checked on resume.

The world (16x16 images, tiny preset): the base model is trained on "a blue square" / "a green disk".
The new concept is "a zorblax": a magenta ring. An exact detector finds it in every training image and
in none of the base's training images; the test compares its rate in images generated for
"a zorblax" on the same seeds, without and with the LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import (
    CheckpointError,
    load_bundle,
    read_safetensors,
    read_safetensors_metadata,
    save_bundle,
)
from pictor.loading import load
from pictor.lora_files import apply_lora
from pictor.models.lora import remove_lora
from pictor.models.weight_storage import FP8_STORAGE, STORED_PREFIXES, _NarrowWeightLinear
from pictor.pipeline import GenerationRequest
from pictor.train.command import config_from_args
from pictor.train.command_flags import add_train_parser
from pictor.train.config import TrainConfig
from pictor.train.logs import read_jsonl
from pictor.train.loop import train

SIZE = 16
BACKGROUND = (40, 40, 40)
MAGENTA = (255, 0, 255)
COMMON = {"preset": "tiny", "image_size": SIZE, "sample_every": 0, "eval_every": 0, "progress": False}
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE] + 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One thread, from before the module's base model is trained: tiny models gain nothing from two,
    and on a busy machine two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the world --------------------------------------------------------------------------------------------


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    cx, cy = SIZE / 2 + rng.uniform(-1.5, 1.5, size=2)
    d = np.hypot(_XX - cx, _YY - cy)
    if kind == "zorblax":
        img[(d > 3.2) & (d < 6.5)] = MAGENTA
    elif kind == "disk":
        img[d < 5.0] = (40, 200, 60)
    else:
        img[(abs(_XX - cx) < 4.5) & (abs(_YY - cy) < 4.5)] = (40, 80, 230)
    return img


def _folder(root: Path, items: list[tuple[np.ndarray, str]]) -> Path:
    root.mkdir(parents=True)
    for i, (img, caption) in enumerate(items):
        Image.fromarray(img).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(caption)
    return root


def is_magenta(img: np.ndarray) -> np.ndarray:
    a = img.astype(int)
    return (a[..., 0] - a[..., 1] > 80) & (a[..., 2] - a[..., 1] > 80)


def is_zorblax(img: np.ndarray) -> bool:
    """A magenta ring: enough magenta, a hole at its centre of mass, and a mostly magenta annulus."""
    m = is_magenta(img)
    if m.mean() < 0.15:
        return False
    ys, xs = np.nonzero(m)
    d = np.hypot(_YY - ys.mean(), _XX - xs.mean())
    return bool(m[d < 2].mean() < 0.5 and m[(d > 4) & (d < 6)].mean() > 0.6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Image folders, and a base bundle: an autoencoder run and a t2i run on squares and disks only."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    zorblax = [(_image("zorblax", rng), "a zorblax") for _ in range(16)]
    other = [
        (_image(k, rng), f"a {'green disk' if k == 'disk' else 'blue square'}")
        for k in ["disk", "square"] * 8
    ]
    folders = {
        "zorblax": _folder(root / "zorblax", zorblax),
        "other": _folder(root / "other", other),
        # The autoencoder, like FLUX's, is a shared part that can draw every colour; the transformer is
        # what has never seen a zorblax.
        "ae_data": _folder(root / "ae_data", zorblax + other),
    }
    ae = train(
        TrainConfig(
            stage="autoencoder",
            out=str(root / "ae"),
            data=str(folders["ae_data"]),
            max_steps=100,
            batch_size=4,
            lr=4e-3,
            warmup_steps=5,
            save_every=0,
            **COMMON,
        )
    )
    base = train(
        TrainConfig(
            stage="t2i",
            out=str(root / "base"),
            data=str(folders["other"]),
            autoencoder_path=str(ae.out),
            max_steps=60,
            batch_size=8,
            lr=2e-3,
            warmup_steps=5,
            latent_stats_images=16,
            save_every=0,
            **COMMON,
        )
    )
    return {**folders, "base": base.final, "root": root}


def _rate(pipe, prompt: str, n: int = 16) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    images = [
        np.asarray(g.image) for g in pipe.generate(GenerationRequest(prompt, seed=0, num_images=n, steps=12))
    ]
    return float(np.mean([is_zorblax(a) for a in images])), float(
        np.mean([is_magenta(a).mean() for a in images])
    )


# -- the tests --------------------------------------------------------------------------------------------


def test_a_lora_teaches_the_base_a_new_concept(world: dict[str, Path], tmp_path: Path) -> None:
    # The detector is exact on the data: every zorblax, and nothing the base was trained on.
    for path in sorted(world["zorblax"].glob("*.png")):
        assert is_zorblax(np.asarray(Image.open(path)))
    for path in sorted(world["other"].glob("*.png")):
        image = np.asarray(Image.open(path))
        assert not is_zorblax(image) and not is_magenta(image).any()

    out = tmp_path / "lora"
    base_files = {p.name: p.stat().st_mtime_ns for p in world["base"].iterdir()}
    # 300 steps of rank 8 on every linear layer, lr 2e-2 decaying to 0 (cosine).
    settings = "--rank 8 --targets all --max-steps 300 --lr 2e-2 --lr-schedule cosine --warmup-steps 5"
    settings += f" --batch-size 8 --image-size {SIZE} --save-every 150 --sample-every 300 --eval-every 0"
    flags = ["--base", str(world["base"]), "--data", str(world["zorblax"]), "--out", str(out)]
    flags += [*settings.split(), "--no-progress", "--device", "cpu"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pictor.cli", "train", "lora", *flags], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = out / "lora.safetensors"
    assert proc.stdout.strip().splitlines()[-1] == str(adapter)

    # Adapter-only outputs; the base is untouched.
    assert {p.name: p.stat().st_mtime_ns for p in world["base"].iterdir()} == base_files
    assert sorted(p.name for p in (out / "final").iterdir()) == ["lora.safetensors"]
    checkpoint = out / "checkpoints" / "step-000300"
    assert not (checkpoint / "transformer.safetensors").exists()
    assert set(read_safetensors(checkpoint / "model.safetensors")) == set(read_safetensors(adapter))
    assert (out / "samples" / "step-000300.png").is_file()
    meta = read_safetensors_metadata(adapter)
    assert meta["lora_rank"] == "8" and float(meta["lora_alpha"]) == 8.0 and meta["lora_targets"] == "all"
    assert json.loads(meta["pictor_training"])["step"] == 300
    losses = [r["loss"] for r in read_jsonl(out / "log.jsonl")]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])

    # Same pipeline, same seeds, without and with the LoRA.
    pipe = load(world["base"], device="cpu")
    base_rate, base_magenta = _rate(pipe, "a zorblax")
    apply_lora(pipe.transformer, adapter)
    lora_rate, lora_magenta = _rate(pipe, "a zorblax")
    remove_lora(pipe.transformer)
    assert _rate(pipe, "a zorblax") == (base_rate, base_magenta)  # removing it restores the base
    print(
        f"\nzorblax rate: base {base_rate:.3f} (magenta {base_magenta:.3f}) -> LoRA {lora_rate:.3f} "
        f"(magenta {lora_magenta:.3f}); `pictor train lora` 300 steps: {seconds:.1f} s"
    )
    assert base_rate <= 0.1
    assert lora_rate >= 0.6 and lora_rate - base_rate >= 0.5


def _lora_config(world: dict[str, Path], out: Path, **changes: object) -> TrainConfig:
    settings: dict = {
        "stage": "lora",
        "out": str(out),
        "base": str(world["base"]),
        "data": str(world["zorblax"]),
        "lora_rank": 4,
        "lora_alpha": 2.0,
        "lora_dropout": 0.1,  # dropout draws from the RNG: resume must restore it too
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 2,
        "save_every": 3,
        **COMMON,
    }
    return TrainConfig(**{**settings, **changes})  # type: ignore[arg-type]


def test_resume_continues_bit_identically(world: dict[str, Path], tmp_path: Path) -> None:
    whole = train(_lora_config(world, tmp_path / "whole"))
    train(_lora_config(world, tmp_path / "split", max_steps=3))
    resumed = train(_lora_config(world, tmp_path / "split"), resume=True)
    assert resumed.resumed_from == 3
    assert [r["loss"] for r in read_jsonl(tmp_path / "whole" / "log.jsonl")] == [
        r["loss"] for r in read_jsonl(tmp_path / "split" / "log.jsonl")
    ]
    a, b = read_safetensors(whole.final), read_safetensors(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(read_safetensors_metadata(resumed.final)["lora_alpha"]) == 2.0


def test_resume_refuses_another_base(world: dict[str, Path], tmp_path: Path) -> None:
    train(_lora_config(world, tmp_path / "run", max_steps=1, save_every=1))
    bundle = load_bundle(world["base"])
    changed = {k: v + 1e-3 if k == "img_in.bias" else v for k, v in bundle.transformer.items()}
    other = tmp_path / "other-base"
    save_bundle(other, bundle.config, changed, bundle.autoencoder)
    with pytest.raises(CheckpointError, match="resume with the same base"):
        train(_lora_config(world, tmp_path / "run", base=str(other), max_steps=2), resume=True)


def test_an_fp16_base_trains_like_the_fp32_one(world: dict[str, Path], tmp_path: Path) -> None:
    """On the CPU the base computes in float32 whatever it stores: its fp16 copy gives nearly its losses."""
    half = cast_bundle(world["base"], tmp_path / "half", "fp16")
    train(_lora_config(world, tmp_path / "full", max_steps=2))
    fp16 = train(_lora_config(world, tmp_path / "fp16", base=str(half), max_steps=2))
    a = [r["loss"] for r in read_jsonl(tmp_path / "full" / "log.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "fp16" / "log.jsonl")]
    assert len(a) == len(b) == 2 and a != b  # a different base (its weights rounded) ...
    assert all(abs(x - y) <= 0.02 * x for x, y in zip(a, b, strict=True)), (a, b)  # ... of the same model
    adapters = read_safetensors(fp16.final)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())


@pytest.mark.parametrize("fp8", [False, True])
def test_bf16_autocast_on_the_cpu_trains_a_lora_alike(
    world: dict[str, Path], tmp_path: Path, fp8: bool
) -> None:
    """--mixed-precision bf16 on the CPU: the matmuls in bf16 (fp16 or FP8 base), float32 adapters."""
    half = cast_bundle(world["base"], tmp_path / "half", "fp16")
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        cfg = _lora_config(world, out, base=str(half), max_steps=2, fp8_base=fp8, mixed_precision=precision)
        runs[precision] = (train(cfg), [r["loss"] for r in read_jsonl(out / "log.jsonl")])
    (_, wide), (narrow_run, narrow) = runs["no"], runs["bf16"]
    assert len(narrow) == 2 and narrow != wide
    assert narrow == pytest.approx(wide, rel=0.05)
    assert all(t.dtype == torch.float32 for t in read_safetensors(narrow_run.final).values())


def test_gradient_checkpointing_trains_the_same_lora(world: dict[str, Path], tmp_path: Path) -> None:
    """Recomputing the blocks in the backward pass (dropout masks included) changes memory, not results."""
    with mock.patch("pictor.models.flux.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as spy:
        plain = train(_lora_config(world, tmp_path / "plain", max_steps=3))
        assert spy.call_count == 0
        recomputed = train(_lora_config(world, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True))
        assert spy.call_count >= 3 * 2  # every step, every block (the tiny base has 1 + 1)
    a = [r["loss"] for r in read_jsonl(tmp_path / "plain" / "log.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "ckpt" / "log.jsonl")]
    assert len(a) == 3 and a == b
    x, y = read_safetensors(plain.final), read_safetensors(recomputed.final)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7) for k in x)


def test_an_fp8_base_trains_like_its_rounded_copy(world: dict[str, Path], tmp_path: Path) -> None:
    """--fp8-base keeps the base's block weights FP8 (widened per layer, forward and backward): the same
    losses as the float32 base with those weights rounded to FP8; an FP8 bundle as base is the same run."""
    bundle = load_bundle(world["base"])
    rounded = {
        k: v.to(FP8_STORAGE).float() if k.startswith(STORED_PREFIXES) and v.ndim == 2 else v
        for k, v in bundle.transformer.items()
    }
    save_bundle(tmp_path / "rounded", bundle.config, rounded, bundle.autoencoder)
    fp8_bundle = cast_bundle(world["base"], tmp_path / "fp8-bundle", "fp8")
    runs = {
        "rounded": _lora_config(world, tmp_path / "r", base=str(tmp_path / "rounded"), max_steps=3),
        "fp8_base": _lora_config(world, tmp_path / "f", max_steps=3, fp8_base=True),
        "fp8_bundle": _lora_config(world, tmp_path / "b", base=str(fp8_bundle), max_steps=3),
    }
    original = _NarrowWeightLinear.apply
    with mock.patch.object(_NarrowWeightLinear, "apply", side_effect=original) as narrow:
        losses = {}
        for name, cfg in runs.items():
            before = narrow.call_count
            train(cfg)
            losses[name] = [r["loss"] for r in read_jsonl(Path(cfg.out) / "log.jsonl")]
            assert (narrow.call_count > before) == (name != "rounded")  # FP8 weights only where asked
    assert losses["fp8_base"] == losses["fp8_bundle"]
    assert losses["rounded"][0] == losses["fp8_base"][0]
    assert all(abs(a - b) <= 1e-6 * a for a, b in zip(losses["rounded"], losses["fp8_base"], strict=True))
    with pytest.raises(ValueError, match="--fp8-base is for lora"):
        TrainConfig(stage="t2i", out="O", fp8_base=True).resolve()


def test_a_quantized_base_trains_like_its_dequantized_copy(world: dict[str, Path], tmp_path: Path) -> None:
    """A GGML-quantized base (`convert dtype --dtype q4_0`, or a GGUF import) trains a LoRA with its layers
    kept in blocks, dequantized per layer forward and backward: the losses of the widened copy."""
    quantized = cast_bundle(world["base"], tmp_path / "q4", "q4_0")
    widened = cast_bundle(quantized, tmp_path / "wide", "fp32")
    runs = {
        "quantized": _lora_config(world, tmp_path / "q", base=str(quantized), max_steps=3),
        "widened": _lora_config(world, tmp_path / "w", base=str(widened), max_steps=3),
    }
    original = _NarrowWeightLinear.apply
    with mock.patch.object(_NarrowWeightLinear, "apply", side_effect=original) as narrow:
        losses = {}
        for name, cfg in runs.items():
            before = narrow.call_count
            train(cfg)
            losses[name] = [r["loss"] for r in read_jsonl(Path(cfg.out) / "log.jsonl")]
            assert (narrow.call_count > before) == (name == "quantized")
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(losses["widened"], losses["quantized"], strict=True))


def test_cli_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    line = (
        "train lora --base B --data D --out O --rank 4 --alpha 2 --targets attn,*.img_mlp.0 --lora-dropout .1"
        " --gradient-checkpointing --fp8-base"
    )
    args = parser.parse_args(line.split())
    cfg = config_from_args(args)
    assert (cfg.stage, cfg.base, cfg.out) == ("lora", "B", "O")
    assert cfg.data == str(Path("D").resolve())  # stored whole: a resume from elsewhere reads the same folder
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout) == (
        4,
        2.0,
        "attn,*.img_mlp.0",
        0.1,
    )
    assert cfg.gradient_checkpointing and cfg.fp8_base
    with pytest.raises(ValueError, match="--base"):
        TrainConfig(stage="lora", out="O").resolve()
