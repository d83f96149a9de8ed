"""`pictor eval shapes --layouts`: layouts of the ground-truth scenes, the box-hit scorer, and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pictor.eval.shapes import box_hits, ground_truth_images, ground_truth_layouts, load_prompts
from pictor.eval.shapes_run import run_shapes_eval
from pictor.layout_files import layout_params_for, save_layout_adapter
from pictor.loading import pipeline_from_preset
from pictor.models.layout import LayoutAdapter
from pictor.provenance import read_record

PICTOR = shutil.which("pictor")
pytestmark = pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")


def test_renders_hold_every_box_of_their_own_layouts_and_not_of_mirrored_ones() -> None:
    specs = load_prompts()[::10]  # 30 prompts, every tag
    images = ground_truth_images(specs, 2, seed=4)
    layouts = ground_truth_layouts(specs, 2, seed=4)
    own = [
        hit
        for row, lays in zip(images, layouts, strict=True)
        for im, lay in zip(row, lays, strict=True)
        for hit in box_hits(im, lay)
    ]
    assert len(own) > 60 and all(own)
    mirrored = [
        [
            {
                "box": [1 - b["box"][2], 1 - b["box"][3], 1 - b["box"][0], 1 - b["box"][1]],
                "phrase": b["phrase"],
            }
            for b in lay
        ]
        for lays in layouts
        for lay in lays
    ]
    flat = [im for row in images for im in row]
    moved = [hit for im, lay in zip(flat, mirrored, strict=True) for hit in box_hits(im, lay)]
    assert np.mean(moved) < 0.3


def test_box_hits_need_the_phrases_colour_and_shape() -> None:
    specs = [s for s in load_prompts() if s["tag"] == "single_object"][:1]
    (image,), ((layout,),) = ground_truth_images(specs, 1, 0)[0], ground_truth_layouts(specs, 1, 0)
    (box,) = layout
    color, shape = box["phrase"].split()[1:]
    other_color = "green" if color != "green" else "red"
    other_shape = "square" if shape != "square" else "circle"
    assert box_hits(image, [box]) == [True]
    assert box_hits(image, [{**box, "phrase": f"a {other_color} {shape}"}]) == [False]
    assert box_hits(image, [{**box, "phrase": f"one {color} {other_shape}"}]) == [False]


def test_eval_with_layouts_reports_boxes_and_records_each_layout(tmp_path: Path) -> None:
    pipe = pipeline_from_preset("tiny", device="cpu")
    with pytest.raises(ValueError, match="no layout adapter"):
        run_shapes_eval(pipe, None, 1, 0, None, layouts=True, limit=2)
    params = layout_params_for(pipe.transformer.params, pipe.text_encoder.pooled_dim)
    torch.manual_seed(0)
    save_layout_adapter(LayoutAdapter(params).init_weights(), params, tmp_path / "l.safetensors", {})
    pipe.set_layout_adapter(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="drop --ground-truth"):
        run_shapes_eval(pipe, None, 1, 0, None, layouts=True, ground_truth=True)
    report = run_shapes_eval(
        pipe,
        None,
        2,
        3,
        str(tmp_path / "r.json"),
        layouts=True,
        limit=3,
        steps=2,
        save_images=tmp_path / "imgs",
    )
    assert report["layout"]["boxes"] == 6 and 0.0 <= report["layout"]["box_accuracy"] <= 1.0
    assert report["layout"]["adapter"]["sha256"] == pipe.layout_info["sha256"]  # type: ignore[index]
    want = ground_truth_layouts(load_prompts()[:3], 2, 3)
    saved = sorted((tmp_path / "imgs").glob("*.png"))
    assert [read_record(p)["layout"] for p in saved] == [lay for row in want for lay in row]
    assert [read_record(p)["seed"] for p in saved] == [3, 4, 5, 6, 7, 8]  # the seeds of a plain eval
    assert json.loads((tmp_path / "r.json").read_text())["layout"]["boxes"] == 6


def test_cli_eval_layouts_needs_an_adapter(tmp_path: Path) -> None:
    assert PICTOR
    out = subprocess.run(
        [PICTOR, "eval", "shapes", "--model", "tiny", "--layouts", "--limit", "1", "-k", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "no layout adapter" in out.stderr
