"""--lora through the console script: applied, recorded like A1111's "Lora hashes", honoured by reproduce."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pictor.loading import pipeline_from_preset
from pictor.lora_files import save_lora
from pictor.models.lora import add_lora
from pictor.provenance import read_record, read_text_chunks

PICTOR = shutil.which("pictor")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PICTOR
    return subprocess.run([PICTOR, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _make_lora(path: Path) -> None:
    pipe = pipeline_from_preset("tiny", device="cpu")
    tree = add_lora(pipe.transformer, name="style", targets="all", rank=4)
    with torch.no_grad():
        for name, p in tree.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_lora(pipe.transformer, path, adapter="style")


def test_generate_with_lora_records_and_reproduces(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    _make_lora(lora)
    common = ("--model", "tiny", "--seed", "3", "--steps", "2", "--size", "32x32")
    base = _run("generate", "a red circle", *common, "-o", "base", cwd=tmp_path)
    styled = _run("generate", "a red circle", *common, "--lora", f"{lora}:0.8", "-o", "lora", cwd=tmp_path)
    assert base.returncode == 0 and styled.returncode == 0, styled.stderr
    base_png, lora_png = tmp_path / base.stdout.split()[0], tmp_path / styled.stdout.split()[0]
    a = np.asarray(Image.open(base_png)).astype(int)
    b = np.asarray(Image.open(lora_png)).astype(int)
    assert np.abs(a - b).max() > 0  # the LoRA changes the image

    record = read_record(lora_png)
    (entry,) = record["loras"]
    assert entry["scale"] == 0.8 and entry["name"] == "style" and len(entry["sha256"]) == 64
    assert f'Lora hashes: "style: {entry["hash"][:12]}"' in read_text_chunks(lora_png)["parameters"]

    again = _run("reproduce", str(lora_png), "-o", "repro", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / again.stdout.split()[0])).astype(int), b)

    wrong = _run("reproduce", str(lora_png), "--lora", f"{lora}:0.5", "-o", "x", cwd=tmp_path)
    assert wrong.returncode == 2 and "pass the same files and scales" in wrong.stderr
