"""ComfyUI's sampler nodes with settings of their own (SamplerEulerAncestral, SamplerSEEDS2, ...) in
SamplerCustom(Advanced) graphs, read by `pictor.comfy_sampler_settings`: at ComfyUI's defaults taken silently
as pictor's sampler, settings that pick another pictor sampler taken as it, any other said; and
SamplerCustom's add_noise and noise_seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from pictor.cli import main
from pictor.comfy_sampler_settings import SAMPLER_NODES
from pictor.imported_settings import ImportedSettings
from pictor.provenance import read_record
from pictor.settings_import import settings_from_comfy

Graph = dict[str, dict[str, Any]]


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def custom_graph(sampler: dict[str, Any], *, size: int = 1024, steps: int = 20) -> Graph:
    """ComfyUI's FLUX.1 [dev] SamplerCustomAdvanced example with `sampler` as node 16."""
    return {
        "6": node("CLIPTextEncode", text="a harbour at dusk", clip=["11", 0]),
        "8": node("VAEDecode", samples=["13", 0], vae=["10", 0]),
        "9": node("SaveImage", filename_prefix="ComfyUI", images=["8", 0]),
        "10": node("VAELoader", vae_name="ae.safetensors"),
        "11": node("DualCLIPLoader", clip_name1="t5.safetensors", clip_name2="l.safetensors", type="flux"),
        "12": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
        "13": node(
            "SamplerCustomAdvanced",
            noise=["25", 0],
            guider=["22", 0],
            sampler=["16", 0],
            sigmas=["17", 0],
            latent_image=["27", 0],
        ),
        "16": sampler,
        "17": node("BasicScheduler", scheduler="simple", steps=steps, denoise=1.0, model=["12", 0]),
        "22": node("BasicGuider", model=["12", 0], conditioning=["26", 0]),
        "25": node("RandomNoise", noise_seed=219670278747233),
        "26": node("FluxGuidance", guidance=2.5, conditioning=["6", 0]),
        "27": node("EmptySD3LatentImage", width=size, height=size, batch_size=1),
    }


def comfy(graph: Graph) -> ImportedSettings:
    return settings_from_comfy(json.dumps(graph))


def said(got: ImportedSettings) -> list[str]:
    """The notices about the sampler node (node 16)."""
    return [n for n in got.notices if "node 16" in n]


# Each node with all its inputs at ComfyUI's defaults (nodes_custom_sampler.py, nodes_advanced_samplers.py;
# a combo's default is its first option, a boolean's False), and the pictor sampler it is.
DEFAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "SamplerEulerAncestral": ({"eta": 1.0, "s_noise": 1.0}, "euler_ancestral"),
    "SamplerEulerAncestralCFGPP": ({"eta": 1.0, "s_noise": 1.0}, "euler_ancestral_cfg_pp"),
    "SamplerEulerCFGpp": ({"version": "regular"}, "euler_cfg_pp"),
    "SamplerDPMPP_2S_Ancestral": ({"eta": 1.0, "s_noise": 1.0}, "dpmpp_2s_ancestral"),
    "SamplerDPMPP_SDE": ({"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise_device": "gpu"}, "dpmpp_sde"),
    "SamplerDPMPP_2M_SDE": (
        {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0, "noise_device": "gpu"},
        "dpmpp_2m_sde",
    ),
    "SamplerDPMPP_3M_SDE": ({"eta": 1.0, "s_noise": 1.0, "noise_device": "gpu"}, "dpmpp_3m_sde"),
    "SamplerLMS": ({"order": 4}, "lms"),
    "SamplerER_SDE": ({"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0, "s_noise": 1.0}, "er_sde"),
    "SamplerSASolver": (
        {
            "model": ["12", 0],
            "eta": 1.0,
            "sde_start_percent": 0.2,
            "sde_end_percent": 0.8,
            "s_noise": 1.0,
            "predictor_order": 3,
            "corrector_order": 4,
            "use_pece": False,
            "simple_order_2": False,
        },
        "sa_solver",
    ),
    "SamplerSEEDS2": ({"solver_type": "phi_1", "eta": 1.0, "s_noise": 1.0, "r": 0.5}, "seeds_2"),
}


def test_every_node_pictor_has_is_in_the_defaults_table() -> None:
    assert set(SAMPLER_NODES) - {"SamplerDPMAdaptative"} == set(DEFAULTS)


@pytest.mark.parametrize("cls", sorted(DEFAULTS))
def test_a_sampler_node_at_its_defaults_is_taken_silently(cls: str) -> None:
    inputs, sampler = DEFAULTS[cls]
    got = comfy(custom_graph(node(cls, **inputs)))
    assert got.values["sampler"] == sampler and got.sampler_name is None
    assert said(got) == []
    # the editor's float steps (1.0000000000000002) and left-out inputs are the defaults too
    near = {k: v + 2e-16 if isinstance(v, float) else v for k, v in inputs.items()}
    assert said(comfy(custom_graph(node(cls, **near)))) == []
    assert said(comfy(custom_graph(node(cls)))) == []


# A setting pictor does not run, per node: (input, value, what the notice says of pictor's sampler).
NON_DEFAULTS = [
    ("SamplerEulerAncestral", "eta", 0.5, "euler_ancestral is taken, at its own eta 1, s_noise 1"),
    ("SamplerEulerAncestral", "s_noise", 1.2, "euler_ancestral is taken, at its own eta 1, s_noise 1"),
    ("SamplerEulerAncestralCFGPP", "eta", 0.0, "euler_ancestral_cfg_pp is taken, at its own eta 1"),
    ("SamplerDPMPP_2S_Ancestral", "s_noise", 0.9, "dpmpp_2s_ancestral is taken, at its own eta 1"),
    ("SamplerDPMPP_SDE", "r", 0.3, "dpmpp_sde is taken, at its own eta 1, s_noise 1, r 0.5"),
    ("SamplerDPMPP_2M_SDE", "eta", 0.0, "dpmpp_2m_sde is taken, at its own eta 1, s_noise 1"),
    ("SamplerDPMPP_3M_SDE", "s_noise", 0.8, "dpmpp_3m_sde is taken, at its own eta 1, s_noise 1"),
    ("SamplerLMS", "order", 2, "lms is taken, at its own order 4"),
    ("SamplerER_SDE", "max_stage", 2, "er_sde is taken, at its own solver_type ER-SDE, max_stage 3"),
    ("SamplerER_SDE", "s_noise", 0.0, "er_sde is taken, at its own solver_type ER-SDE, max_stage 3"),
    ("SamplerSASolver", "sde_end_percent", 0.9, "sa_solver is taken, at its own eta 1, sde_start_percent"),
    ("SamplerSASolver", "predictor_order", 2, "sa_solver is taken"),
    ("SamplerSASolver", "simple_order_2", True, "sa_solver is taken"),
    ("SamplerSEEDS2", "r", 0.7, "seeds_2 is taken, at its own solver_type phi_1, eta 1, s_noise 1, r 0.5"),
    ("SamplerSEEDS2", "eta", 0.0, "seeds_2 is taken"),
]


@pytest.mark.parametrize(("cls", "key", "value", "runs"), NON_DEFAULTS)
def test_a_setting_pictor_does_not_run_is_said_and_the_sampler_taken(
    cls: str, key: str, value: Any, runs: str
) -> None:
    inputs, sampler = DEFAULTS[cls]
    got = comfy(custom_graph(node(cls, **(inputs | {key: value})), size=1024))
    assert got.values["sampler"] == sampler
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    [notice] = said(got)
    assert notice.startswith(
        f"{cls} (node 16) sets {key} {shown}, which pictor does not take (a request carries no sampler "
        f"settings): pictor's {runs}"
    )


def test_settings_that_pick_another_pictor_sampler_are_taken_as_it() -> None:
    def sampler(cls: str, **changed: Any) -> tuple[str, list[str]]:
        got = comfy(custom_graph(node(cls, **(DEFAULTS[cls][0] | changed))))
        return got.values["sampler"], said(got)

    assert sampler("SamplerDPMPP_2M_SDE", solver_type="heun") == ("dpmpp_2m_sde_heun", [])
    assert sampler("SamplerDPMPP_2M_SDE", solver_type="heun", noise_device="cpu") == ("dpmpp_2m_sde_heun", [])
    assert sampler("SamplerDPMPP_3M_SDE", noise_device="cpu") == ("dpmpp_3m_sde", [])
    assert sampler("SamplerSASolver", use_pece=True) == ("sa_solver_pece", [])
    # SamplerSEEDS2's description: exp_heun_2_x0 is phi_2, r 1, eta 0 (s_noise then scales nothing) ...
    assert sampler("SamplerSEEDS2", solver_type="phi_2", r=1.0, eta=0.0, s_noise=3.0) == ("exp_heun_2_x0", [])
    # ... and exp_heun_2_x0_sde phi_2, r 1, eta 1, s_noise 1
    assert sampler("SamplerSEEDS2", solver_type="phi_2", r=1.0) == ("exp_heun_2_x0_sde", [])
    name, notices = sampler("SamplerSEEDS2", solver_type="phi_2", r=1.0, eta=0.5)
    assert name == "exp_heun_2_x0_sde"
    assert notices[0].endswith(
        "pictor's exp_heun_2_x0_sde is taken, at its own solver_type phi_2, r 1, eta 1, s_noise 1"
    )
    name, notices = sampler("SamplerSEEDS2", solver_type="phi_2")  # r 0.5: not an exponential Heun
    assert name == "seeds_2" and "sets solver_type phi_2," in notices[0]


def test_er_sde_solver_types() -> None:
    def notices(**changed: Any) -> list[str]:
        got = comfy(custom_graph(node("SamplerER_SDE", **(DEFAULTS["SamplerER_SDE"][0] | changed))))
        assert got.values["sampler"] == "er_sde"
        return said(got)

    assert notices(eta=0.3) == []  # ComfyUI's ER-SDE solver type does not read eta
    ode = "SamplerER_SDE (node 16) sets solver_type ODE, which pictor does not take"
    assert notices(solver_type="ODE")[0].startswith(ode)
    # ComfyUI's reverse-time SDE at eta 0 is its ODE, whatever s_noise says
    assert notices(solver_type="Reverse-time SDE", eta=0.0, s_noise=2.0)[0].startswith(ode)
    assert notices(solver_type="Reverse-time SDE", eta=0.5)[0].startswith(
        "SamplerER_SDE (node 16) sets solver_type Reverse-time SDE, eta 0.5, which pictor does not take"
    )


def test_a_setting_from_a_primitive_node_is_read_through_its_link() -> None:
    graph = custom_graph(node("SamplerEulerAncestral", eta=["40", 0], s_noise=1.0))
    graph["40"] = node("PrimitiveFloat", value=0.25)
    got = comfy(graph)
    assert got.values["sampler"] == "euler_ancestral"
    assert said(got)[0].startswith("SamplerEulerAncestral (node 16) sets eta 0.25,")


def test_sampler_nodes_pictor_has_no_sampler_for_are_refused_as_unknown_samplers() -> None:
    got = comfy(custom_graph(node("SamplerDPMAdaptative", order=3, rtol=0.05)))
    assert got.sampler_name == "dpm_adaptive" and "sampler" not in got.values  # as KSampler's dpm_adaptive
    got = comfy(
        custom_graph(node("SamplerLCMUpscale", scale_ratio=1.5, scale_steps=-1, upscale_method="area"))
    )
    assert got.sampler_name == "SamplerLCMUpscale" and "sampler" not in got.values
    assert said(got)[0].startswith("SamplerLCMUpscale (node 16) is not one of pictor's samplers: it upscales")
    got = comfy(custom_graph(node("SamplerEulerCFGpp", version="alternative")))
    assert got.sampler_name == "SamplerEulerCFGpp" and "sampler" not in got.values
    assert "its version 'alternative' is ComfyUI's own Euler CFG++ variant" in said(got)[0]
    got = comfy(custom_graph(node("SamplerSomeCustomPack", strength=0.4)))  # a custom node's sampler
    assert got.sampler_name == "SamplerSomeCustomPack" and said(got) == []


def test_sampler_custom_takes_its_noise_seed_unless_it_adds_no_noise() -> None:
    def custom(**inputs: Any) -> ImportedSettings:
        graph = custom_graph(node("SamplerEulerAncestral", eta=1.0, s_noise=1.0))
        graph["13"] = node(
            "SamplerCustom",
            model=["12", 0],
            cfg=1.0,
            positive=["26", 0],
            negative=["6", 0],
            sampler=["16", 0],
            sigmas=["17", 0],
            latent_image=["27", 0],
            **inputs,
        )
        return comfy(graph)

    got = custom(add_noise=True, noise_seed=123)
    assert (got.values["seed"], got.values["sampler"], got.values["guidance"]) == (
        123,
        "euler_ancestral",
        2.5,
    )
    assert custom(noise_seed=77).values["seed"] == 77  # add_noise left out: ComfyUI's default, True
    big = 2**64 - 5  # beyond pictor's seeds: its low 32 bits, with a notice
    assert custom(add_noise=True, noise_seed=big).values["seed"] == big % 2**32
    got = custom(add_noise=False, noise_seed=123)
    assert "seed" not in got.values
    assert "SamplerCustom (node 13) adds no noise (a later pass): its seed is not taken" in got.notices


def test_generate_from_a_comfyui_image_with_a_sampler_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = custom_graph(node("SamplerEulerAncestral", eta=0.5, s_noise=1.0), size=32, steps=2)
    graph["25"]["inputs"]["noise_seed"] = 5
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    png = tmp_path / "comfy.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    assert main(["generate", "--settings-from", str(png), "--model", "tiny", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    record = read_record(Path(out.out.split()[0]))
    assert (record["sampler"], record["seed"], record["steps"]) == ("euler_ancestral", 5, 2)
    assert (record["width"], record["height"], record["guidance"]) == (32, 32, 2.5)
    assert "SamplerEulerAncestral (node 16) sets eta 0.5, which pictor does not take" in out.err
