"""`pictor convert defaults`: a bundle's generation defaults, shown or set in config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pictor.bundle_defaults import set_defaults
from pictor.checkpoint import CheckpointError, load_bundle, read_bundle_config, save_bundle
from pictor.cli import main
from pictor.loading import load
from pictor.pipeline import GenerationRequest

from tiny_bundle import tiny_models


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    cfg, flux, ae = tiny_models(training={"stage": "t2i", "step": 7})
    save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    return tmp_path / "b"


def test_set_defaults_changes_what_generation_uses_and_nothing_else(bundle: Path) -> None:
    raw_before = json.loads((bundle / "config.json").read_text())
    weights = {p.name: p.read_bytes() for p in bundle.glob("*.safetensors")}
    before, after = set_defaults(bundle, steps=7, sampler="heun", guidance=None)
    assert (before["steps"], before["sampler"]) == (4, "euler")
    assert (after["steps"], after["sampler"], after["guidance"]) == (7, "heun", before["guidance"])
    raw_after = json.loads((bundle / "config.json").read_text())
    assert raw_after == {**raw_before, "defaults": after}  # training record, hashes, ... kept
    assert {p.name: p.read_bytes() for p in bundle.glob("*.safetensors")} == weights
    load_bundle(bundle, verify=True)  # the hashes still match the weights
    r = load(bundle, device="cpu").resolve_request(GenerationRequest("a red circle", seed=0))
    assert (r.steps, r.sampler) == (7, "heun")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"sampler": "ddim"}, "unknown sampler 'ddim'"),
        ({"schedule": "ddim_uniform"}, "unknown schedule 'ddim_uniform'"),
        ({"width": 30}, "multiple of 4"),
        ({"steps": 0}, "steps must be between 1 and"),
        ({"steps": 5000}, "steps must be between 1 and 1000"),  # no default that every request refuses
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"guidance": float("nan")}, "cannot store this default: guidance must be a finite number"),
        ({"seed": 3}, "cannot set default"),
    ],
)
def test_bad_defaults_are_refused_and_nothing_is_written(bundle: Path, changes: dict, words: str) -> None:
    text = (bundle / "config.json").read_text()
    with pytest.raises(CheckpointError, match=words):
        set_defaults(bundle, **changes)
    assert (bundle / "config.json").read_text() == text


def test_cli_shows_and_sets(bundle: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["convert", "defaults", str(bundle)]) == 0
    assert "steps          4\n" in capsys.readouterr().out
    assert main(["convert", "defaults", str(bundle), "--steps", "9", "--schedule", "linear"]) == 0
    out = capsys.readouterr().out
    assert "steps          4 -> 9" in out and "schedule       flux -> linear" in out
    assert read_bundle_config(bundle).defaults["steps"] == 9
    assert main(["convert", "defaults", str(tmp_path / "nothing")]) == 2
    assert "not a model bundle" in capsys.readouterr().err
