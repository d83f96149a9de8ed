"""The samplers through Pipeline: the stochastic ones' fresh noise (all of STOCHASTIC_SAMPLERS) keeps
images seeded, batch-independent and reproducible (generation, hires fix, first-block cache, inpainting);
the deterministic multistep ones (unipc, deis, ipndm, res_multistep, lms, dpm_2, heunpp2,
gradient_estimation, ipndm_v) run, inpaint and reproduce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pictor
from pictor.editing import EditRequest
from pictor.pipeline import GenerationRequest, Pipeline, step_noise_seed
from pictor.provenance import parameters_text, read_record, save_png
from pictor.reproduce import reproduce
from pictor.sampling import STOCHASTIC_SAMPLERS

STOCHASTIC = sorted(STOCHASTIC_SAMPLERS)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return pictor.load("tiny", device="cpu")


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _reproduces(pipe: Pipeline, image: Image.Image, record: dict, path: Path, **sources: object) -> None:
    saved = save_png(image, record, path)
    again = reproduce(pipe, read_record(saved), **sources)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(again.image))


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_image_i_is_the_same_alone_and_in_a_batch(pipe: Pipeline, sampler: str) -> None:
    kw = dict(prompt="a red circle", negative_prompt="a blue square", steps=4, sampler=sampler)
    batched = pipe.generate(GenerationRequest(seed=10, num_images=3, **kw))  # type: ignore[arg-type]
    singles = [pipe.generate(GenerationRequest(seed=10 + i, **kw))[0] for i in range(3)]  # type: ignore[arg-type]
    for g, single in zip(batched, singles, strict=True):
        # as tests/test_pipeline.py: only BLAS rounding may differ between batch shapes
        diff = np.abs(_px(g.image) - _px(single.image))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.995
        assert g.record["sampler"] == sampler
    assert np.abs(_px(singles[0].image) - _px(singles[1].image)).mean() > 5  # different seeds
    again = pipe.generate(GenerationRequest(seed=10, num_images=3, **kw))  # type: ignore[arg-type]
    for a, b in zip(batched, again, strict=True):  # the same seed: the same pixels
        np.testing.assert_array_equal(_px(a.image), _px(b.image))


def test_ancestral_noise_changes_the_image_and_leaves_the_initial_noise_alone(pipe: Pipeline) -> None:
    base = dict(prompt="two green stars", seed=3, steps=4)
    euler = _px(pipe.generate(GenerationRequest(**base))[0].image)  # type: ignore[arg-type]
    stochastic = {s: _px(pipe.generate(GenerationRequest(**base, sampler=s))[0].image) for s in STOCHASTIC}  # type: ignore[arg-type]
    for name, image in stochastic.items():
        assert np.abs(euler - image).mean() > 1, name
    assert np.abs(stochastic["dpmpp_2m_sde"] - stochastic["lcm"]).mean() > 1
    # The step noise is per image, per pass and per step, and is not the initial noise of any of them.
    shape = (16, 8)
    both = pipe.step_noise([3, 4], shape)
    alone = pipe.step_noise([4], shape)
    torch.testing.assert_close(both(2)[1:], alone(2), atol=0, rtol=0)
    assert not torch.equal(both(2), both(3))
    assert not torch.equal(both(2), pipe.step_noise([3, 4], shape, noise_pass=1)(2))
    initial = pipe.initial_noise([3], 4, 4)  # [1, C, 4, 4]
    first = pipe.step_noise([3], (initial[0].numel(),))(0)
    assert not torch.equal(first.flatten(), initial.flatten())
    assert step_noise_seed(3, 0, 0) != step_noise_seed(3, 0, 1) != step_noise_seed(3, 1, 1)


# A1111's names (IPNDM, Res Multistep and HeunPP2 reForge's)
DISPLAY = {
    "euler_ancestral": "Euler a",
    "unipc": "UniPC",
    "deis": "DEIS",
    "ipndm": "IPNDM",
    "res_multistep": "Res Multistep",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "lcm": "LCM",
    "lms": "LMS",
    "dpm_2": "DPM2",
    "heunpp2": "HeunPP2",
    "gradient_estimation": "Gradient Estimation",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ipndm_v": "IPNDM_V",
    "res_multistep_ancestral": "Res Multistep Ancestral",
    "er_sde": "Extended Reverse-Time SDE",
}
# The deterministic samplers added with the k-diffusion set: their inpainting blends the known region
# along its noising path (`blend_velocity`), which every consistent step keeps exactly; ipndm_v's uneven
# steps do not, and it puts the region back on the path after each step (`keep_known`).
NEW_DETERMINISTIC = ("lms", "dpm_2", "heunpp2", "gradient_estimation", "ipndm_v")


@pytest.mark.parametrize("sampler", list(DISPLAY))
def test_new_samplers_reproduce_bit_exactly_from_png(pipe: Pipeline, sampler: str, tmp_path: Path) -> None:
    images = pipe.generate(
        GenerationRequest("two yellow stars", seed=5, num_images=3, steps=5, sampler=sampler)
    )
    assert images[2].record["sampler"] == sampler
    display = DISPLAY[sampler]
    assert f"Sampler: {display}," in parameters_text(images[2].record)
    _reproduces(pipe, images[2].image, images[2].record, tmp_path / "x.png")


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_hires_and_block_cache_reproduce(pipe: Pipeline, sampler: str, tmp_path: Path) -> None:
    request = GenerationRequest(
        "a blue square", seed=8, num_images=2, steps=3, sampler=sampler, hires_scale=1.5
    )
    images = pipe.generate(request)
    _reproduces(pipe, images[1].image, images[1].record, tmp_path / "hires.png")
    cached = pipe.generate(
        GenerationRequest("a blue square", seed=8, steps=4, sampler=sampler, cache_threshold=0.3)
    )
    assert cached[0].record["cache_threshold"] == 0.3
    _reproduces(pipe, cached[0].image, cached[0].record, tmp_path / "cached.png")


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_inpainting_keeps_the_outside_and_reproduces(
    pipe: Pipeline, sampler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pipeline gives a renoising sampler the anchored velocity: in the known region its data prediction
    # x - t v is the source's latents at any x (the straight path's blend would not be, off the path).
    from pictor.edit_blending import LatentInit

    seen: list[tuple[LatentInit, Any]] = []
    velocity = LatentInit.velocity

    def spy(self: LatentInit, fn: Any, noise: torch.Tensor, anchored: bool = False) -> Any:
        out = velocity(self, fn, noise, anchored)
        seen.append((self, out))
        return out

    monkeypatch.setattr(LatentInit, "velocity", spy)
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[6:20, 8:24] = 255
    mask = Image.fromarray(mask_px)
    src.save(tmp_path / "src.png")
    mask.save(tmp_path / "mask.png")
    out = pipe.edit(
        EditRequest(src, "a red circle", mask=mask, strength=0.8, seed=2, steps=4, sampler=sampler)
    )
    (init, fn), x = seen[0], torch.randn_like(seen[0][0].z0)
    assert init.mask is not None and bool((~init.mask).any())
    with torch.inference_mode():
        predicted = x - 0.5 * fn(x, torch.tensor([0.5]))
    assert torch.allclose(predicted[~init.mask], init.z0[~init.mask], atol=1e-5)
    keep = mask_px == 0
    np.testing.assert_array_equal(_px(out[0].image)[keep], _px(src)[keep])
    assert np.abs(_px(out[0].image)[~keep] - _px(src)[~keep]).mean() > 5
    _reproduces(
        pipe,
        out[0].image,
        out[0].record,
        tmp_path / "edit.png",
        source=tmp_path / "src.png",
        mask=tmp_path / "mask.png",
    )


@pytest.mark.parametrize("sampler", NEW_DETERMINISTIC)
def test_new_deterministic_samplers_inpaint_and_reproduce(
    pipe: Pipeline, sampler: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[4:20, 6:26] = 255
    mask = Image.fromarray(mask_px)
    src.save(tmp_path / "src.png")
    mask.save(tmp_path / "mask.png")
    out = pipe.edit(
        EditRequest(src, "a red circle", mask=mask, strength=0.8, seed=3, steps=4, sampler=sampler)
    )
    keep = mask_px == 0
    np.testing.assert_array_equal(_px(out[0].image)[keep], _px(src)[keep])
    assert np.abs(_px(out[0].image)[~keep] - _px(src)[~keep]).mean() > 5
    assert out[0].record["sampler"] == sampler
    _reproduces(
        pipe,
        out[0].image,
        out[0].record,
        tmp_path / "edit.png",
        source=tmp_path / "src.png",
        mask=tmp_path / "mask.png",
    )
