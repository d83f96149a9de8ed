"""Editing: img2img, inpainting, outpainting on the tiny model (32x32 images, pixel multiple 4)."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pictor.pipeline_sampling
from pictor.edit_blending import (
    LatentInit,
    blend_velocity,
    composite,
    feather_weights,
    latent_mask,
    to_model_pixels,
)
from pictor.editing import EditError, EditRequest, load_mask, mask_sha256
from pictor.editing import to_rgb as editing_to_rgb
from pictor.flow import interpolate
from pictor.hires import HIRES_FIELDS
from pictor.loading import pipeline_from_preset
from pictor.models.flux import pack_latents
from pictor.pipeline import GenerationError, GenerationRequest, Pipeline
from pictor.provenance import parameters_text, read_record, save_png
from pictor.reproduce import reproduce
from pictor.sampling import SAMPLERS, STOCHASTIC_SAMPLERS, get_schedule
from pictor.sampling_steps import with_uncond

from cfg_pp_velocity import with_cfg


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return pipeline_from_preset("tiny", device="cpu")


def _source(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A smooth colour gradient plus a little noise: an image no untrained model reproduces by chance."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 128.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _box_mask(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ------------------------------------------------------------------------------------------- img2img


def test_strength_0_returns_the_input_unchanged(pipe: Pipeline) -> None:
    src = _source()
    calls: list[int] = []
    out = pipe.edit(
        EditRequest(src, "a red circle", strength=0.0, seed=1, steps=3, num_images=2),
        progress=lambda i, n: calls.append(i),
    )
    assert len(out) == 2 and calls == []  # no sampling at all
    for g in out:
        np.testing.assert_array_equal(np.asarray(g.image), np.asarray(src))
        assert g.record["mode"] == "img2img" and g.record["strength"] == 0.0


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_strength_1_is_plain_generation(pipe: Pipeline, sampler: str) -> None:
    settings = dict(negative_prompt="green", seed=11, steps=3, num_images=2, sampler=sampler)
    generated = pipe.generate(GenerationRequest("a blue square", **settings))  # type: ignore[arg-type]
    edited = pipe.edit(EditRequest(_source(), "a blue square", strength=1.0, **settings))  # type: ignore[arg-type]
    for g, e in zip(generated, edited, strict=True):
        np.testing.assert_array_equal(np.asarray(g.image), np.asarray(e.image))
        assert e.seed == g.seed and e.record["batch_seeds"] == [11, 12]


def test_partial_strength_depends_on_the_input(pipe: Pipeline) -> None:
    def edit(src: Image.Image, strength: float) -> np.ndarray:
        return _px(pipe.edit(EditRequest(src, "a red circle", strength=strength, seed=3, steps=4))[0].image)

    a, b = edit(_source(0), 0.5), edit(_source(1, (32, 32)).transpose(Image.Transpose.ROTATE_90), 0.5)
    assert np.abs(a - b).mean() > 2  # the input shows through at strength 0.5...
    full_a, full_b = edit(_source(0), 1.0), edit(_source(1).transpose(Image.Transpose.ROTATE_90), 1.0)
    np.testing.assert_array_equal(full_a, full_b)  # ...and not at all at strength 1
    assert np.abs(a - full_a).mean() > 2


def test_img2img_starts_at_strength_on_the_schedule(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, torch.Tensor] = {}
    real = pictor.pipeline_sampling.get_sampler

    def spy(name: str):  # type: ignore[no-untyped-def]
        def sampler(fn, x, ts, callback=None):  # type: ignore[no-untyped-def]
            seen["x"], seen["ts"] = x.clone(), ts.clone()
            return real(name)(fn, x, ts, callback)

        return sampler

    monkeypatch.setattr(pictor.pipeline_sampling, "get_sampler", spy)
    src = _source()
    record = pipe.edit(EditRequest(src, "x", seed=4, steps=4))[0].record
    assert record["strength"] == 0.75  # the img2img default
    torch.testing.assert_close(seen["ts"], get_schedule("flux", 4, image_seq_len=64, start=0.75))
    # The sampler starts from the encoded source noised to t = strength with the seed's noise.
    z0 = pack_latents(pipe.autoencoder.encode(to_model_pixels(np.asarray(src), pipe.device, pipe.dtype)))
    noise = pack_latents(pipe.initial_noise([4], 16, 16))
    torch.testing.assert_close(seen["x"], interpolate(z0, noise, 0.75))


def test_inpainting_sees_the_kept_region(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sources that differ only outside the mask give different repainted latents: the model saw the
    kept region at every step (not just pasted back at the end)."""
    outputs: list[torch.Tensor] = []
    real = pictor.pipeline_sampling.get_sampler

    def spy(name: str):  # type: ignore[no-untyped-def]
        def sampler(fn, x, ts, callback=None):  # type: ignore[no-untyped-def]
            outputs.append(real(name)(fn, x, ts, callback))
            return outputs[-1]

        return sampler

    monkeypatch.setattr(pictor.pipeline_sampling, "get_sampler", spy)
    mask = _box_mask(8, 8, 24, 24)
    inside = np.asarray(mask) > 0
    a = np.asarray(_source(0)).copy()
    b = np.asarray(_source(1)).copy()
    b[inside] = a[inside]
    for src in (a, b):
        pipe.edit(EditRequest(Image.fromarray(src), "x", mask=mask, seed=3, steps=3))
    repaint = latent_mask(inside, 2, pipe.autoencoder.params.z_channels)
    # The untrained tiny model reacts weakly to context, but any reaction is a difference; without it the
    # repainted latents would be bit-identical (same noise, same prompt).
    assert (outputs[0][repaint] - outputs[1][repaint]).abs().max() > 1e-4
    assert (outputs[0][~repaint] - outputs[1][~repaint]).abs().mean() > 1e-2  # the kept latents differ


# ------------------------------------------------------------------------------------------ inpainting


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_inpaint_keeps_pixels_outside_the_mask_exactly(pipe: Pipeline, sampler: str) -> None:
    src, mask = _source(), _box_mask(6, 8, 22, 20)
    out = pipe.edit(
        EditRequest(src, "a red circle", mask=mask, seed=5, steps=3, sampler=sampler, num_images=2)
    )
    keep = np.asarray(mask) == 0
    for g in out:
        img, ref = _px(g.image), _px(src)
        np.testing.assert_array_equal(img[keep], ref[keep])
        assert np.abs(img[~keep] - ref[~keep]).mean() > 10  # repainted inside
        assert g.record["mode"] == "inpaint" and g.record["strength"] == 1.0
        assert g.record["mask"]["sha256"] == mask_sha256(np.asarray(mask) >= 128)
    assert np.abs(_px(out[0].image) - _px(out[1].image)).max() > 0  # seed+i gives another image


@pytest.mark.parametrize("schedule", ["linear", "flux"])
def test_known_region_follows_its_noising_path_with_every_sampler(schedule: str) -> None:
    """The velocity replacement is the blended-latent rule: x = m x + (1 - m) interpolate(z0, noise, t), at
    every step before `finish`. The FLUX.1 schedule's uneven steps are where iPNDM_v's weights do not sum to
    1 (it drifted 1e-2 off the path there before it re-imposed the path after each step)."""
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
    keep = torch.zeros(1, 8, 16, dtype=torch.bool)
    keep[:, :3] = True
    repaint = ~keep
    weight = torch.randn(16, 16, generator=gen)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # some nonlinear "velocity"
        return torch.tanh(x @ weight) + t[:, None, None]

    # The stochastic samplers renoise the known region; see test_sampling_ancestral for theirs.
    for name, sampler in ((n, s) for n, s in SAMPLERS.items() if n not in STOCHASTIC_SAMPLERS):
        init = LatentInit(z0=z0, strength=0.6, mask=repaint)
        ts = get_schedule(schedule, 5, image_seq_len=8, start=0.6)
        x = init.start(noise)

        def check(info: dict, name: str = name) -> None:
            on_path = interpolate(z0, noise, info["t"])
            torch.testing.assert_close(info["x"][:, :3], on_path[:, :3], atol=1e-5, rtol=0, msg=name)

        # under CFG with the unconditional velocity blended too, as the pipeline does, for the CFG++ samplers
        guided = with_cfg(model, lambda x, t: 0.5 * torch.tanh(x @ weight.T) - t[:, None, None], 2.0)
        blend = blend_velocity(guided, z0, noise, repaint)
        blend = with_uncond(blend, guided, lambda u: blend_velocity(u, z0, noise, repaint))
        out = sampler(blend, x, ts, check)
        torch.testing.assert_close(out[:, :3], z0[:, :3], atol=1e-5, rtol=0)
        assert (out[:, 3:] - z0[:, 3:]).abs().mean() > 0.1  # the rest was sampled
        assert torch.equal(init.finish(out)[:, :3], z0[:, :3])


def test_latent_mask_max_pools_and_packs_like_the_latents() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 2] = True  # one pixel -> latent (2, 1) at factor 2
    got = latent_mask(mask, factor=2, channels=3)
    z = torch.zeros(1, 3, 4, 4)
    z[:, :, 2, 1] = 1.0
    assert got.dtype == torch.bool and torch.equal(got, pack_latents(z) > 0)
    assert int(got.sum()) == 3  # that latent, in every channel


def test_feather_stays_inside_the_mask() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    w = feather_weights(mask, 2)
    assert (w[~mask] == 0).all()
    assert w[2, 5] == pytest.approx(1 / 3) and w[3, 5] == pytest.approx(2 / 3) and w[5, 5] == 1.0
    assert (feather_weights(np.ones((6, 6), bool), 3) == 1).all()  # the image border is not a kept edge
    np.testing.assert_array_equal(feather_weights(mask, 0), mask.astype(np.float32))
    src = np.full((12, 12, 3), 7, np.uint8)
    out = composite(np.full((12, 12, 3), 250, np.uint8), src, w)
    np.testing.assert_array_equal(out[~mask], src[~mask])
    assert (out[5, 5] == 250).all() and 7 < out[2, 5, 0] < 250


def test_a_huge_feather_stops_once_the_mask_is_eroded() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    # 10^9 rounds would take hours; past the mask's depth they change nothing, so they are not run.
    np.testing.assert_array_equal(feather_weights(mask, 10**9), feather_weights(mask, 4) * 5 / (10**9 + 1))


def test_sixteen_bit_masks_and_sources_scale_by_their_depth() -> None:
    def grey16(value: int) -> Image.Image:
        return Image.fromarray(np.full((16, 16), value, np.uint16)).convert("I;16")

    # 30000 / 65535 is 46 % grey: kept; 40000 is 61 %: repainted (Pillow's own conversion clips both to 255).
    assert not load_mask(grey16(30000), 16, 16).any() and load_mask(grey16(40000), 16, 16).all()
    assert editing_to_rgb(grey16(8000))[0, 0].tolist() == [31, 31, 31]


def test_masks_of_any_mode_threshold_alike() -> None:
    grey = np.zeros((16, 16), np.uint8)
    grey[4:12, 4:12] = 200
    grey[0, 0] = 127  # below the threshold: kept
    want = grey >= 128
    rgba = Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1), "RGBA")
    for m in (
        Image.fromarray(grey),
        Image.fromarray(grey).convert("1", dither=Image.Dither.NONE),
        Image.fromarray(grey).convert("RGB"),
        rgba,
    ):
        np.testing.assert_array_equal(load_mask(m, 16, 16), want)
    # A scaled copy with the same aspect ratio is resized with nearest.
    half = Image.fromarray(grey).resize((8, 8), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(load_mask(half, 16, 16), want)


# ----------------------------------------------------------------------------------------- outpainting


def test_outpaint_grows_the_canvas_and_keeps_the_original(pipe: Pipeline) -> None:
    src = _source()
    out = pipe.edit(EditRequest(src, "a red circle", expand=(8, 0, 4, 12), seed=2, steps=3))[0]
    assert out.image.size == (32 + 8 + 4, 32 + 12)
    img = _px(out.image)
    np.testing.assert_array_equal(img[0:32, 8:40], _px(src))
    edge = np.pad(_px(src), ((0, 12), (8, 4), (0, 0)), mode="edge")
    assert np.abs(img[32:] - edge[32:]).mean() > 10  # the new area was painted, not just edge-filled
    rec = out.record
    assert rec["mode"] == "outpaint" and rec["expand"] == [8, 0, 4, 12] and rec["fill"] == "edge"
    assert (rec["width"], rec["height"]) == (44, 44)
    assert rec["source_image"]["width"] == 32 and rec["source_image"]["height"] == 32 and "mask" not in rec


def test_outpaint_new_area_is_the_generated_picture_not_blended_with_its_fill(pipe: Pipeline) -> None:
    """The feather blends toward the original's own pixels only: the expanded area has none, so its
    starting fill (noise here) must not show through next to the seam."""
    src = _source()
    common = {"image": src, "prompt": "x", "expand": (0, 0, 8, 0), "fill": "noise", "seed": 2, "steps": 2}
    soft = _px(pipe.edit(EditRequest(**common, feather=3))[0].image)  # type: ignore[arg-type]
    hard = _px(pipe.edit(EditRequest(**common, feather=0))[0].image)  # type: ignore[arg-type]
    np.testing.assert_array_equal(soft[:, 32:], hard[:, 32:])  # the same generated pixels, feather or not
    np.testing.assert_array_equal(soft[:, :32], _px(src))


def test_outpaint_with_a_mask_on_the_original_and_noise_fill(pipe: Pipeline) -> None:
    src, mask = _source(), _box_mask(0, 0, 8, 32)  # also repaint the left strip of the original
    out = pipe.edit(EditRequest(src, "x", mask=mask, expand=(0, 0, 8, 0), fill="noise", seed=2, steps=2))[0]
    img, ref = _px(out.image), _px(src)
    np.testing.assert_array_equal(img[:, 8:32], ref[:, 8:])
    assert np.abs(img[:, :8] - ref[:, :8]).mean() > 10
    assert out.record["fill"] == "noise" and "mask" in out.record


# ------------------------------------------------------------------------------------------------ errors


def _bad_file(tmp_path: Path) -> Path:
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return p


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": "missing.png"}, "missing.png: no such file"),
        ({"image": "BROKEN"}, "not a readable image"),
        ({"mask": "BROKEN"}, "mask .*not a readable image"),
        ({"mask": _box_mask(0, 0, 4, 4, (30, 32))}, "mask is 30x32 but the image is 32x32"),
        ({"mask": _box_mask(0, 0, 4, 4, (40, 32)), "expand": (8, 0, 0, 0)}, "size of the original image"),
        ({"image": _source(size=(30, 32))}, "multiples of 4.*width of 28 or 32"),
        ({"image": _source(size=(32, 34)), "strength": 0.0}, "height of 32 or 36"),
        ({"expand": (0, 6, 0, 0)}, "expand top = 6 is not a multiple of 4.*use 4 or 8"),
        ({"expand": (-4, 0, 0, 0)}, "expand left must be >= 0"),
        ({"strength": 1.5}, r"strength must lie in \[0, 1\]"),
        ({"strength": -0.1}, r"strength must lie in \[0, 1\]"),
        ({"strength": math.nan}, r"strength must lie in \[0, 1\]"),
        ({"mask": _box_mask(0, 0, 0, 0)}, "mask is all black.*nothing to repaint"),
        ({"fill": "blur", "expand": (4, 0, 0, 0)}, "unknown fill 'blur'"),
        ({"feather": -1, "mask": _box_mask(0, 0, 4, 4)}, "feather must be a whole number of pixels >= 0"),
        ({"feather": 1.5, "mask": _box_mask(0, 0, 4, 4)}, "feather must be a whole number of pixels >= 0"),
        ({"expand": (0, 0, 0, 0)}, "expand 0,0,0,0 adds nothing"),
        ({"expand": (0, 0, 4, 0), "strength": 0.0}, "the expanded area would stay its raw fill"),
        ({"expand": (0, 0, 4 * 10**14, 0)}, "expanded canvas would be 400000000000032x32.*expand by less"),
    ],
)
def test_bad_edits_are_clear_errors(pipe: Pipeline, tmp_path: Path, change: dict, message: str) -> None:
    change = {k: (_bad_file(tmp_path) if v == "BROKEN" else v) for k, v in change.items()}
    request = EditRequest(**{"image": _source(), "prompt": "x", "steps": 1, "seed": 0, **change})
    with pytest.raises(EditError, match=message):
        pipe.edit(request)


def test_generation_errors_apply_to_edits(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="unknown sampler"):
        pipe.edit(EditRequest(_source(), "x", sampler="ddim"))


def test_edit_request_carries_every_generation_field() -> None:
    """Pipeline.edit copies the generation settings by name; a field added to one must reach the other
    (the hires fix's are the exception: an edit has no second pass)."""
    edit_fields = {f.name for f in fields(EditRequest)}
    missing = {f.name for f in fields(GenerationRequest)} - {"width", "height", *HIRES_FIELDS} - edit_fields
    assert not missing, f"EditRequest lacks {missing}"


# ----------------------------------------------------------------------------------- records and reproduce


def test_edit_records_round_trip_and_reproduce(pipe: Pipeline, tmp_path: Path) -> None:
    src_path, mask_path = tmp_path / "src.png", tmp_path / "mask.png"
    _source().save(src_path)
    _box_mask(4, 4, 20, 28).convert("RGB").save(mask_path)
    out = pipe.edit(
        EditRequest(src_path, "two yellow stars", mask=mask_path, strength=0.8, seed=7, steps=2, num_images=2)
    )
    path = save_png(out[1].image, out[1].record, tmp_path / "edit.png")
    record = read_record(path)
    assert record == out[1].record
    assert record["mode"] == "inpaint" and record["strength"] == 0.8 and record["expand"] is None
    assert record["batch_seeds"] == [7, 8] and record["batch_index"] == 1
    assert set(record["source_image"]) == {"sha256", "width", "height"} and set(record["mask"]) == {"sha256"}
    assert "Denoising strength: 0.8" in parameters_text(record)

    with pytest.raises(GenerationError, match=r"edit \(inpaint\).*--source SRC --mask MASK"):
        reproduce(pipe, record)
    with pytest.raises(GenerationError, match="used a mask"):
        reproduce(pipe, record, source=src_path)
    with pytest.raises(GenerationError, match="not the one this edit was made from"):
        reproduce(pipe, record, source=_source(seed=9), mask=mask_path)
    with pytest.raises(GenerationError, match="mask is not the one"):
        reproduce(pipe, record, source=src_path, mask=_box_mask(4, 4, 20, 24))
    # The same pixels from any equivalent copy of the source (here: re-saved as RGBA).
    _source().convert("RGBA").save(tmp_path / "src-rgba.png")
    again = reproduce(pipe, record, source=tmp_path / "src-rgba.png", mask=mask_path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(again.image))


def test_outpaint_reproduces_and_generation_records_have_no_edit_fields(pipe: Pipeline) -> None:
    src = _source()
    out = pipe.edit(EditRequest(src, "x", expand=(4, 4, 4, 4), seed=1, steps=2))[0]
    again = reproduce(pipe, out.record, source=src)
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(again.image))
    with pytest.raises(GenerationError, match="used no mask"):
        reproduce(pipe, out.record, source=src, mask=_box_mask(0, 0, 4, 4))
    record = pipe.generate(GenerationRequest("x", seed=1, steps=1))[0].record
    assert not {"mode", "strength", "source_image", "mask", "expand"} & set(record)
