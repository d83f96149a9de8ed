"""Generation and edits with the first-block cache (`cache_threshold`) on the trained default model: it skips
passes, stays close to the full run, is recorded, reproduces bit for bit, and bad thresholds are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import pictor
import pictor.models.block_cache as block_cache
from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record, read_text_chunks, save_png
from pictor.reproduce import reproduce

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _px(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


class CountingCache(block_cache.FirstBlockCache):
    made: ClassVar[list[CountingCache]] = []

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        CountingCache.made.append(self)


def test_cached_generation_skips_passes_is_recorded_and_reproduces(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pictor.guided_velocity.FirstBlockCache", CountingCache)
    CountingCache.made.clear()
    request = GenerationRequest(PROMPT, seed=1, num_images=2, cache_threshold=0.2)
    cached = pipe.generate(request)
    (cache,) = CountingCache.made
    # 20 steps x 2 images x (cond, uncond) rows; the default model's first block moves 7-15% a step
    assert cache.calls == 80 and 0 < cache.full < 60, cache.stats()
    # each record counts its image's own passes (its conditional and unconditional rows)
    assert cache.row_full is not None
    for j, g in enumerate(cached):
        want = int(cache.row_full[j] + cache.row_full[j + 2])
        assert g.record["cache_passes"] == {"full": want, "total": 40}
    assert sum(g.record["cache_passes"]["full"] for g in cached) == cache.full

    full = pipe.generate(GenerationRequest(PROMPT, seed=1, num_images=2))
    diff = np.abs(_px(cached[1].image) - _px(full[1].image))
    assert diff.max() > 0  # skipped passes change the picture a little...
    assert diff.mean() < 12  # ...not into another one (measured: 3.6 levels of 255 on average)

    record = cached[1].record
    assert record["cache_threshold"] == 0.2 and "cache_threshold" not in full[1].record
    path = save_png(cached[1].image, record, tmp_path / "cached.png")
    parameters = read_text_chunks(path)["parameters"]
    passes = record["cache_passes"]
    assert f"First block cache: 0.2, First block cache full passes: {passes['full']}/40" in parameters
    again = reproduce(pipe, read_record(path))
    np.testing.assert_array_equal(_px(again.image), _px(cached[1].image))


def test_threshold_zero_is_off(pipe: Pipeline) -> None:
    (off,) = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=6, cache_threshold=0))
    (plain,) = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=6))
    assert "cache_threshold" not in off.record and "cache_passes" not in off.record
    np.testing.assert_array_equal(_px(off.image), _px(plain.image))


def test_cached_edit_and_hires_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    (source,) = pipe.generate(GenerationRequest("a yellow star", seed=1, steps=6))
    source.image.save(tmp_path / "src.png")
    edit = EditRequest(
        image=tmp_path / "src.png", prompt="a red star", strength=0.7, seed=3, cache_threshold=0.3
    )
    (edited,) = pipe.edit(edit)
    assert edited.record["cache_threshold"] == 0.3
    assert edited.record["cache_passes"]["total"] == 2 * 20  # the default model's 20 steps, both halves
    path = save_png(edited.image, edited.record, tmp_path / "edited.png")
    again = reproduce(pipe, read_record(path), source=tmp_path / "src.png")
    np.testing.assert_array_equal(_px(again.image), _px(edited.image))

    hires = GenerationRequest(PROMPT, seed=2, steps=6, hires_scale=2, hires_steps=4, cache_threshold=0.3)
    (big,) = pipe.generate(hires)
    assert big.record["cache_passes"]["total"] == 2 * (6 + 4)  # both passes counted
    path = save_png(big.image, big.record, tmp_path / "big.png")
    np.testing.assert_array_equal(_px(reproduce(pipe, read_record(path)).image), _px(big.image))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_thresholds_are_refused(pipe: Pipeline, bad: float) -> None:
    with pytest.raises(GenerationError, match="cache threshold must be"):
        pipe.generate(GenerationRequest(PROMPT, cache_threshold=bad))


def test_ground_truth_scores_refuse_a_cache_threshold() -> None:
    from pictor.eval.shapes_run import run_shapes_eval

    with pytest.raises(ValueError, match=r"--cache-threshold: these change a model.s images; --ground-truth"):
        run_shapes_eval(None, None, 1, 0, None, ground_truth=True, cache_threshold=0.1)
