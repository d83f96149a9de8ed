"""The names of the samplers added from ComfyUI (ipndm_v, res_multistep_ancestral, er_sde): a ComfyUI
workflow's sampler_name maps onto them, and the A1111-style text pictor writes for them reads back."""

from __future__ import annotations

import pytest

from pictor.provenance import SAMPLER_DISPLAY
from pictor.sampling import SAMPLERS
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
    assert not [n for n in got.notices if "sampler" in n and name in n]


@pytest.mark.parametrize(("name", "shown"), sorted(NEW.items()))
def test_a1111_text_names_read_back(name: str, shown: str) -> None:
    assert SAMPLER_DISPLAY[name] == shown
    for text in (shown, shown.lower(), name):
        got = settings_from_parameters(FORGE.replace("Sampler: Euler", f"Sampler: {text}"))
        assert got.values["sampler"] == name and got.sampler_name is None
