"""Input found by probing the CLI: each once gave a black image with exit status 0, a traceback, a bare
KeyError text, lost data, or a silently different run. Each must now be a clear error, or a clear note."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.checkpoint import CheckpointError, save_bundle
from pictor.cli import main
from pictor.eval.shapes import load_prompts
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.loading import load, pipeline_from_preset
from pictor.lora_files import apply_lora
from pictor.models.lora_formats import LoRAError
from pictor.provenance import ProvenanceError
from pictor.reproduce import check_record
from pictor.train.config import ConfigError, TrainConfig

from tiny_bundle import tiny_models

TINY = ["--model", "tiny", "--steps", "2", "--size", "32x32"]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with warnings.catch_warnings():
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--guidance", "nan"], "guidance must be a finite number >= 0, got nan"),
        (["--guidance", "inf"], "guidance must be a finite number >= 0, got inf"),
        (["--size", "17000x17000"], "the most pictor makes is 16,777,216"),
        (["--layout", '{"box": [0, 0, 1, 1], "phrase": "a"}'], "give a non-empty list of boxes"),
        (["--model", "evil.ckpt"], "pictor never unpickles"),
    ],
)
def test_generate_refuses_what_would_make_black_images_or_tracebacks(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    words: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04pickle")
    code, err = cli(capsys, "generate", "a red circle", *TINY, *args, "-o", "out")
    assert code == 2 and words in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_os_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    code, err = cli(capsys, "generate", "a red circle", *TINY, "-o", str(taken))
    assert code == 2 and f"-o {taken}: this is a file; give a folder" in err  # found before sampling
    code, err = cli(capsys, "generate", "a red circle", *TINY, "-o", str(taken / "sub"))
    assert code == 1 and "pictor generate: error:" in err and "Traceback" not in err  # the OS says why
    assert str(taken) in err


def test_expand_of_nothing_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "src.png"
    Image.new("RGB", (32, 32)).save(source)
    code, err = cli(capsys, "edit", str(source), "x", *TINY[:4], "--expand", "0,0,0,0")
    assert code == 2 and "expand 0,0,0,0 adds nothing" in err


def test_lora_scales_and_weights_must_be_finite() -> None:
    _, flux, _ = tiny_models()
    broken = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.full((2, 64), math.nan)}
    with pytest.raises(LoRAError, match="holds NaN or infinite values"):
        apply_lora(flux, broken)
    with pytest.raises(LoRAError, match="scale must be a finite number"):
        apply_lora(flux, broken, scale=math.inf)


def test_a_non_finite_result_is_an_error_not_a_black_image() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipeline_from_preset("tiny", device="cpu")
    with torch.no_grad():
        next(pipe.transformer.final_layer.parameters()).fill_(math.nan)
    with pytest.raises(GenerationError, match="NaN or infinite values"):
        pipe.generate(GenerationRequest("a red circle", steps=2, seed=0))


def test_an_unusable_stored_default_is_named_at_load(tmp_path: Path) -> None:
    cfg, flux, ae = tiny_models()
    cfg.defaults = {**cfg.defaults, "sampler": "bogus"}
    save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    with pytest.raises(CheckpointError, match=r"a stored default is unusable .*unknown sampler 'bogus'"):
        load(str(tmp_path / "b"), device="cpu")


def _record(**changes: Any) -> dict[str, Any]:
    base = {"prompt": "x", "steps": 2, "guidance": 4.0, "sampler": "euler", "seed": 2, "width": 32,
            "height": 32, "model": {"name": "m", "hash": "h"}, "batch_seeds": [1, 2],
            "batch_index": 1}  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ([1, 2, 3], "not a JSON object"),
        ({k: v for k, v in _record().items() if k != "model"}, "has no 'model'"),
        ({k: v for k, v in _record().items() if k != "seed"}, "has no 'seed'"),
        (_record(steps="20"), "'steps' is '20', not an integer"),
        (_record(model=None), "'model' is None"),
        (_record(batch_seeds=[]), "'batch_seeds' is [], not a list of seeds"),
        (_record(batch_index=5), "batch_index 5 is not a place in its batch_seeds (2 seeds)"),
        (_record(loras=["garbage"]), "'loras' is ['garbage']"),
        (_record(reference_adapter="x"), "'reference_adapter' is 'x', not an object"),
        (_record(seed=1), "seed 1 is not its batch_seeds' entry for this image (2)"),
        (_record(model={"name": "m", "hash": 5}), "'model' is {'name': 'm', 'hash': 5}, not an object"),
        (
            _record(mode="bogus", strength=1.0, source_image={"sha256": "s"}),
            "'mode' is 'bogus', not one of img2img, inpaint, outpaint",
        ),
        (_record(mode="inpaint", strength=1.0, source_image=None), "'source_image' is None"),
    ],
)
def test_damaged_records_name_the_field(record: Any, words: str) -> None:
    with pytest.raises(ProvenanceError) as err:
        check_record(record)
    assert words in str(err.value)
    check_record(_record())  # the undamaged one passes


def test_reproduce_says_whether_the_pixels_match(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _ = cli(capsys, "generate", "a red circle", *TINY, "--seed", "5", "-o", str(tmp_path / "a"))
    assert code == 0
    image = next((tmp_path / "a").iterdir())
    code, err = cli(capsys, "reproduce", str(image), "-o", str(tmp_path / "b"))
    assert code == 0 and f"the pixels are identical to {image}'s" in err
    code, err = cli(capsys, "reproduce", str(image), "--source", str(image), "-o", str(tmp_path / "c"))
    assert code == 2 and "not an edit of another image; drop --source" in err


def _with(line: str, **changes: object) -> list[str]:
    """One spec line with fields replaced (objects given twice so that a relation has two indices)."""
    spec = json.loads(line)
    spec["objects"] = spec["objects"] * 2 if "objects" not in changes else changes.pop("objects")
    return [json.dumps({**spec, **changes})]


def test_prompt_files_are_checked_line_by_line(tmp_path: Path) -> None:
    good = json.dumps(load_prompts()[0])
    for lines, words in (
        ([], "no prompts in it"),
        ([good, "{not json"], "line 2: not valid JSON"),
        ([good, "[1, 2]"], "line 2: a spec is a JSON object"),
        ([good.replace('"count": 1', '"count": -1')], "count must be an integer from 1 to 4"),
        ([json.dumps({**json.loads(good), "relation": "left of"})], "relation must be null or {a, b, rel}"),
        ([json.dumps({**json.loads(good), "prompt": 5})], "prompt must be a string"),
        (_with(good, relation={"a": 0, "b": 1.0, "rel": "left of"}), "relation must be null or {a, b, rel}"),
        (_with(good, relation={"a": 0, "b": 0, "rel": "left of"}), "a and b must be two different objects"),
        (_with(good, objects=[{"shape": "circle", "color": "red", "count": 4}] * 2), "this spec asks for 8"),
    ):
        path = tmp_path / "p.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=r"p\.jsonl"):
            load_prompts(path)
        with pytest.raises(ValueError) as err:
            load_prompts(path)
        assert words in str(err.value), (lines, err.value)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_prompts(tmp_path / "bin.jsonl")
    # A byte-order mark and line separators inside JSON strings (valid JSON) are read, not refused.
    spec = {**json.loads(good), "prompt": "a red\u2028circle\x85"}
    (tmp_path / "odd.jsonl").write_text(
        "\ufeff" + json.dumps(spec, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert load_prompts(tmp_path / "odd.jsonl") == [spec]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-k", "0"], "--images-per-prompt must be between 1 and 10000, got 0"),
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--seed", str(2**63 - 2), "--limit", "2", "-k", "2"], "--seed must be between 0 and"),
        (["--out", "r.png"], "the JSON report; its contact sheet is the .png beside it"),
        (["--out", "."], "a folder; give the report's file"),
        (["--save-images", "imgs", "--out", "imgs/r.json"], "is inside --save-images imgs"),
        (["--steps", "3", "--sampler", "heun"], "--sampler, --steps: these change a model's images"),
        (["--model", "tiny"], "--model: --ground-truth scores renders of the specs, no model's images"),
    ],
)
def test_eval_arguments_are_checked_before_any_work(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    words: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "eval", "shapes", "--ground-truth", *args)
    assert code == 2 and words in err, err
    assert not (tmp_path / "imgs").exists()  # refused before anything was written


def test_eval_limit_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(capsys, "eval", "shapes", "--ground-truth", "--limit", "-1")
    assert code == 2 and "--limit must be >= 1" in err


def test_training_config_values_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lr is 'fast', not a number or null"):
        TrainConfig.from_dict({"stage": "t2i", "out": "x", "lr": "fast"})
    with pytest.raises(ConfigError, match=r"max_steps is 1\.5, not an integer"):
        TrainConfig.from_dict({"stage": "t2i", "out": "x", "max_steps": 1.5})
    with pytest.raises(ConfigError, match="compile is 1, not true or false"):
        TrainConfig.from_dict({"stage": "t2i", "out": "x", "compile": 1})
    assert TrainConfig.from_dict({"stage": "t2i", "out": "x", "lr": 1, "betas": [0.9, 0.99]}).lr == 1
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig.from_json(tmp_path)
    bad = (({"seed": -1}, "seed must be >= 0"), ({"image_size": 0}, "image_size must be > 0"))
    for settings, words in bad:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(stage="autoencoder", out="x", preset="tiny", **settings).resolve()


def test_skipped_training_images_are_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / "good.png")
    (data / "good.txt").write_text("noise")
    (data / "bad.png").write_bytes(b"not an image")
    args = ["train", "autoencoder", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run")]
    args += ["--max-steps", "1", "--batch-size", "1", "--no-progress", "--device", "cpu"]
    code, err = cli(capsys, *args, "--sample-every", "0", "--eval-every", "0")
    assert code == 0, err
    assert "pictor train: warning: 1 images skipped in" in err and "bad.png: unreadable" in err


def test_info_names_an_image_whose_metadata_is_damaged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("pictor", "{not json")
    path = tmp_path / "damaged.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=meta)
    code, err = cli(capsys, "info", str(path))
    assert code == 2 and f"{path}: its 'pictor' metadata is not valid JSON" in err
