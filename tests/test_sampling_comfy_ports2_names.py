"""The names of ComfyUI's samplers of 2025 that pictor runs (tests/test_sampling_comfy_ports2.py tests their
loops): a ComfyUI workflow's sampler_name, A1111's infotext and API names, the CLI's choices, and the pipeline
(generation, seeded noise, CFG++ refusals, PNG round trips with variation seeds, previews, inpainting, hires
fix and first-block cache)."""

from __future__ import annotations

from typing import Any

import pytest

# ------------------------------------------------------------------------------------------------ names

ADDED = {
    "gradient_estimation_cfg_pp": "Gradient Estimation CFG++",
    "exp_heun_2_x0": "Exp Heun 2 X0",
    "exp_heun_2_x0_sde": "Exp Heun 2 X0 SDE",
    "seeds_2": "SEEDS 2",
    "seeds_3": "SEEDS 3",
}


@pytest.mark.parametrize("name", sorted(ADDED))
def test_comfyui_workflow_names_are_taken(name: str) -> None:
    from tests.test_comfy_workflow_import import comfy, flux_ksampler_graph

    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert got.values["sampler"] == name and got.sampler_name is None
    said = [n for n in got.notices if "sampler" in n and name in n]
    # ComfyUI's gradient estimation CFG++ weighs its guidance term by 1, pictor's by 1 - t': said
    assert len(said) == (name == "gradient_estimation_cfg_pp")
    assert all("1 - t'" in n for n in said)


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive", "ddpm", "ddim"])  # sa_solver: its own test
def test_comfyui_samplers_pictor_lacks_stay_unknown(name: str) -> None:
    from tests.test_comfy_workflow_import import comfy, flux_ksampler_graph

    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert "sampler" not in got.values and got.sampler_name == name


@pytest.mark.parametrize(
    ("text", "name"),
    [
        *((shown, name) for name, shown in ADDED.items()),
        *((shown.lower(), name) for name, shown in ADDED.items()),
        *((name, name) for name in ADDED),
        ("DPM++ 2S a CFG++", "dpmpp_2s_ancestral_cfg_pp"),
        ("DPM++ 2S a CFG++ Karras", "dpmpp_2s_ancestral_cfg_pp"),
        ("IPNDM V", "ipndm_v"),
        ("iPNDM V", "ipndm_v"),
        ("SEEDS 2 Karras", "seeds_2"),
    ],
)
def test_a1111_infotext_and_api_names(text: str, name: str) -> None:
    from pictor.provenance import SAMPLER_DISPLAY
    from pictor.serve.a1111_names import sampler_list, sampler_of
    from pictor.settings_import import settings_from_parameters
    from tests.test_settings_import import FORGE

    got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
    assert got.values["sampler"] == name and got.sampler_name is None
    assert got.values.get("schedule") == ("karras" if text.endswith("Karras") else None)
    assert sampler_of(text) == (name, "karras" if text.endswith("Karras") else None)
    assert SAMPLER_DISPLAY[name] in {s["name"] for s in sampler_list()}


def test_a1111_api_refuses_a_sampler_pictor_lacks() -> None:
    from pictor.serve.a1111_names import sampler_of

    with pytest.raises(Exception, match=r"'ddim' is not one pictor runs"):
        sampler_of("ddim")


def test_cli_offers_them() -> None:
    import argparse

    from pictor.cli_options import add_sampler

    p = argparse.ArgumentParser()
    add_sampler(p)
    for name in ADDED:
        assert p.parse_args(["--sampler", name]).sampler == name


# ------------------------------------------------------------------------------------ through the pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pictor.loading import load

    from tiny_bundle import saved_tiny_bundle

    return load(str(saved_tiny_bundle(tmp_path_factory.mktemp("ports2"), "tiny-cfg-pp")), device="cpu")


@pytest.mark.parametrize("sampler", sorted(ADDED))
def test_generates_through_the_pipeline(pipe: Any, sampler: str) -> None:
    import warnings

    from pictor.generation_request import GenerationRequest

    req = {"seed": 5, "steps": 3, "width": 32, "height": 32, "negative_prompt": "blue", "guidance": 4.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pipe.generate(GenerationRequest("a red circle", sampler=sampler, **req))[0]
        b = pipe.generate(GenerationRequest("a red circle", sampler=sampler, **req))[0]
    assert a.record["sampler"] == sampler
    assert a.image.tobytes() == b.image.tobytes()  # the seed fixes the stochastic ones' noise too


def test_gradient_estimation_cfg_pp_is_refused_where_it_cannot_apply(pipe: Any, monkeypatch: Any) -> None:
    from pictor.generation_request import GenerationError, GenerationRequest
    from pictor.guidance_methods import GuidanceMethod
    from pictor.serve.pipeline_errors import field_of

    settings = {"width": 32, "height": 32, "steps": 4, "sampler": "gradient_estimation_cfg_pp"}
    interval = GuidanceMethod(start=0.25)
    with pytest.raises(
        GenerationError, match=r"gradient_estimation_cfg_pp is a CFG\+\+ sampler.*0\.25-1"
    ) as e:
        pipe.resolve_request(GenerationRequest("a", **settings, guidance_method=interval))
    assert field_of(str(e.value)) == "sampler"
    monkeypatch.setattr(pipe, "guidance_mode", "distilled")
    with pytest.raises(GenerationError, match=r"gradient_estimation_cfg_pp is a CFG\+\+.*guidance-distilled"):
        pipe.resolve_request(GenerationRequest("a", **settings))


def _round_trip(pipe: Any, image: Any, record: dict, path: Any, **sources: Any) -> None:
    import numpy as np
    from PIL import Image

    from pictor.provenance import read_record, save_png
    from pictor.reproduce import reproduce

    saved = save_png(image, record, path)
    again = reproduce(pipe, read_record(saved), **sources)
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(again.image))


@pytest.mark.parametrize("sampler", sorted(ADDED))
def test_png_round_trip_with_variation_seeds_and_previews(pipe: Any, sampler: str, tmp_path: Any) -> None:
    """generate -> PNG -> reproduce gives the same pixels (the stochastic ones' noise comes from the seed),
    with a variation seed; the A1111 text names the sampler; live previews come once a step, in order."""
    import dataclasses
    import warnings

    import numpy as np

    from pictor.generation_request import GenerationRequest
    from pictor.latent_preview import Previews
    from pictor.provenance import parameters_text

    frames: list[int] = []
    steps: list[int] = []
    previews = Previews(on_frame=lambda pictures, first: frames.append(len(pictures)))
    req = GenerationRequest(
        "a red circle", sampler=sampler, seed=5, steps=3, width=32, height=32, negative_prompt="blue",
        guidance=4.0, num_images=2, variation_seed=9, variation_strength=0.3,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe.generate(req, progress=lambda done, total: steps.append(done), previews=previews)
        plain = pipe.generate(dataclasses.replace(req, variation_seed=None, variation_strength=None))
    assert steps == [1, 2, 3] and frames == [2, 2, 2]  # once a step (not a model call), both images
    assert f"Sampler: {ADDED[sampler]}," in parameters_text(out[1].record)
    assert out[1].record["variation_seed"] == 10
    assert not np.array_equal(np.asarray(out[1].image), np.asarray(plain[1].image))
    _round_trip(pipe, out[1].image, out[1].record, tmp_path / "x.png")


def test_exp_heun_inpaints_from_noise_and_reproduces(pipe: Any, tmp_path: Any) -> None:
    """exp_heun_2_x0 is deterministic: an inpainting (strength 1, from t = 1) blends its known region along
    the noising path; the outside stays byte for byte and the PNG reproduces."""
    import numpy as np
    from PIL import Image

    from pictor.editing import EditRequest

    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[4:20, 6:26] = 255
    mask = Image.fromarray(mask_px)
    src.save(tmp_path / "src.png")
    mask.save(tmp_path / "mask.png")
    out = pipe.edit(EditRequest(src, "a red circle", mask=mask, seed=3, steps=4, sampler="exp_heun_2_x0"))[0]
    assert out.record["strength"] == 1.0
    keep = mask_px == 0
    np.testing.assert_array_equal(np.asarray(out.image)[keep], np.asarray(src)[keep])
    sources = {"source": tmp_path / "src.png", "mask": tmp_path / "mask.png"}
    _round_trip(pipe, out.image, out.record, tmp_path / "e.png", **sources)


@pytest.mark.parametrize("sampler", ["exp_heun_2_x0", "gradient_estimation_cfg_pp"])
def test_deterministic_ones_hires_and_block_cache_reproduce(pipe: Any, sampler: str, tmp_path: Any) -> None:
    # (the stochastic ones: tests/test_pipeline_samplers.py, for all of STOCHASTIC_SAMPLERS)
    import warnings

    from pictor.generation_request import GenerationRequest

    kw = {"seed": 8, "width": 32, "height": 32, "negative_prompt": "b", "guidance": 4.0, "sampler": sampler}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hires = pipe.generate(GenerationRequest("a red circle", steps=3, hires_scale=1.5, **kw))[0]
        cached = pipe.generate(GenerationRequest("a red circle", steps=4, cache_threshold=0.3, **kw))[0]
    assert hires.record["sampler"] == sampler and cached.record["cache_threshold"] == 0.3
    _round_trip(pipe, hires.image, hires.record, tmp_path / "h.png")
    _round_trip(pipe, cached.image, cached.record, tmp_path / "c.png")
