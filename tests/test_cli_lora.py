"""LoRAs through the console script: --lora applied, recorded like A1111's "Lora hashes", honoured by
reproduce; `pictor lora extract | convert | resize`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pictor.checkpoint import save_bundle
from pictor.loading import pipeline_from_preset
from pictor.lora_files import save_lora
from pictor.models.lora import add_lora, linear_layers
from pictor.provenance import read_record, read_text_chunks

from tiny_bundle import tiny_models

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


def test_generate_says_which_keys_of_a_lora_it_left_out(tmp_path: Path) -> None:
    """The CLI hides other libraries' UserWarnings but shows pictor's: a kohya-style file's text-encoder
    keys are left out with a warning on the terminal, as the README says."""
    from safetensors.torch import load_file

    lora = tmp_path / "style.safetensors"
    _make_lora(lora)
    sd = load_file(lora)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(8, 2)
    save_file(sd, tmp_path / "with_te.safetensors")
    common = ("--model", "tiny", "--seed", "3", "--steps", "1", "--size", "32x32")
    run = _run("generate", "a red circle", *common, "--lora", "with_te.safetensors", "-o", "te", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "pictor generate: warning: text-encoder keys not applied (2): lora_te1_text_model" in run.stderr


def _bundles(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny base bundle and a "fine-tuned" copy whose linear layers moved by rank-2 changes."""
    config, flux, ae = tiny_models(trained=True)
    base_sd = {k: v.clone() for k, v in flux.state_dict().items()}
    tuned_sd = dict(base_sd)
    gen = torch.Generator().manual_seed(4)
    for key in sorted(base_sd)[::3]:
        w = base_sd[key]
        if key.endswith(".weight") and w.ndim == 2:
            tuned_sd[key] = w + 0.3 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(
                2, w.shape[1], generator=gen
            )
    save_bundle(tmp_path / "base", config, base_sd, ae.state_dict())
    save_bundle(tmp_path / "tuned", config, tuned_sd, ae.state_dict())
    return tmp_path / "base", tmp_path / "tuned"


def test_lora_extract_convert_resize(tmp_path: Path) -> None:
    """`pictor lora extract` turns the base into the tuned model: images through the base plus the LoRA
    are the tuned model's images; convert keeps them; resize says what a lower rank loses."""
    base, tuned = _bundles(tmp_path)
    out = _run(
        "lora",
        "extract",
        "--base",
        str(base),
        "--tuned",
        str(tuned),
        "--rank",
        "2",
        "--out",
        "x.safetensors",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["x.safetensors"]
    assert "rank 2; energy kept: mean 1.0000" in out.stderr

    common = ("a red circle", "--seed", "3", "--steps", "2", "--size", "32x32")
    want = _run("generate", *common, "--model", str(tuned), "-o", "tuned", cwd=tmp_path)
    got = _run(
        "generate", *common, "--model", str(base), "--lora", "x.safetensors", "-o", "lora", cwd=tmp_path
    )
    plain = _run("generate", *common, "--model", str(base), "-o", "base", cwd=tmp_path)
    assert want.returncode == got.returncode == plain.returncode == 0, got.stderr

    def pixels(run: subprocess.CompletedProcess[str]) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / run.stdout.split()[0])).astype(int)

    assert np.abs(pixels(got) - pixels(want)).max() <= 1  # float rounding of W + BA vs W'
    assert np.abs(pixels(plain) - pixels(want)).max() > 10

    conv = _run(
        "lora",
        "convert",
        "x.safetensors",
        "--model",
        str(base),
        "--format",
        "kohya",
        "--out",
        "k.safetensors",
        cwd=tmp_path,
    )
    assert conv.returncode == 0, conv.stderr
    kohya = _run(
        "generate", *common, "--model", str(base), "--lora", "k.safetensors", "-o", "kohya", cwd=tmp_path
    )
    assert kohya.returncode == 0 and np.array_equal(pixels(kohya), pixels(got)), kohya.stderr

    cut = _run(
        "lora",
        "resize",
        "k.safetensors",
        "--model",
        str(base),
        "--rank",
        "1",
        "--out",
        "r.safetensors",
        cwd=tmp_path,
    )
    assert cut.returncode == 0, cut.stderr
    assert "rank 1; energy kept: mean 0." in cut.stderr


def test_lora_tool_errors_are_one_clear_line(tmp_path: Path) -> None:
    base, _ = _bundles(tmp_path)
    cases = [
        (
            ("extract", "--base", "tiny", "--tuned", str(base), "--rank", "2", "--out", "x.safetensors"),
            "is a preset",
        ),
        (
            (
                "extract",
                "--base",
                str(base),
                "--tuned",
                str(base),
                "--rank",
                "2",
                "--energy",
                "2",
                "--out",
                "x.safetensors",
            ),
            "energy must be a fraction",
        ),
        (
            ("extract", "--base", str(base), "--tuned", str(base), "--rank", "2", "--out", "x.safetensors"),
            "nothing to write",
        ),
        (
            ("convert", "missing.safetensors", "--model", "tiny", "--out", "y.safetensors"),
            "missing.safetensors",
        ),
        (("resize", "x.pt", "--rank", "1", "--out", "y.safetensors"), "pickle"),
        # the output is checked before two models are read and their SVDs run
        (
            ("extract", "--base", "nowhere", "--tuned", "nowhere", "--rank", "2", "--out", "x.pt"),
            "x.pt: LoRA files",
        ),
        (
            ("extract", "--base", "nowhere", "--tuned", "nowhere", "--rank", "0", "--out", "x.safetensors"),
            "rank must",
        ),
    ]
    for args, message in cases:
        out = _run("lora", *args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (
            args,
            out.stderr,
        )
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_info_shows_what_a_lora_file_holds(tmp_path: Path) -> None:
    """`pictor info FILE.safetensors` on a LoRA: its layout, layers, ranks, hashes and header; a weight file
    that is no LoRA is one clear line."""
    lora = tmp_path / "style.safetensors"
    _make_lora(lora)  # every linear layer of the tiny preset
    layers = len(linear_layers(pipeline_from_preset("tiny", device="cpu").transformer))
    conv = _run(
        "lora",
        "convert",
        str(lora),
        "--model",
        "tiny",
        "--format",
        "kohya",
        "--out",
        "k.safetensors",
        cwd=tmp_path,
    )
    assert conv.returncode == 0, conv.stderr
    for path, layout in ((lora, "pictor"), (tmp_path / "k.safetensors", "kohya")):
        out = _run("info", str(path), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert (info["kind"], info["layout"], info["ranks"], info["text_encoder_layers"]) == (
            "LoRA",
            layout,
            [4],
            0,
        )
        assert info["layers"] == layers and len(info["sha256"]) == 64 and len(info["a1111_hash"]) == 12
        assert info["metadata"]["ss_network_dim"] == "4"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"))
    bad = _run("info", "weights.safetensors", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a LoRA weight" in bad.stderr and "Traceback" not in bad.stderr
