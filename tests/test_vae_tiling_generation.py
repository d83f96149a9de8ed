"""Generation and edits with the autoencoder run in tiles (`vae_tile`): recorded, reproducible, close to
the whole pass on the trained default model, cancellable between tiles, and refused when it cannot fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pictor
from pictor.editing import EditRequest
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import read_record, read_text_chunks, save_png
from pictor.reproduce import reproduce


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pictor.load("default", device="cpu")


def _px(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(image).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def test_tiled_generation_is_recorded_and_reproduces(pipe: Pipeline, tmp_path: Path) -> None:
    request = GenerationRequest("two blue squares", seed=5, num_images=2, steps=4, vae_tile=32)
    images = pipe.generate(request)
    record = images[1].record
    assert record["vae_tile"] == 32 and record["vae_tile_overlap"] == 8  # a quarter of the tile
    path = save_png(images[1].image, record, tmp_path / "tiled.png")
    assert "VAE tile: 32, VAE tile overlap: 8" in read_text_chunks(path)["parameters"]
    again = reproduce(pipe, read_record(path))
    np.testing.assert_array_equal(_px(again.image), _px(images[1].image))
    # Without tiling the record says nothing of it, and the same seed decodes whole: other pixels.
    whole = pipe.generate(GenerationRequest("two blue squares", seed=5, num_images=2, steps=4))
    assert "vae_tile" not in whole[1].record
    assert np.abs(_px(whole[1].image) - _px(images[1].image)).max() > 0


def test_a_tile_as_large_as_the_image_decodes_it_whole(pipe: Pipeline) -> None:
    kwargs = {"seed": 2, "steps": 3}
    (tiled,) = pipe.generate(GenerationRequest("a red circle", vae_tile=64, **kwargs))
    (whole,) = pipe.generate(GenerationRequest("a red circle", **kwargs))
    np.testing.assert_array_equal(_px(tiled.image), _px(whole.image))


def test_tiles_blend_into_an_image_close_to_the_whole_decode(pipe: Pipeline) -> None:
    """128x128 in 64-pixel tiles (3 x 3): the blend keeps the picture. Each tile is normalized by its own
    GroupNorm statistics, so background tints differ a little from the whole decode's (measured
    25.6-26.9 dB on these seeds); a misplaced or unblended tile costs far more."""
    kwargs = {"width": 128, "height": 128, "steps": 6, "seed": 11, "num_images": 3}
    prompt = "a green triangle above a red circle"
    whole = pipe.generate(GenerationRequest(prompt, **kwargs))
    tiled = pipe.generate(GenerationRequest(prompt, vae_tile=64, **kwargs))
    for t, w in zip(tiled, whole, strict=True):
        assert _psnr(_px(t.image), _px(w.image)) > 23


def test_tiled_edit_is_recorded_and_reproduces(pipe: Pipeline, tmp_path: Path) -> None:
    (source,) = pipe.generate(GenerationRequest("a yellow star", seed=1, steps=4))
    source.image.save(tmp_path / "src.png")
    edit = EditRequest(
        image=tmp_path / "src.png", prompt="a red star", strength=0.6, seed=3, steps=4, vae_tile=32
    )
    (edited,) = pipe.edit(edit)
    assert edited.record["vae_tile"] == 32 and edited.record["mode"] == "img2img"
    path = save_png(edited.image, edited.record, tmp_path / "edited.png")
    again = reproduce(pipe, read_record(path), source=tmp_path / "src.png")
    np.testing.assert_array_equal(_px(again.image), _px(edited.image))


def test_a_job_can_be_cancelled_between_tiles(pipe: Pipeline) -> None:
    """The tiled decode reports progress after each tile, so a callback that raises stops it there (the
    server's cancel and timeout), not only between sampler steps."""
    at_end: list[int] = []

    class Stop(Exception):
        pass

    def progress(step: int, total: int) -> None:
        if step == total:
            at_end.append(step)
            if len(at_end) == 3:  # the last sampler step, then two tiles
                raise Stop

    request = GenerationRequest("a red circle", steps=2, seed=0, vae_tile=32)
    with pytest.raises(Stop):
        pipe.generate(request, progress)
    assert len(at_end) == 3

    at_end.clear()
    pipe.generate(request, lambda s, t: at_end.append(s) if s == t else None)
    assert len(at_end) == 1 + 9  # the last step, then 3 x 3 tiles of 7 latent pixels over 16


@pytest.mark.parametrize(
    "tiling,message",
    [
        ({"vae_tile": 30}, "VAE tile 30 must be a multiple of 4 pixels"),
        ({"vae_tile": 8}, "at least 16"),
        (
            {"vae_tile": 32, "vae_tile_overlap": 20},
            "overlap 20 must be a multiple of 4 pixels from 0 to half the tile \\(16\\)",
        ),
        ({"vae_tile": 32, "vae_tile_overlap": -4}, "VAE tile overlap -4"),
        ({"vae_tile_overlap": 8}, "a VAE tile overlap needs a tile size"),
    ],
)
def test_tiles_that_cannot_fit_are_refused(pipe: Pipeline, tiling: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        pipe.generate(GenerationRequest("a red circle", steps=1, seed=0, **tiling))


def test_a_tiled_edit_can_be_cancelled_while_it_encodes(pipe: Pipeline, tmp_path: Path) -> None:
    (source,) = pipe.generate(GenerationRequest("a yellow star", seed=1, steps=2))
    source.image.save(tmp_path / "src.png")
    calls: list[int] = []

    class Stop(Exception):
        pass

    def progress(step: int, total: int) -> None:
        calls.append(step)
        raise Stop  # at the first report: the first encoded tile, before any sampler step

    edit = EditRequest(
        image=tmp_path / "src.png", prompt="a red star", strength=0.6, seed=3, steps=4, vae_tile=32
    )
    with pytest.raises(Stop):
        pipe.edit(edit, progress)
    assert calls == [0]
