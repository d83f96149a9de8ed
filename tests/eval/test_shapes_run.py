from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

PICTOR = shutil.which("pictor")


def test_eval_shapes_ground_truth_through_cli(tmp_path: Path) -> None:
    assert PICTOR
    out = subprocess.run(
        [PICTOR, "eval", "shapes", "--ground-truth", "-k", "2", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["overall"] >= 0.98
    assert set(report["per_tag"]) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert report["n_images"] == 600
    sheet = Image.open(report["contact_sheet"])
    assert sheet.width > 0 and sheet.height > 0
    assert "overall" in out.stdout


def test_eval_shapes_runs_a_model(tmp_path: Path) -> None:
    from pictor.eval.shapes_run import run_shapes_eval
    from pictor.loading import pipeline_from_preset

    pipe = pipeline_from_preset("tiny", device="cpu")
    report = run_shapes_eval(pipe, None, 2, 5, str(tmp_path / "m.json"), limit=3, steps=1)
    assert report["n_images"] == 6 and report["source"] == "model"
    assert report["model"]["hash"] == pipe.hash
    # seeds are fixed per (prompt, image): the same report twice
    again = run_shapes_eval(pipe, None, 2, 5, None, limit=3, steps=1)
    assert again["per_prompt"] == report["per_prompt"]
    assert (tmp_path / "m.png").is_file()


def test_ground_truth_through_an_autoencoder(tmp_path: Path) -> None:
    """The shipped model's autoencoder keeps the renders scorable; an untrained one destroys them."""
    from pictor.eval.shapes_run import run_shapes_eval
    from pictor.loading import load, pipeline_from_preset

    # every fifth dev prompt (60, all six tags): the whole split takes half a minute twice over
    dev = (Path(__file__).parents[2] / "src/pictor/eval/shapes-dev.jsonl").read_text().splitlines()
    prompts = tmp_path / "dev-fifth.jsonl"
    prompts.write_text("\n".join(dev[::5]) + "\n")
    shipped = load(None, device="cpu")
    report = run_shapes_eval(
        shipped, str(prompts), 1, 0, str(tmp_path / "ae.json"), ground_truth=True, through_autoencoder=True
    )
    assert report["n_images"] == 60 and report["model"]["hash"] == shipped.hash
    assert len(report["per_tag"]) == 6
    assert report["source"] == "ground-truth renders through the model's autoencoder"
    assert report["overall"] >= 0.9, report["per_tag"]
    with pytest.warns(UserWarning, match="UNTRAINED"):
        untrained = pipeline_from_preset("tiny", device="cpu")
    noise = run_shapes_eval(untrained, str(prompts), 1, 0, None, ground_truth=True, through_autoencoder=True)
    assert noise["overall"] <= 0.1, noise["per_tag"]


def test_through_autoencoder_needs_ground_truth(capsys: pytest.CaptureFixture[str]) -> None:
    from pictor.cli import main

    assert main(["eval", "shapes", "--through-autoencoder", "--model", "tiny"]) == 2
    assert "add --ground-truth" in capsys.readouterr().err


def test_save_images_writes_both_sets_for_the_distribution_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--save-images: a model's images keep their provenance (reproducible), renders say what they draw,
    a folder that already holds images is refused, and the two folders feed `pictor eval distribution`."""
    from pictor.cli import main
    from pictor.eval.shapes_run import run_shapes_eval
    from pictor.loading import pipeline_from_preset
    from pictor.provenance import ProvenanceError, read_record, read_text_chunks

    pipe = pipeline_from_preset("tiny", device="cpu")
    run_shapes_eval(pipe, None, 2, 5, None, limit=3, steps=1, save_images=tmp_path / "model")
    made = sorted((tmp_path / "model").glob("*.png"))
    assert [p.name for p in made][:2] == ["0000-single_object-000-0.png", "0000-single_object-000-1.png"]
    assert len(made) == 6
    assert read_record(made[3])["seed"] == 5 + 1 * 2 + 1  # prompt 1, image 1: seed + i * k + j

    report = run_shapes_eval(None, None, 2, 0, None, ground_truth=True, limit=3, save_images=tmp_path / "gt")
    assert report["images"] == str(tmp_path / "gt")
    renders = sorted((tmp_path / "gt").glob("*.png"))
    assert len(renders) == 6
    render = json.loads(read_text_chunks(renders[1])["pictor-render"])
    assert render["rng_seed"] == [0, 0, 1] and render["source"] == "ground-truth renders"
    with pytest.raises(ProvenanceError, match="shapes-world render"):
        read_record(renders[1])
    assert main(["info", str(renders[1])]) == 0
    assert '"rng_seed"' in capsys.readouterr().out

    with pytest.raises(ValueError, match="already holds 6 images"):
        run_shapes_eval(None, None, 1, 0, None, ground_truth=True, limit=1, save_images=tmp_path / "gt")
    (tmp_path / "nested" / "old").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "nested" / "old" / "x.png")  # distribution reads subfolders too
    with pytest.raises(ValueError, match="already holds 1 images"):
        run_shapes_eval(None, None, 1, 0, None, ground_truth=True, limit=1, save_images=tmp_path / "nested")
    args = ["eval", "distribution", str(tmp_path / "gt"), str(tmp_path / "model"), "--kid-subset-size", "6"]
    assert main(args) == 0
    assert "FD " in capsys.readouterr().out
