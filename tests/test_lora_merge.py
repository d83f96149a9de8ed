"""`pictor lora merge`: LoRAs merged into a bundle's weights draw what the base with the same LoRAs draws."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pictor.bundle_storage import cast_bundle
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    TRANSFORMER_FILE,
    CheckpointError,
    read_safetensors,
    save_bundle,
)
from pictor.cli import main
from pictor.loading import load
from pictor.lora_files import lora_file_hash, save_lora
from pictor.lora_merge import merge_loras
from pictor.lora_tools import model_linears, read_lora, write_lora
from pictor.models.lora import add_lora
from pictor.models.lora_formats import LoRAError
from pictor.pipeline import GenerationRequest, Pipeline

from tiny_bundle import tiny_models

REQUEST = GenerationRequest("a red circle", steps=3, seed=5, width=32, height=32)


def _bundle(path: Path, adapter: bool = False) -> Path:
    cfg, flux, ae = tiny_models(description="random weights for a test", training={"stage": "t2i", "step": 7})
    save_bundle(path, cfg, flux.state_dict(), ae.state_dict())
    if adapter:
        (path / "layout.safetensors").write_bytes(b"adapter bytes")  # copied along, not read
    return path


def _lora(path: Path, seed: int, targets: str = "all", rank: int = 3) -> Path:
    _, flux, _ = tiny_models()
    torch.manual_seed(seed)
    add_lora(flux, "style", targets=targets, rank=rank, alpha=2.0)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + len(name)))
    save_lora(flux, path, "style")
    return path


def _pixels(pipe: Pipeline) -> np.ndarray:
    (result,) = pipe.generate(REQUEST)
    return np.asarray(result.image).astype(int)


def test_merged_bundle_draws_what_the_base_with_its_loras_draws(tmp_path: Path) -> None:
    base = _bundle(tmp_path / "base")
    one = _lora(tmp_path / "one.safetensors", 1)
    two = tmp_path / "two-kohya.safetensors"  # kohya's layout, with alpha: read like any other file
    write_lora(
        read_lora(_lora(tmp_path / "t.safetensors", 2, "attn", 2), model_linears(base))[0], two, "kohya"
    )
    out, left_out = merge_loras(base, [(one, 0.8), (two, -0.5)], tmp_path / "merged")
    assert left_out == []

    with_loras = load(base, device="cpu")
    plain = _pixels(with_loras)
    with_loras.add_lora(one, 0.8)
    with_loras.add_lora(two, -0.5)
    merged = load(out, device="cpu")
    assert merged.loras == []
    want, got = _pixels(with_loras), _pixels(merged)
    assert np.abs(want - plain).max() > 10  # the LoRAs change the picture
    assert np.abs(got - want).max() <= 1  # merged or applied: the same picture, up to one 8-bit level

    # The merged weight is W + sum of scale * alpha / rank * B @ A, from the files' own tensors.
    layer = "double_blocks.0.img_attn.qkv"
    a = load_file(one)
    delta = (2.0 / 3) * a[f"{layer}.lora_B.weight"].double() @ a[f"{layer}.lora_A.weight"].double()
    t = read_lora(two, model_linears(base))[0][layer]
    delta2 = (t.alpha / t.rank) * t.B.double() @ t.A.double()
    w = read_safetensors(base / TRANSFORMER_FILE)[f"{layer}.weight"].double()
    expected = (w + 0.8 * delta - 0.5 * delta2).float()
    assert torch.equal(read_safetensors(out / TRANSFORMER_FILE)[f"{layer}.weight"], expected)
    untouched = "double_blocks.0.img_attn.norm.query_norm.scale"  # no LoRA on it: the base's bits
    assert torch.equal(
        read_safetensors(out / TRANSFORMER_FILE)[untouched],
        read_safetensors(base / TRANSFORMER_FILE)[untouched],
    )

    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "tiny-random+one+two-kohya"
    assert config["training"]["stage"] == "lora-merge"
    assert config["training"]["base_training"] == {"stage": "t2i", "step": 7}
    assert [(e["name"], e["scale"], e["sha256"]) for e in config["training"]["loras"]] == [
        ("one", 0.8, lora_file_hash(one)),
        ("two-kohya", -0.5, lora_file_hash(two)),
    ]
    assert config["model"] == json.loads((base / "config.json").read_text())["model"]
    assert (out / AUTOENCODER_FILE).read_bytes() == (base / AUTOENCODER_FILE).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp8_bundles_and_broken_loras_are_refused_with_the_reason(tmp_path: Path) -> None:
    """FP8 would round most of a LoRA's changes back to the weights they started from: refused, pointing to
    the wide bundle or to --lora. A LoRA holding NaN is named as broken, whatever the model's dtype."""
    base = _bundle(tmp_path / "base")
    fp8 = cast_bundle(base, tmp_path / "fp8", "fp8")
    lora = _lora(tmp_path / "l.safetensors", 3, "attn")
    with pytest.raises(CheckpointError, match=r"stored in FP8.*bf16/fp16 bundle it came from.*--lora"):
        merge_loras(fp8, [(lora, 1.0)], tmp_path / "merged")
    broken = tmp_path / "nan.safetensors"
    tensors = load_file(lora)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken)
    with pytest.raises(
        LoRAError, match=r"nan.safetensors: .* holds NaN or infinite values; the file is broken"
    ):
        merge_loras(base, [(broken, 1.0)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bad_merges_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    base = _bundle(tmp_path / "base")
    lora = _lora(tmp_path / "l.safetensors", 1)
    other = tmp_path / "other.safetensors"  # a LoRA for a wider model: its shapes fit no layer here
    save_file(
        {k: torch.zeros(3, 64) if "lora_A" in k else torch.zeros(64, 3) for k in load_file(lora)}, other
    )
    out = tmp_path / "merged"
    with pytest.raises(LoRAError):
        merge_loras(base, [(other, 1.0)], out)
    with pytest.raises(CheckpointError, match="preset"):
        merge_loras("tiny", [(lora, 1.0)], out)
    with pytest.raises(LoRAError, match="finite"):
        merge_loras(base, [(lora, math.nan)], out)
    with pytest.raises(LoRAError, match="at least one"):
        merge_loras(base, [], out)
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match="not a model bundle"):
        merge_loras(base, [(lora, 1.0)], tmp_path / "notes")
    fp16 = cast_bundle(base, tmp_path / "fp16", "fp16")
    with pytest.raises(CheckpointError, match=r"overflows float16.*bf16"):
        merge_loras(fp16, [(lora, 1e9)], out)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_merges_and_explains_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _bundle(tmp_path / "base", adapter=True)
    lora = _lora(tmp_path / "l.safetensors", 1)
    out = tmp_path / "m"
    assert main(["lora", "merge", "--model", str(base), "--lora", f"{lora}:0.5", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["training"]["loras"][0]["scale"] == 0.5
    assert (out / "layout.safetensors").read_bytes() == b"adapter bytes"  # the bundle's adapters go along
    assert main(["lora", "merge", "--model", "tiny", "--lora", str(lora), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "preset" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:  # a scale that is no number is said so, not "no such file"
        main(["lora", "merge", "--model", str(base), "--lora", f"{lora}:abc", "--out", str(tmp_path / "y")])
    assert exc.value.code == 2
    assert "the scale after ':' must be a number, got 'abc'" in capsys.readouterr().err
