"""Live previews (`pictor.latent_preview`): the colour map's fit, what a pipeline hands to `Previews`, and
that previews change no image."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pictor.editing import EditRequest
from pictor.latent_preview import LatentColours, PreviewError, Previews, preview_pictures
from pictor.loading import pipeline_from_preset
from pictor.pipeline import GenerationRequest, Pipeline

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny preset is untrained on purpose
        return pipeline_from_preset("tiny", device="cpu")


class Frames:
    """A `Previews.on_frame` that keeps what it was given."""

    def __init__(self) -> None:
        self.got: list[tuple[int, list[Image.Image]]] = []

    def __call__(self, pictures: list[Image.Image], first_index: int) -> None:
        self.got.append((first_index, pictures))


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_the_colour_map_recovers_a_linear_decoder() -> None:
    """Pixels that are a linear map of the latents (per latent pixel, over its whole patch) are fitted
    exactly, so `apply` gives the patch colours back."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 6, 5, generator=gen)
    weights = torch.randn(4, 3, generator=gen) * 0.15
    bias = torch.tensor([0.1, -0.2, 0.05])
    colours = torch.einsum("bchw,cd->bdhw", latents, weights) + bias[None, :, None, None]
    pixels = F.interpolate(colours, scale_factor=4, mode="nearest")  # each patch one colour
    fit = LatentColours(4)
    assert not fit.fitted
    fit.add(latents, pixels, 4)
    assert fit.fitted
    torch.testing.assert_close(fit.apply(latents), colours.clamp(-1, 1), atol=2e-3, rtol=0)
    # and it generalises to other latents of the same decoder
    other = torch.randn(1, 4, 3, 3, generator=gen)
    expected = torch.einsum("bchw,cd->bdhw", other, weights) + bias[None, :, None, None]
    torch.testing.assert_close(fit.apply(other), expected.clamp(-1, 1), atol=2e-3, rtol=0)


def test_the_colour_map_needs_pairs_of_one_grid() -> None:
    fit = LatentColours(4)
    with pytest.raises(RuntimeError, match="nothing to fit"):
        fit.apply(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="not the same grid"):
        fit.add(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 16, 16), 4)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"method": "taesd"}, "not one of approx, full"),
        ({"every": 0}, "1 or more"),
        ({"every": True}, "1 or more"),
    ],
)
def test_bad_preview_settings_are_clear_errors(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(PreviewError, match=words):
        Previews(Frames(), **settings)


def test_previews_every_step_of_every_run_and_the_same_images(pipe: Pipeline) -> None:
    request = GenerationRequest(PROMPT, seed=5, steps=3, num_images=3, batch_size=2)
    plain = pipe.generate(request)
    frames = Frames()
    shown = pipe.generate(request, previews=Previews(frames))
    assert [_px(a.image).tolist() for a in plain] == [_px(b.image).tolist() for b in shown]
    assert [a.record for a in plain] == [b.record for b in shown]  # a preview is never recorded
    # two runs (2 + 1 images), three steps each; each frame names its run's first image in the request
    assert [(i, len(p)) for i, p in frames.got] == [(0, 2)] * 3 + [(2, 1)] * 3
    f = pipe.autoencoder.params.downsample_factor
    assert {p.size for _, pics in frames.got for p in pics} == {(32 // f, 32 // f)}  # the latent grid


def test_full_previews_decode_the_prediction(pipe: Pipeline) -> None:
    """At the last step of a deterministic sampler the prediction is the result, so a full preview of it
    is the image; `every` thins the frames but keeps the last."""
    frames = Frames()
    request = GenerationRequest(PROMPT, seed=2, steps=7, num_images=1)
    (image,) = pipe.generate(request, previews=Previews(frames, "full", every=3))
    assert len(frames.got) == 3  # steps 3, 6 and 7
    last = frames.got[-1][1][0]
    assert last.size == image.image.size
    assert np.abs(_px(last) - _px(image.image)).max() <= 1
    assert np.abs(_px(frames.got[0][1][0]) - _px(image.image)).max() > 1  # an earlier step is not it


def test_a_failing_preview_stops_the_run(pipe: Pipeline) -> None:
    def broken(_pictures: list[Image.Image], _first: int) -> None:
        raise KeyboardInterrupt  # what a user's callback may raise to stop, as from progress

    with pytest.raises(KeyboardInterrupt):
        pipe.generate(GenerationRequest(PROMPT, seed=1, steps=3), previews=Previews(broken))


def test_edits_and_both_hires_passes_are_previewed(pipe: Pipeline) -> None:
    frames = Frames()
    source = Image.new("RGB", (32, 32), (200, 120, 40))
    pipe.edit(EditRequest(source, PROMPT, strength=0.5, seed=1, steps=4), previews=Previews(frames, "full"))
    assert len(frames.got) == 4  # an edit's steps all run from t = strength
    assert frames.got[-1][1][0].size == (32, 32)
    frames.got.clear()
    request = GenerationRequest(PROMPT, seed=1, steps=2, hires_scale=2.0, hires_steps=2, hires_strength=0.5)
    pipe.generate(request, previews=Previews(frames, "full"))
    assert [p[0].size for _, p in frames.got] == [(32, 32)] * 2 + [(64, 64)] * 2


def test_approx_previews_of_the_shipped_model_look_like_its_images() -> None:
    """On the shipped model (a trained autoencoder) the fitted colours come close to the finished images:
    measured 18 levels of 255 mean error at the last step (28 at the first), against 41 for each image's
    flat mean colour."""
    from pictor.loading import load

    model = load("default", device="cpu")
    frames = Frames()
    images = model.generate(GenerationRequest(PROMPT, seed=1, num_images=4), previews=Previews(frames))
    assert model.preview_colours.fitted
    last = frames.got[-1][1]
    errors, flat = [], []
    for preview, result in zip(last, images, strict=True):
        target = _px(result.image.resize(preview.size, Image.Resampling.BOX))
        errors.append(np.abs(_px(preview) - target).mean())
        flat.append(np.abs(target - target.mean(axis=(0, 1))).mean())
    assert np.mean(errors) < 0.6 * np.mean(flat), (errors, flat)


def test_a_broken_run_spoils_no_colour_fit(pipe: Pipeline) -> None:
    """(Found in review: a prediction holding NaN went into the sums, and every approx preview after it
    was black.) Rows that are not finite are left out; with nothing finite to fit, a frame is the decode."""
    ae = pipe.autoencoder
    f, c = ae.params.downsample_factor, ae.params.z_channels
    colours = LatentColours(c)
    broken = torch.full((1, c, 4, 4), float("nan"))
    (frame,) = preview_pictures(broken, ae, colours, "approx")
    assert not colours.fitted and frame.size == (4 * f, 4 * f)  # the decode, shown as it is
    good = torch.randn(1, c, 4, 4, generator=torch.Generator().manual_seed(0))
    mixed = torch.cat([broken, good])
    preview_pictures(mixed, ae, colours, "approx")
    assert colours.fitted
    assert torch.isfinite(colours.apply(good)).all()
    half = good.clone()
    half[..., :2, :] = float("inf")
    colours.add(half, torch.zeros(1, 3, 4 * f, 4 * f), f)  # only its finite rows count
    assert torch.isfinite(colours.apply(good)).all()
