"""ComfyUI's sampler nodes with settings of their own (comfy_extras/nodes_custom_sampler.py and
nodes_advanced_samplers.py: SamplerEulerAncestral, SamplerDPMPP_2M_SDE, SamplerSEEDS2, ...), read for the
sampler a SamplerCustom or SamplerCustomAdvanced runs: as ComfyUI's sampler name (what KSamplerSelect would
give, mapped onto pictor's by `pictor.comfy_settings_import`), with its settings said where pictor does not
run them.

pictor's requests name a sampler but carry none of its keywords (eta, s_noise, ...): each sampler runs at
the settings ComfyUI's KSampler gives the sampler of that name, which are these nodes' defaults. A node at
those is taken silently; a setting that picks another of pictor's samplers (SamplerDPMPP_2M_SDE's
solver_type heun, SamplerSASolver's use_pece, SamplerSEEDS2's exponential Heun settings) is taken as that
sampler; any other is said in a notice naming what pictor's sampler runs at instead.

Separate from `pictor.comfy_sampling_nodes` (the sampling node, its prompts, noise and sigmas) because this
is a table of ComfyUI's node inputs and defaults, which grows with ComfyUI's nodes.
"""

from __future__ import annotations

import math

from pictor.comfy_graph import ComfyGraph

Setting = str | float | int | bool
Settings = dict[str, Setting]

# Node class -> (ComfyUI's sampler name, the settings pictor's sampler of that name runs at: the node's
# defaults in ComfyUI, each as its type there). noise_device (gpu or cpu) picks ComfyUI's *_gpu name or not:
# the same sampler with its Brownian noise drawn elsewhere (pictor draws its own from the seed either way).
SAMPLER_NODES: dict[str, tuple[str, Settings]] = {
    "SamplerEulerAncestral": ("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerEulerAncestralCFGPP": ("euler_ancestral_cfg_pp", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerEulerCFGpp": ("euler_cfg_pp", {}),  # version "regular"; "alternative" is another sampler
    "SamplerDPMPP_2S_Ancestral": ("dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerDPMPP_SDE": ("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5}),
    "SamplerDPMPP_2M_SDE": ("dpmpp_2m_sde", {"eta": 1.0, "s_noise": 1.0}),  # solver_type: the name
    "SamplerDPMPP_3M_SDE": ("dpmpp_3m_sde", {"eta": 1.0, "s_noise": 1.0}),
    "SamplerLMS": ("lms", {"order": 4}),
    # eta acts only in the Reverse-time SDE solver_type (its noise scaler x^(eta + 1)): compared there only
    "SamplerER_SDE": ("er_sde", {"solver_type": "ER-SDE", "max_stage": 3, "s_noise": 1.0}),
    "SamplerSASolver": (  # use_pece: the name
        "sa_solver",
        {
            "eta": 1.0,
            "sde_start_percent": 0.2,
            "sde_end_percent": 0.8,
            "s_noise": 1.0,
            "predictor_order": 3,
            "corrector_order": 4,
            "simple_order_2": False,
        },
    ),
    "SamplerSEEDS2": ("seeds_2", {"solver_type": "phi_1", "eta": 1.0, "s_noise": 1.0, "r": 0.5}),
    # no pictor sampler of this name: refused as KSampler's dpm_adaptive is (choose one with --sampler)
    "SamplerDPMAdaptative": ("dpm_adaptive", {}),
}
_GPU_NOISE = {"SamplerDPMPP_SDE", "SamplerDPMPP_2M_SDE", "SamplerDPMPP_3M_SDE"}
# SamplerSEEDS2's description names these settings as ComfyUI's exponential Heun samplers, which pictor has.
_EXP_HEUN = {"solver_type": "phi_2", "r": 1.0, "eta": 0.0}
_EXP_HEUN_SDE = {"solver_type": "phi_2", "r": 1.0, "eta": 1.0, "s_noise": 1.0}
# Sampler nodes whose sampler pictor has none of, with why: left as the node's class (no pictor sampler).
NOT_PICTORS = {
    "SamplerLCMUpscale": (
        "it upscales the latent between LCM steps and renoises as for a variance-exploding model "
        "(x + sigma noise), which pictor's lcm does not"
    ),
    "SamplerEulerCFGpp": (
        "its version 'alternative' is ComfyUI's own Euler CFG++ variant, not euler_cfg_pp (version 'regular')"
    ),
}


def read_sampler_node(graph: ComfyGraph, node: str, notices: list[str]) -> str | None:
    """The sampler a sampler node gives, as ComfyUI's sampler name (KSamplerSelect's sampler_name, or the
    name of the sampler a node with settings runs, module docstring); the node's class where pictor has no
    sampler for it (refused further on, as an unknown sampler_name); None where KSamplerSelect names none."""
    cls = graph.cls(node)
    if cls == "KSamplerSelect":
        return graph.value(node, "sampler_name", str, notices)
    if cls not in SAMPLER_NODES or (
        cls == "SamplerEulerCFGpp" and graph.value(node, "version", str, notices) == "alternative"
    ):
        if cls in NOT_PICTORS:
            notices.append(f"{graph.name(node)} is not one of pictor's samplers: {NOT_PICTORS[cls]}")
        return cls
    name, runs = SAMPLER_NODES[cls]
    given = {key: _read(graph, node, key, default, notices) for key, default in runs.items()}
    name, runs, given = _variant(graph, node, name, runs, given, notices)
    differ = [key for key, value in given.items() if key not in runs or not _same(value, runs[key])]
    if differ:
        notices.append(
            f"{graph.name(node)} sets {_text({k: given[k] for k in differ})}, which pictor does not take (a "
            f"request carries no sampler settings): pictor's {name} is taken, at its own {_text(runs)}"
        )
    if cls in _GPU_NOISE and graph.value(node, "noise_device", str, notices) != "cpu":
        return f"{name}_gpu"  # ComfyUI's default, gpu (the combo's first option)
    return name


def _variant(
    graph: ComfyGraph, node: str, name: str, runs: Settings, given: Settings, notices: list[str]
) -> tuple[str, Settings, Settings]:
    """The sampler a node's settings pick where they pick another of pictor's, with the settings that
    sampler runs at and those of the node that bear on it."""
    cls = graph.cls(node)
    if cls == "SamplerDPMPP_2M_SDE" and graph.value(node, "solver_type", str, notices) == "heun":
        return "dpmpp_2m_sde_heun", runs, given
    if cls == "SamplerSASolver" and graph.value(node, "use_pece", bool, notices):
        return "sa_solver_pece", runs, given
    if cls == "SamplerSEEDS2" and given["solver_type"] == "phi_2" and _same(given["r"], 1.0):
        if _same(given["eta"], 0.0):  # an ODE: s_noise scales no noise
            return "exp_heun_2_x0", _EXP_HEUN, {k: given[k] for k in _EXP_HEUN}
        return "exp_heun_2_x0_sde", _EXP_HEUN_SDE, given
    if cls == "SamplerER_SDE":
        solver = given["solver_type"]
        eta = _read(graph, node, "eta", 1.0, notices)
        if solver == "ODE" or (solver == "Reverse-time SDE" and _same(eta, 0.0)):
            # ComfyUI zeroes eta and s_noise: an ODE whatever they say
            return name, runs, {"solver_type": "ODE", "max_stage": given["max_stage"]}
        if solver == "Reverse-time SDE":
            return name, runs, {**given, "eta": eta}
    return name, runs, given


def _read(graph: ComfyGraph, node: str, key: str, default: Setting, notices: list[str]) -> Setting:
    """Input `key` of `node` as its default's type; the default where the graph leaves it out (or where it
    comes from a node that works it out, with graph.value's notice)."""
    value = graph.value(node, key, type(default), notices)
    return default if value is None else value


def _same(value: Setting, default: Setting) -> bool:
    if isinstance(default, float) and not isinstance(value, (bool, str)):
        # the editor writes its float steps inexactly (0.30000000000000004)
        return math.isclose(float(value), default, rel_tol=1e-6, abs_tol=1e-9)
    return value == default


def _text(settings: Settings) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())
