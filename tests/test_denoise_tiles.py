"""Denoise tiles (`denoise_tile`, `pictor.denoise_tiles`): the transformer runs on overlapping windows of the
image's tokens, each where it lies, their velocities blended with weights summing to 1; a pass no larger than
a window runs whole; recorded, reproducible, and refused where it cannot run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pictor
from pictor.denoise_tiles import plan_windows, tiled_call, window_starts
from pictor.editing import EditRequest
from pictor.generation_settings import denoise_tiling_problem
from pictor.notices import PictorWarning
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record, read_text_chunks, save_png
from pictor.reproduce import reproduce
from tests.test_cli_grid import cli

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _px(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize(
    ("rows", "columns", "window", "overlap"),
    [(8, 8, 4, 1), (10, 7, 4, 2), (16, 5, 6, 0), (9, 30, 8, 4), (5, 5, 4, 2)],
)
def test_windows_cover_every_token_once_in_weight(rows: int, columns: int, window: int, overlap: int) -> None:
    windows = plan_windows(rows, columns, window, overlap)
    assert windows is not None
    total = torch.zeros(rows * columns)
    for w in windows:
        assert len(w.index) == min(rows, window) * min(columns, window)  # full-size windows only
        assert len(set(w.index.tolist())) == len(w.index) and bool((w.weight > 0).all())
        total.index_add_(0, w.index, w.weight)
    torch.testing.assert_close(total, torch.ones(rows * columns))
    for length in (rows, columns):
        starts = window_starts(length, min(length, window), overlap)
        ends = [s + min(length, window) for s in starts]
        assert starts[0] == 0 and ends[-1] == length
        assert all(e - s >= overlap for s, e in zip(starts[1:], ends[:-1], strict=False))  # the least shared


def test_one_window_over_the_whole_grid_is_no_tiling() -> None:
    assert plan_windows(4, 6, 6, 2) is None


def test_a_token_wise_velocity_is_blended_back_exactly() -> None:
    """What each token's velocity depends on only itself: the windows' blend is the whole call's."""
    windows = plan_windows(9, 12, 5, 2)
    assert windows is not None
    x = torch.randn(3, 108, 7)
    out = tiled_call(windows, x, lambda index: torch.sin(x[:, index]) * 2)
    torch.testing.assert_close(out, torch.sin(x) * 2)


def test_overlaps_crossfade_linearly_between_windows() -> None:
    """Two windows of 6 tokens over 10 sharing 2: each token's velocity is the first window's, then a linear
    fade (1/3, 2/3 of the second's) across the shared tokens, then the second's."""
    windows = plan_windows(1, 10, 6, 2)
    assert windows is not None and [w.index.tolist() for w in windows] == [list(range(6)), list(range(4, 10))]
    x = torch.zeros(1, 10, 1)
    order = iter(range(len(windows)))
    out = tiled_call(windows, x, lambda index: torch.full((1, len(index), 1), float(next(order))))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1]))


def test_windows_run_on_their_tokens_with_their_own_positions(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, torch.Tensor]] = []
    forward = pipe.transformer.forward

    def spy(x: torch.Tensor, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((x.shape[1], ids[0].clone()))
        return forward(x, ids, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    # 128x96 pixels: 16 x 12 tokens of 8 pixels; windows of 64 pixels (8 tokens) sharing a quarter of
    # that (2 tokens): 3 x 2 windows
    request = GenerationRequest(PROMPT, seed=2, steps=3, width=128, height=96, denoise_tile=64)
    with pytest.warns(PictorWarning, match="this 128x96 pass starts from noise, and its 6 windows"):
        (tiled,) = pipe.generate(request)
    assert pipe.patch == 8
    assert [n for n, _ in calls] == [64] * 18  # 6 windows x 3 steps, CFG's halves in one call
    seen = torch.cat([ids for _, ids in calls[:6]])
    whole_ids = {tuple(row.tolist()) for row in seen}
    assert len(whole_ids) == 192  # the six windows together hold every token's position once or more
    rows = {int(r[1]) for r in seen}
    columns = {int(r[2]) for r in seen}
    assert rows == set(range(12)) and columns == set(range(16))  # where each lies in the whole image
    assert tiled.record["denoise_tile"] == 64 and tiled.record["denoise_tile_overlap"] == 16


def test_a_window_as_large_as_the_image_runs_it_whole(pipe: Pipeline) -> None:
    kwargs = {"seed": 4, "steps": 4, "width": 96, "height": 64}
    (tiled,) = pipe.generate(GenerationRequest(PROMPT, denoise_tile=96, **kwargs))
    (whole,) = pipe.generate(GenerationRequest(PROMPT, **kwargs))
    np.testing.assert_array_equal(_px(tiled.image), _px(whole.image))


def test_tiled_hires_refines_in_windows_is_recorded_and_reproduces(pipe: Pipeline, tmp_path: Path) -> None:
    """The hires fix's second pass (128x128, 16 x 16 tokens) in 64-pixel windows; the first (64x64) is one
    window and runs whole. Close to the untiled second pass: at strength 0.3 it refines, it does not
    recompose (the bound only says so; the blend and the windows' places are checked above and in
    tests/test_denoise_tiles_tokenwise.py)."""
    kwargs = {"seed": 1, "num_images": 2, "hires_scale": 2.0, "steps": 8}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiled = pipe.generate(GenerationRequest(PROMPT, denoise_tile=64, denoise_tile_overlap=16, **kwargs))
    assert not [w for w in caught if "starts from noise" in str(w.message)]  # the first pass ran whole
    whole = pipe.generate(GenerationRequest(PROMPT, **kwargs))
    for a, b in zip(tiled, whole, strict=True):
        assert a.image.size == (128, 128)
        mse = np.mean((_px(a.image) - _px(b.image)) ** 2)
        assert mse > 0 and 10 * np.log10(255.0**2 / mse) > 22
    record = tiled[1].record
    assert record["denoise_tile"] == 64 and "denoise_tile" not in whole[1].record
    path = save_png(tiled[1].image, record, tmp_path / "tiled.png")
    assert "Denoise tile: 64, Denoise tile overlap: 16" in read_text_chunks(path)["parameters"]
    again = reproduce(pipe, read_record(path))
    np.testing.assert_array_equal(_px(again.image), _px(tiled[1].image))


def test_a_tiled_img2img_is_recorded_and_reproduces(pipe: Pipeline, tmp_path: Path) -> None:
    source = np.zeros((128, 160, 3), np.uint8)
    source[20:70, 30:90] = (220, 30, 30)
    Image.fromarray(source).save(tmp_path / "source.png")
    (edited,) = pipe.edit(
        EditRequest(
            tmp_path / "source.png",
            PROMPT,
            strength=0.4,
            seed=3,
            steps=6,
            denoise_tile=80,
            denoise_tile_overlap=32,
        )
    )
    assert edited.image.size == (160, 128) and edited.record["denoise_tile"] == 80
    path = save_png(edited.image, edited.record, tmp_path / "edit.png")
    again = reproduce(pipe, read_record(path), source=tmp_path / "source.png")
    np.testing.assert_array_equal(_px(again.image), _px(edited.image))


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [
        (36, None, "denoise tile 36 must be a multiple of 8 pixels"),
        (16, None, "at least 32; try 32"),
        (64, 48, "denoise tile overlap 48 must be a multiple of 8 pixels from 0 to half the tile (32)"),
        (64, 4, "denoise tile overlap 4"),
        (None, 16, "a denoise tile overlap needs a tile size"),
        (64.0, None, "denoise tile must be a whole number of pixels, got 64.0"),
        (64, True, "denoise tile overlap must be a whole number of pixels, got True"),
    ],
)
def test_bad_tiles_are_refused_with_what_to_give(
    pipe: Pipeline, tile: int | None, overlap: int | None, message: str
) -> None:
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate(GenerationRequest(PROMPT, steps=2, denoise_tile=tile, denoise_tile_overlap=overlap))
    assert denoise_tiling_problem(pipe.patch, tile, overlap) is not None


def test_tiles_are_refused_with_the_first_block_cache(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="denoise tiles and the first-block cache do not go together"):
        pipe.generate(GenerationRequest(PROMPT, steps=2, denoise_tile=64, cache_threshold=0.1))


def test_a_grid_takes_the_denoise_tile_for_every_cell(
    pipe: Pipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ("--size", "128x96", "--seed", "2", "--denoise-tile", "64", "--denoise-tile-overlap", "16")
    code, _, err = cli(
        capsys, "grid", PROMPT, "--device", "cpu", "--x", "steps=2,3", *args, "-o", str(tmp_path)
    )
    assert code == 0, err
    for i, steps in enumerate((2, 3)):
        record = read_record(tmp_path / f"cell-x{i}.png")
        assert (record["denoise_tile"], record["denoise_tile_overlap"]) == (64, 16)
        (want,) = pipe.generate(
            GenerationRequest(
                PROMPT, seed=2, steps=steps, width=128, height=96, denoise_tile=64, denoise_tile_overlap=16
            )
        )
        np.testing.assert_array_equal(
            _px(Image.open(tmp_path / f"cell-x{i}.png").convert("RGB")), _px(want.image)
        )
