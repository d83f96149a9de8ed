from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pictor.provenance import (
    ProvenanceError,
    parameters_text,
    parse_parameters,
    read_record,
    read_text_chunks,
    save_png,
)


def _record(**over: object) -> dict:
    rec = {
        "pictor_version": "0.1.0",
        "model": {
            "name": "shapes",
            "hash": "0123456789abcdef" * 4,
            "preset": "shapes-small",
            "trained": True,
        },
        "prompt": "a red circle, left of a blue square",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 48,
        "steps": 20,
        "guidance": 4.0,
        "guidance_mode": "cfg",
        "sampler": "dpmpp_2m",
        "schedule": "flux",
        "seed": 1234,
        "batch_seeds": [1234],
        "batch_index": 0,
        "batch_size": 1,
        "loras": [],
    }
    rec.update(over)
    return rec


def test_parameters_text_is_a1111_format() -> None:
    text = parameters_text(_record())
    assert text == (
        "a red circle, left of a blue square\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: flux, CFG scale: 4, Seed: 1234, Size: 64x48, "
        "Model hash: 0123456789, Model: shapes, Version: pictor 0.1.0"
    )


def test_no_negative_line_when_empty_and_distilled_guidance() -> None:
    text = parameters_text(_record(negative_prompt="", guidance_mode="distilled", guidance=3.5))
    assert "Negative prompt" not in text
    assert "CFG scale: 1, Distilled CFG Scale: 3.5" in text


def test_png_round_trip_unicode(tmp_path: Path) -> None:
    rec = _record(prompt="un cercle rouge — «très» 赤い円")
    path = save_png(Image.new("RGB", (8, 8), (1, 2, 3)), rec, tmp_path / "a.png")
    assert read_record(path) == rec
    parsed = parse_parameters(read_text_chunks(path)["parameters"])
    assert parsed["prompt"] == rec["prompt"]
    assert parsed["negative_prompt"] == "blurry"
    assert parsed["settings"]["Seed"] == "1234"
    assert parsed["settings"]["Sampler"] == "DPM++ 2M"
    assert not list(tmp_path.glob(".*.tmp"))


def test_quoted_values_parse_back() -> None:
    rec = _record(loras=[{"name": "style, v2", "hash": "abcdef0123456789", "scale": 0.8}])
    parsed = parse_parameters(parameters_text(rec))
    assert parsed["settings"]["Lora hashes"] == "style, v2: abcdef012345"
    assert parsed["settings"]["Model"] == "shapes"


def test_reference_and_context_pictures_are_named_by_hash() -> None:
    """A1111 has no fields for them, but a reader should see that the image needs a picture, and which."""
    rec = _record(
        reference_image={"sha256": "ab" * 32, "width": 64, "height": 64},
        context_image={"sha256": "cd" * 32, "width": 1024, "height": 1024},
    )
    settings = parse_parameters(parameters_text(rec))["settings"]
    assert settings["Reference image hash"] == "ab" * 6
    assert settings["Context image hash"] == "cd" * 6
    assert "image hash" not in parameters_text(_record())


def test_third_party_reader_sd_parsers(tmp_path: Path) -> None:
    from sd_parsers import ParserManager

    path = save_png(Image.new("RGB", (8, 8)), _record(), tmp_path / "b.png")
    info = ParserManager().parse(str(path))
    assert info is not None
    assert info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["steps"] == "20"
    assert sampler.model is not None and sampler.model.hash == "0123456789"
    assert [p.value for p in sampler.prompts] == ["a red circle, left of a blue square"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]


def test_missing_record_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ProvenanceError, match="no pictor record"):
        read_record(path)
    with pytest.raises(ProvenanceError, match="no such file"):
        read_record(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ProvenanceError, match="not a readable image"):
        read_record(bad)
    json.dumps(_record())  # the record is plain JSON
