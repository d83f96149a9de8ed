"""Best-of-N reranking and the shapes scorer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pictor.data.shapes import Scene, ShapeObject, render
from pictor.loading import pipeline_from_preset
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.rerank import SCORERS, generate_best_of, get_scorer, prompt_pairs, shapes_scorer


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return pipeline_from_preset("tiny", device="cpu")


@pytest.mark.parametrize(
    ("prompt", "pairs"),
    [
        ("a red circle left of a blue square", {("red", "circle"), ("blue", "square")}),
        ("two stars, both red", {("red", "star")}),
        ("a red circle, a blue star", {("red", "circle"), ("blue", "star")}),
        ("a circle colored red and a blue star", {("red", "circle"), ("blue", "star")}),
        ("a photo of a orange square", {("orange", "square")}),
        ("three green triangles above a black circle", {("green", "triangle"), ("black", "circle")}),
        ("a cat on a mat", set()),
    ],
)
def test_prompt_pairs(prompt: str, pairs: set) -> None:
    assert prompt_pairs(prompt) == pairs


def test_shapes_scorer_counts_named_objects() -> None:
    scene = Scene(
        [ShapeObject("circle", "red", 0.3, 0.5, 0.3), ShapeObject("square", "blue", 0.72, 0.5, 0.3)],
        (255, 255, 255),
    )
    image = Image.fromarray(render(scene, 64))
    assert shapes_scorer(image, "a red circle left of a blue square") == 2.0
    assert shapes_scorer(image, "a red circle") == 1.0
    assert shapes_scorer(image, "a blue circle and a red square") == 0.0  # right words, wrong pairs
    assert SCORERS["shapes"] is shapes_scorer


def test_best_of_sorts_by_score_and_keeps_the_images(pipe: Pipeline) -> None:
    def brightness(image: Image.Image, prompt: str) -> float:
        assert prompt == "a red circle"
        return float(np.asarray(image).mean())

    request = GenerationRequest("a red circle", seed=20, steps=2)
    ranked = generate_best_of(pipe, request, 4, brightness)
    scores = [g.record["best_of"]["score"] for g in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert [g.record["best_of"]["rank"] for g in ranked] == [1, 2, 3, 4]
    assert sorted(g.seed for g in ranked) == [20, 21, 22, 23]
    assert all(
        g.record["best_of"]["n"] == 4 and g.record["best_of"]["scorer"] == "brightness" for g in ranked
    )
    plain = {g.seed: np.asarray(g.image) for g in pipe.generate(replace(request, num_images=4))}
    for g in ranked:
        np.testing.assert_array_equal(np.asarray(g.image), plain[g.seed])
        assert g.record["best_of"]["score"] == brightness(g.image, "a red circle")


def test_best_of_errors(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match=r"unknown scorer 'clip'.*shapes"):
        get_scorer("clip")
    with pytest.raises(GenerationError, match="n >= 1"):
        generate_best_of(pipe, GenerationRequest("x"), 0)
