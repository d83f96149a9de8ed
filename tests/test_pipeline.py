from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pictor
from pictor.checkpoint import save_bundle
from pictor.loading import pipeline_from_preset
from pictor.notices import PictorWarning
from pictor.pipeline import MAX_SEED, GenerationError, GenerationRequest, Pipeline
from pictor.provenance import ProvenanceError, read_record, save_png
from pictor.reproduce import reproduce


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return pictor.load("tiny", device="cpu")


def _px(g) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(g.image).astype(np.int16)


def _same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """Same noise and conditioning; only float rounding may differ between batch shapes.

    BLAS picks kernels by matrix size, so a batch of 4 can round differently in the last bit than a batch
    of 1; after 8-bit quantisation that flips at most a handful of values by one level. A seeding or
    conditioning mistake changes nearly every pixel, which this still catches.
    """
    diff = np.abs(a - b)
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() >= 0.995


def test_image_i_is_the_same_at_batch_size_1_and_4(pipe: Pipeline) -> None:
    req = GenerationRequest("a red circle", negative_prompt="a blue square", seed=10, num_images=4, steps=3)
    batched = pipe.generate(req)
    assert [g.seed for g in batched] == [10, 11, 12, 13]
    singles = [
        pipe.generate(
            GenerationRequest(
                "a red circle", negative_prompt="a blue square", seed=10 + i, num_images=1, steps=3
            )
        )[0]
        for i in range(4)
    ]
    for g, single in zip(batched, singles, strict=True):
        _same_up_to_rounding(_px(g), _px(single))
    assert np.abs(_px(singles[0]) - _px(singles[1])).mean() > 5  # different seeds, different images
    # The same batch shape is bit-exact: that is what `reproduce` relies on.
    again = pipe.generate(req)
    for a, b in zip(batched, again, strict=True):
        np.testing.assert_array_equal(_px(a), _px(b))


def test_outputs_depend_on_seed_prompt_guidance_and_sampler(pipe: Pipeline) -> None:
    base = dict(prompt="a red circle", seed=1, steps=3)
    ref = _px(pipe.generate(GenerationRequest(**base))[0])  # type: ignore[arg-type]
    for change in (
        {"seed": 2},
        {"prompt": "four green stars"},
        {"guidance": 1.0},
        {"sampler": "heun"},
        {"negative_prompt": "blurry"},
    ):
        other = _px(pipe.generate(GenerationRequest(**{**base, **change}))[0])  # type: ignore[arg-type]
        assert np.abs(other - ref).max() > 0, change


def test_reproduce_from_png_is_bit_exact(pipe: Pipeline, tmp_path: Path) -> None:
    images = pipe.generate(
        GenerationRequest("two yellow stars", seed=5, num_images=3, steps=2, sampler="dpmpp_2m")
    )
    path = save_png(images[2].image, images[2].record, tmp_path / "x.png")
    record = read_record(path)
    assert record["seed"] == 7 and record["batch_seeds"] == [5, 6, 7] and record["batch_index"] == 2
    again = reproduce(pipe, record)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(again.image))


def test_reproduce_refuses_another_model(pipe: Pipeline) -> None:
    rec = pipe.generate(GenerationRequest("x", seed=1, steps=1))[0].record
    rec["model"]["hash"] = "f" * 64
    with pytest.raises(GenerationError, match="pass that model"):
        reproduce(pipe, rec)


def test_bundle_gives_the_same_pixels_as_its_weights(pipe: Pipeline, tmp_path: Path) -> None:
    cfg = pipe.config
    cfg.trained = True
    try:
        save_bundle(tmp_path / "m", cfg, pipe.transformer.state_dict(), pipe.autoencoder.state_dict())
    finally:
        cfg.trained = False
    loaded = pictor.load(tmp_path / "m", device="cpu")
    req = GenerationRequest("a black square", seed=3, steps=2)
    np.testing.assert_array_equal(_px(loaded.generate(req)[0]), _px(pipe.generate(req)[0]))
    assert loaded.generate(req)[0].record["model"]["hash"] == loaded.config.hashes["transformer.safetensors"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 30}, "multiple of 4.*try 28 or 32"),
        ({"height": 0}, "positive multiple"),
        ({"steps": 0}, "steps must be between"),
        ({"steps": -3}, "steps must be between"),
        ({"sampler": "ddim"}, "unknown sampler 'ddim'"),
        ({"num_images": 0}, "number of images"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"seed": -1}, "seed must be between"),
        ({"seed": MAX_SEED, "num_images": 2}, f"seed must be between 0 and {MAX_SEED - 1}"),
        ({"num_images": 10**9}, "number of images must be between 1 and 10000"),
        ({"schedule": "bogus"}, "unknown schedule 'bogus'"),
        ({"prompt": "a red\udcff circle"}, "the prompt is not valid text"),
        ({"negative_prompt": "\udcff"}, "the negative prompt is not valid text"),
        ({"negative_prompt": "blue", "guidance": 1.0}, "off at guidance 1: raise the guidance"),
    ],
)
def test_bad_requests_are_clear_errors(pipe: Pipeline, change: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        pipe.generate(GenerationRequest(**{"prompt": "x", **change}))  # type: ignore[arg-type]


def test_the_last_seed_is_usable_and_records_must_keep_seed_and_batch_seeds_together(pipe: Pipeline) -> None:
    with pytest.warns(PictorWarning, match="low 32 bits"):
        (image,) = pipe.generate(GenerationRequest("x", seed=MAX_SEED, steps=1))
    assert image.seed == MAX_SEED
    rec = pipe.generate(GenerationRequest("x", seed=4, steps=1, num_images=2))[1].record
    for field, value, words in [
        ("seed", 4, "seed 4 is not its batch_seeds' entry for this image .5."),  # only the seed edited
        ("model", {"name": "m", "hash": 5}, "'model' is .*not an object with the model's name and hash"),
        ("layout_adapter", {"sha256": 7}, "'layout_adapter' is .*not an object with the adapter's sha256"),
        ("guidance_mode", 3, "'guidance_mode' is 3, not a guidance mode"),
    ]:
        with pytest.raises(ProvenanceError, match=words):
            reproduce(pipe, {**rec, field: value})
    with pytest.raises(GenerationError, match=r"made with none guidance, but the loaded model .* uses cfg"):
        reproduce(pipe, {**rec, "guidance_mode": "none"})


def test_seeds_past_32_bits_repeat_smaller_ones_and_say_so(pipe: Pipeline) -> None:
    """torch's CPU generator reads a seed's low 32 bits: seed 2**32 + 5 is seed 5's image, and the user is
    told (naming the first such seed of the request); seeds below 2**32 are silent."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PictorWarning)
        below = pipe.generate(GenerationRequest("x", seed=2**32 - 2, steps=2, num_images=2))
    assert [g.seed for g in below] == [2**32 - 2, 2**32 - 1]
    with pytest.warns(PictorWarning, match=r"seed 4294967296 gives the image of seed 0: .*low 32 bits"):
        pipe.generate(GenerationRequest("x", seed=2**32 - 1, steps=1, num_images=2))
    with pytest.warns(PictorWarning, match=r"seed 4294967301 gives the image of seed 5"):
        (far,) = pipe.generate(GenerationRequest("x", seed=2**32 + 5, steps=2))
    (near,) = pipe.generate(GenerationRequest("x", seed=5, steps=2))
    np.testing.assert_array_equal(_px(far), _px(near))


def test_images_made_with_settings_now_refused_still_reproduce(pipe: Pipeline) -> None:
    """Earlier versions made images with a negative prompt at guidance 1 (and outpaints at strength 0):
    new requests like that are refused, but those images' records must still reproduce, bit for bit."""
    from pictor.editing import EditRequest

    old = GenerationRequest("x", negative_prompt="y", guidance=1.0, seed=3, steps=1)
    with pytest.raises(GenerationError, match="off at guidance 1"):
        pipe.generate(old)
    r = pipe.resolve_request(old, reproducing=True)  # what the earlier version ran
    (made,) = pipe.run_seeds(r, [3], lambda i, n: None)
    np.testing.assert_array_equal(_px(reproduce(pipe, made.record)), _px(made))
    source = made.image
    edit = EditRequest(source, "x", expand=(0, 0, 4, 0), strength=0.0, seed=1, steps=1)
    r, inputs = pipe.resolve_edit(edit, reproducing=True)
    (outpaint,) = pipe.run_edit_seeds(r, inputs, [1], lambda i, n: None)
    again = reproduce(pipe, outpaint.record, source=source)
    np.testing.assert_array_equal(_px(again), _px(outpaint))


def test_a_prompt_longer_than_the_text_encoder_reads_says_what_is_left_out(pipe: Pipeline) -> None:
    length = pipe.text_encoder.max_length
    prompt = " ".join(["a red circle"] * length) + " and a green star"
    with pytest.warns(PictorWarning, match=rf"prompt is longer than the text encoder's {length} tokens; .*"
                      r"not read: '.*and a green star'"):  # fmt: skip
        pipe.generate(GenerationRequest(prompt, seed=1, steps=1))


def test_prompt_notices_are_the_words_of_the_warnings(pipe: Pipeline) -> None:
    """What the server shows its users (it cannot catch warnings in its worker thread)."""
    prompt = " ".join(["a red circle"] * pipe.text_encoder.max_length) + " and a green star"
    assert pipe.prompt_notices("a red circle", "") == [] and pipe.prompt_notices(None, None) == []
    with pytest.warns(PictorWarning) as caught:
        pipe.resolve_request(GenerationRequest(prompt, negative_prompt=prompt, seed=1, steps=1))
    notices = pipe.prompt_notices(prompt, prompt)
    assert [str(w.message) for w in caught if w.category is PictorWarning] == notices
    assert notices[0].startswith("the prompt is") and notices[1].startswith("the negative prompt is")


def test_progress_is_reported_and_can_cancel(pipe: Pipeline) -> None:
    seen: list[tuple[int, int]] = []
    pipe.generate(
        GenerationRequest("x", seed=1, steps=3, num_images=2, batch_size=1),
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]

    class Cancelled(Exception):
        pass

    def cancel(i: int, n: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate(GenerationRequest("x", seed=1, steps=3), progress=cancel)


def test_distilled_guidance_model_takes_guidance_and_refuses_negative() -> None:
    with pytest.warns(UserWarning):
        p = pipeline_from_preset("tiny", device="cpu")
    p.transformer = type(p.transformer)(
        type(p.transformer.params)(**{**p.transformer.params.__dict__, "guidance_embed": True})
    ).eval()
    p.guidance_mode = "distilled"
    a = _px(p.generate(GenerationRequest("x", seed=1, steps=2, guidance=1.0))[0])
    b = _px(p.generate(GenerationRequest("x", seed=1, steps=2, guidance=8.0))[0])
    assert np.abs(a - b).max() > 0
    with pytest.raises(GenerationError, match="no negative prompt"):
        p.generate(GenerationRequest("x", negative_prompt="y", steps=1))
    assert torch.get_default_dtype() == torch.float32


def test_a_model_without_guidance_refuses_a_guidance_it_would_ignore() -> None:
    with pytest.warns(UserWarning):
        p = pipeline_from_preset("tiny", device="cpu")
    p.guidance_mode = "none"  # as FLUX.1 [schnell]: guidance changes nothing, so asking for it is an error
    (image,) = p.generate(GenerationRequest("x", seed=1, steps=1, guidance=0.0))
    assert image.record["guidance"] == 0.0
    with pytest.raises(GenerationError, match=r"takes no guidance .*guidance 9 would change nothing"):
        p.generate(GenerationRequest("x", seed=1, steps=1, guidance=9.0))
    p.defaults["guidance"] = 3.5  # a stored default it ignores is not the user's request: no refusal
    assert p.generate(GenerationRequest("x", seed=1, steps=1))[0].record["guidance"] == 3.5
    # ...nor is that default filled in and resolved again (the server's job queue does so).
    filled = p.resolve_request(GenerationRequest("x", seed=1, steps=1))
    assert p.resolve_request(filled).guidance == 3.5
