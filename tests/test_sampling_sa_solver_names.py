"""The names of SA-Solver (tests/test_sampling_sa_solver.py tests its loop): a ComfyUI workflow's sampler_name
(with the notice where its model's shift moves the SDE interval), A1111's infotext and API names, the CLI's
choices, the server's description, and a generation through the pipeline that its PNG reproduces."""

from __future__ import annotations

from typing import Any

import pytest

# reForge's labels (modules_forge/forge_alter_samplers.py), which pictor writes
DISPLAY = {"sa_solver": "SA-Solver", "sa_solver_pece": "SA-Solver-Pece"}


@pytest.mark.parametrize("name", sorted(DISPLAY))
def test_comfyui_workflow_names_are_taken(name: str) -> None:
    from tests.test_comfy_workflow_import import comfy, flux_ksampler_graph

    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert got.values["sampler"] == name and got.sampler_name is None
    assert not [n for n in got.notices if "SDE interval" in n]  # no ModelSamplingFlux: shift 1.15, as pictor


@pytest.mark.parametrize(("size", "said"), [((1024, 1024), False), ((512, 512), True), ((64, 48), True)])
def test_a_model_sampling_flux_at_another_size_is_said(size: tuple[int, int], said: bool) -> None:
    from tests.test_comfy_workflow_import import comfy, flux_ksampler_graph, node

    graph = flux_ksampler_graph()
    width, height = size
    graph["27"]["inputs"].update(width=width, height=height)
    graph["30"] = node(
        "ModelSamplingFlux", model=["4", 0], max_shift=1.15, base_shift=0.5, width=width, height=height
    )
    graph["3"]["inputs"].update(sampler_name="sa_solver_pece", model=["30", 0])
    got = comfy(graph)
    assert got.values["sampler"] == "sa_solver_pece"
    notes = [n for n in got.notices if "SDE interval" in n]
    assert len(notes) == said
    if said:
        assert "sa_solver_pece" in notes[0] and "1.15" in notes[0] and f"{width}x{height}" in notes[0]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("SA-Solver", "sa_solver"),
        ("SA-Solver-Pece", "sa_solver_pece"),
        ("SA-Solver PECE", "sa_solver_pece"),
        ("sa-solver pece", "sa_solver_pece"),
        ("SA-Solver Karras", "sa_solver"),
        ("SA-Solver PECE Karras", "sa_solver_pece"),
        ("sa_solver", "sa_solver"),
        ("sa_solver_pece", "sa_solver_pece"),
    ],
)
def test_a1111_infotext_and_api_names(text: str, name: str) -> None:
    from pictor.provenance import SAMPLER_DISPLAY
    from pictor.serve.a1111_names import sampler_list, sampler_of
    from pictor.settings_import import settings_from_parameters
    from tests.test_settings_import import FORGE

    karras = "karras" if text.endswith("Karras") else None
    got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
    assert got.values["sampler"] == name and got.sampler_name is None
    assert got.values.get("schedule") == karras
    assert sampler_of(text) == (name, karras)
    assert SAMPLER_DISPLAY[name] == DISPLAY[name]
    assert DISPLAY[name] in {s["name"] for s in sampler_list()}


def test_cli_and_server_offer_them() -> None:
    import argparse

    from pictor.cli_options import add_sampler
    from pictor.serve.generation_body import ImageGenerationRequest

    p = argparse.ArgumentParser()
    add_sampler(p)
    description = ImageGenerationRequest.model_fields["sampler"].description or ""
    for name in DISPLAY:
        assert p.parse_args(["--sampler", name]).sampler == name
        assert f" {name} " in description or f" {name}," in description


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pictor.loading import load

    from tiny_bundle import saved_tiny_bundle

    return load(str(saved_tiny_bundle(tmp_path_factory.mktemp("sa"), "tiny-cfg-pp")), device="cpu")


@pytest.mark.parametrize("sampler", sorted(DISPLAY))
def test_generates_and_reproduces_from_png(pipe: Any, sampler: str, tmp_path: Any) -> None:
    import warnings

    import numpy as np
    from PIL import Image

    from pictor.generation_request import GenerationRequest
    from pictor.provenance import parameters_text, read_record, save_png
    from pictor.reproduce import reproduce

    req = {"seed": 5, "steps": 4, "width": 32, "height": 32, "negative_prompt": "blue", "guidance": 4.0}
    steps: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe.generate(
            GenerationRequest("a red circle", sampler=sampler, **req), progress=lambda d, t: steps.append(d)
        )[0]
        other = pipe.generate(GenerationRequest("a red circle", sampler=sampler, **{**req, "seed": 6}))[0]
    assert steps == [1, 2, 3, 4]  # once a step, PECE's second calls included
    assert out.record["sampler"] == sampler
    assert f"Sampler: {DISPLAY[sampler]}," in parameters_text(out.record)
    assert out.image.tobytes() != other.image.tobytes()
    saved = save_png(out.image, out.record, tmp_path / "x.png")
    again = reproduce(pipe, read_record(saved))
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(again.image))
