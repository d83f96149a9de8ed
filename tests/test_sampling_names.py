"""The names of the samplers added from ComfyUI (ipndm_v, res_multistep_ancestral, er_sde): a ComfyUI
workflow's sampler_name maps onto them, and the A1111-style text pictor writes for them reads back."""

from __future__ import annotations

import pytest

from pictor.provenance import SAMPLER_DISPLAY
from pictor.sampling import CFG_PP_SAMPLERS, SAMPLERS
from pictor.settings_import import settings_from_parameters
from tests.test_comfy_workflow_import import comfy, flux_ksampler_graph
from tests.test_settings_import import FORGE

NEW = {
    "ipndm_v": "IPNDM_V",
    "res_multistep_ancestral": "Res Multistep Ancestral",
    "er_sde": "Extended Reverse-Time SDE",
}


def test_every_sampler_has_a_display_name() -> None:
    assert set(SAMPLER_DISPLAY) == set(SAMPLERS)


@pytest.mark.parametrize("name", sorted(NEW))
def test_comfyui_sampler_names_are_taken_as_they_are(name: str) -> None:
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert got.values["sampler"] == name and got.sampler_name is None
    said = [n for n in got.notices if "sampler" in n and name in n]
    # pictor's res_multistep_ancestral renoises along the flow path, ComfyUI's as a VE model: said
    assert len(said) == (name == "res_multistep_ancestral")


@pytest.mark.parametrize(("name", "shown"), sorted(NEW.items()))
def test_a1111_text_names_read_back(name: str, shown: str) -> None:
    assert SAMPLER_DISPLAY[name] == shown
    for text in (shown, shown.lower(), name):
        got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
        assert got.values["sampler"] == name and got.sampler_name is None


@pytest.mark.parametrize("text", ["ER SDE", "Extended Reverse SDE", "er sde", "Extended Reverse SDE Karras"])
def test_other_forks_er_sde_labels_read_back(text: str) -> None:
    got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
    assert got.values["sampler"] == "er_sde" and got.sampler_name is None
    assert got.values.get("schedule") == ("karras" if text.endswith("Karras") else None)
    assert SAMPLER_DISPLAY["er_sde"] == "Extended Reverse-Time SDE"  # what pictor writes stays Forge's


def test_the_server_names_every_sampler_and_stochastic_ones_as_such() -> None:
    """The API's `sampler` description lists each sampler (the OpenAPI page is where API users look), the
    stochastic ones after "or the stochastic"."""
    import re

    from pictor.sampling import SAMPLERS, is_stochastic
    from pictor.serve.generation_body import ImageGenerationRequest

    text = ImageGenerationRequest.model_fields["sampler"].description or ""
    plain, _, stochastic = text.partition("or the stochastic")
    named = {
        name: part
        for part, names in (("plain", plain), ("stochastic", stochastic.split("(")[0]))
        for name in re.findall(r"[a-z0-9_]+", names)
    }
    for name in SAMPLERS:
        assert named.get(name) == ("stochastic" if is_stochastic(name) else "plain"), name


CFG_PP_DIFFERENT = {
    "dpmpp_2m_cfg_pp",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation_cfg_pp",
}


@pytest.mark.parametrize("name", sorted(CFG_PP_SAMPLERS))
def test_comfyui_cfg_pp_names_are_taken_with_a_notice_where_pictors_differ(name: str) -> None:
    graph = flux_ksampler_graph()
    graph["3"]["inputs"]["sampler_name"] = name
    got = comfy(graph)
    assert got.values["sampler"] == name and got.sampler_name is None
    said = [n for n in got.notices if "sampler" in n and name in n]
    assert len(said) == (name in CFG_PP_DIFFERENT)
    assert all("1 - t'" in n for n in said)


@pytest.mark.parametrize("text", [*(SAMPLER_DISPLAY[n] for n in sorted(CFG_PP_SAMPLERS)), "Euler a CFG++"])
def test_a1111_cfg_pp_names_read_back(text: str) -> None:
    got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
    assert got.values["sampler"] in CFG_PP_SAMPLERS and got.sampler_name is None
    assert SAMPLER_DISPLAY[got.values["sampler"]] == text or text == "Euler a CFG++"


def test_a_cfg_pp_graph_at_cfg_1_keeps_its_negative_prompt_and_guidance_1() -> None:
    """ComfyUI's CFG++ samplers run the negative pass at CFG 1 (disable_cfg1_optimization), as pictor's do:
    the graph's negative prompt and CFG 1 are taken; TCFG there is said not to be (pictor's guidance methods
    act above guidance 1). A plain sampler at CFG 1 still drops the negative prompt."""
    graph = flux_ksampler_graph()
    del graph["35"]  # no FluxGuidance: real CFG
    graph["3"]["inputs"].update(sampler_name="euler_cfg_pp", positive=["6", 0])
    graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}}
    got = comfy(graph)
    assert got.values["sampler"] == "euler_cfg_pp"
    assert got.values["negative"] == "blurry" and got.values["guidance"] == 1
    graph["3"]["inputs"]["sampler_name"] = "euler"
    got = comfy(graph)
    assert got.values["negative"] == "" and "guidance" not in got.values
    assert any("negative prompt 'blurry' is not taken" in n for n in got.notices)
