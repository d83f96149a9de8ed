"""ComfyUI's own PNG metadata, read for the settings of the picture it saved.

ComfyUI's SaveImage writes the graph that ran as a `prompt` text chunk, in its API format
(`pictor.comfy_graph`; its `workflow` chunk, the editor's layout of the same graph, says nothing more here).
`read_comfy_graph` finds the sampling node whose latent became the saved picture, follows its links to the
prompt, seed, steps, CFG, FLUX guidance, sampler, scheduler and size, and gives them in ComfyUI's own terms
(`ComfySettings`); `pictor.settings_import` maps those onto `pictor generate`'s options. Every other node on
the saved picture's path is named in a notice, not silently dropped.

The graph is data: nothing in it is run or evaluated, and only the node classes named here are understood.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pictor.comfy_graph import (
    SAMPLER_CLASSES,
    ComfyGraph,
    ComfyGraphError,
    final_sampler,
    id_order,
    listed,
    parse_graph,
    picture_path,
    shortened,
)

PROMPT_KEY = "prompt"
# Empty latents that say the picture's size: EmptyLatentImage, EmptySD3LatentImage (FLUX.1's, in ComfyUI's
# own FLUX workflows), EmptyHunyuanLatentImage and the like all hold width, height and batch_size.
EMPTY_LATENT = re.compile(r"^Empty\w*Latent\w*$")
# Inputs that name a model file: the model itself, and the text encoders and autoencoder beside it.
MODEL_INPUTS = ("ckpt_name", "unet_name")
COMPONENT_INPUTS = ("clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name")
# Nodes that only carry the latent to the saved file: decoding, and saving or showing the picture.
PLUMBING = {"VAEDecode", "VAEDecodeTiled", "SaveImage", "PreviewImage"}
# ModelSamplingFlux's defaults, at the picture's own size, are FLUX.1's resolution-dependent shift, which
# pictor's own (`flux`) schedule applies too; other values are a schedule pictor does not have. (Graphs
# carry the editor's float steps: 1.1500000000000001.)
FLUX_SHIFT_DEFAULTS = {"max_shift": 1.15, "base_shift": 0.5}
MAX_HOPS = 64  # links followed along one chain: more is a loop, or a graph not worth following


@dataclass
class ComfySettings:
    """What a ComfyUI graph says about its saved picture, in ComfyUI's terms (None: it does not say)."""

    prompt: str | None = None  # as ComfyUI's text encoder read it: its own weight syntax
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    guidance: float | None = None  # FLUX.1's distilled guidance (FluxGuidance, CLIPTextEncodeFlux)
    sampler_name: str | None = None  # ComfyUI's name: KSampler's sampler_name, or a sampler node's class
    scheduler: str | None = None  # ComfyUI's name, or the class of the node that made the sigmas
    size: tuple[int, int] | None = None
    batch_size: int | None = None
    # whether a ModelSampling... node (ModelSamplingFlux...) sets the schedule's shift on the model's way to
    # the sampler; without one, ComfyUI's FLUX.1 [dev] shifts by a constant 1.15 at every size
    model_sampling: bool = False
    # whether a TCFG node (Tangential Damping CFG) patches the model on its way to the sampler: pictor's
    # tcfg guidance method (see GUIDANCE_NODES)
    tcfg: bool = False
    notices: list[str] = field(default_factory=list)


@dataclass
class _Wiring:
    """The links into the sampling node that lead to its prompts and its starting latent."""

    positive: Any = None
    negative: Any = None
    latent: Any = None


# ComfyUI's model patches that change how CFG combines its predictions (comfy_extras), against pictor's
# guidance methods (`pictor.guidance_methods`, diffusers' guiders, on the velocity of a flow model, whose
# denoised prediction ComfyUI forms as x0 = x - sigma v). Only TCFG is the same: it projects the
# unconditional x - x0 = sigma v on the first right singular vector of its pair with the conditional one,
# which sigma does not change, and CFG is linear, so it is pictor's tcfg at the same scale. The others are
# said, with why they are not taken.
TCFG_NODE = "TCFG"
GUIDANCE_NODES = {
    "APG": (
        "ComfyUI's APG is not pictor's apg (diffusers'): it projects the guidance on the denoised (x0) "
        "prediction, not the velocity, clips the norm of the x0 difference (sigma times the velocity's), and "
        "adds it to the conditional prediction (cond + cfg x update) where diffusers add it to the "
        "unconditional one (uncond + cfg x update)"
    ),
    "CFGZeroStar": (
        "ComfyUI's CFGZeroStar is not pictor's cfg-zero-star (diffusers'): it scales the unconditional "
        "denoised (x0) prediction by the optimized scale, where diffusers scale the unconditional "
        "velocity (on a flow model the two differ by x (1 - scale)(1 - cfg) / sigma in the velocity at "
        "every step), and it has no zero-init steps"
    ),
    "RescaleCFG": (
        "ComfyUI's RescaleCFG is not pictor's guidance rescale: it rescales a v-prediction formed as for a "
        "model whose noisy latent is x0 + sigma noise (x / (sigma^2 + 1)), which a flow model's "
        "(1 - sigma) x0 + sigma noise is not, so its spreads are not those of the velocity pictor rescales"
    ),
    "CFGNorm": (
        "ComfyUI's CFGNorm (the CFG result's norm over channels capped at the conditional one's) has no "
        "pictor equivalent"
    ),
}


def read_comfy_graph(text: str) -> ComfySettings:
    """The settings of the picture a ComfyUI API graph (its `prompt` chunk) saved (module docstring)."""
    graph = parse_graph(text)
    out = ComfySettings()
    sampler, saved = final_sampler(graph, out.notices)
    graph.used.add(sampler)
    read = _read_ksampler if graph.cls(sampler).startswith("KSampler") else _read_custom_sampler
    wiring = read(graph, sampler, out)
    out.prompt, out.guidance = _conditioning(graph, wiring.positive, "prompt", out.notices)
    if wiring.negative is not None:
        out.negative, _ = _conditioning(graph, wiring.negative, "negative prompt", out.notices)
    _latent(graph, wiring.latent, out)
    before = graph.ancestors(sampler)
    out.model_sampling = any(graph.cls(n).startswith("ModelSampling") for n in before)
    out.tcfg = any(graph.cls(n) == TCFG_NODE for n in before)
    graph.used.update(n for n in before if graph.cls(n) == TCFG_NODE)  # taken, or said, by settings_import
    scope = before | picture_path(graph, sampler, saved)
    out.notices.extend(_file_notices(graph, scope))
    out.notices.extend(_shift_notices(graph, scope, out.size))
    out.notices.extend(_guidance_notices(graph, before))
    out.notices.extend(_leftover_notice(graph, scope))
    return out


def _read_ksampler(graph: ComfyGraph, node: str, out: ComfySettings) -> _Wiring:
    """KSampler, and KSamplerAdvanced (its seed is noise_seed; it may add no noise or run part of the
    steps, which are said in notices)."""
    notices = out.notices
    advanced = graph.cls(node) == "KSamplerAdvanced"
    out.steps = graph.value(node, "steps", int, notices)
    out.cfg = graph.value(node, "cfg", float, notices)
    out.sampler_name = graph.value(node, "sampler_name", str, notices)
    out.scheduler = graph.value(node, "scheduler", str, notices)
    if advanced:
        if graph.value(node, "add_noise", str, notices) == "disable":
            notices.append(f"{graph.name(node)} adds no noise (a later pass): its seed is not taken")
        else:
            out.seed = graph.value(node, "noise_seed", int, notices)
        _part_of_the_steps(graph, node, out)
    else:
        out.seed = graph.value(node, "seed", int, notices)
        _denoise(graph, node, notices)
    inputs = graph.inputs(node)
    return _Wiring(inputs.get("positive"), inputs.get("negative"), inputs.get("latent_image"))


def _part_of_the_steps(graph: ComfyGraph, node: str, out: ComfySettings) -> None:
    start = graph.value(node, "start_at_step", int, out.notices) or 0
    end = graph.value(node, "end_at_step", int, out.notices)
    if start > 0 or (end is not None and out.steps is not None and end < out.steps):
        out.notices.append(
            f"{graph.name(node)} runs steps {start} to {end} of {out.steps}, which pictor does not: the "
            "step count is taken, and all of its steps run"
        )


def _denoise(graph: ComfyGraph, node: str, notices: list[str]) -> None:
    denoise = graph.value(node, "denoise", float, notices)
    if denoise is not None and denoise < 1:
        notices.append(
            f"{graph.name(node)} denoises {denoise:g} of the way (img2img strength), which pictor's generate "
            "does not: the whole schedule runs (pictor edit --strength takes it, with a picture)"
        )


def _read_custom_sampler(graph: ComfyGraph, node: str, out: ComfySettings) -> _Wiring:
    """SamplerCustom (seed and CFG its own) and SamplerCustomAdvanced (a noise and a guider node)."""
    notices = out.notices
    inputs = graph.inputs(node)
    if graph.cls(node) == "SamplerCustom":
        if graph.value(node, "add_noise", bool, notices) is False:
            notices.append(f"{graph.name(node)} adds no noise (a later pass): its seed is not taken")
        else:
            out.seed = graph.value(node, "noise_seed", int, notices)
        out.cfg = graph.value(node, "cfg", float, notices)
        wiring = _Wiring(inputs.get("positive"), inputs.get("negative"))
    else:
        _noise(graph, inputs.get("noise"), out)
        wiring = _guider(graph, inputs.get("guider"), out)
    wiring.latent = inputs.get("latent_image")
    _sampler_node(graph, inputs.get("sampler"), out)
    _sigmas(graph, inputs.get("sigmas"), out)
    return wiring


def _noise(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    ref = graph.follow(value)
    if ref is None:
        return
    cls = graph.cls(ref[0])
    if cls == "RandomNoise":
        out.seed = graph.value(ref[0], "noise_seed", int, out.notices)
    elif cls == "DisableNoise":
        out.notices.append(f"the sampler adds no noise ({graph.name(ref[0])}): no seed is taken")
    else:
        out.notices.append(f"the noise comes from {graph.name(ref[0])}, which pictor does not read: no seed")


def _guider(graph: ComfyGraph, value: Any, out: ComfySettings) -> _Wiring:
    """CFGGuider (CFG, positive and negative) or BasicGuider (one conditioning: no CFG, no negative)."""
    ref = graph.follow(value)
    if ref is None:
        return _Wiring()
    node, cls = ref[0], graph.cls(ref[0])
    inputs = graph.inputs(node)
    if cls == "CFGGuider":
        out.cfg = graph.value(node, "cfg", float, out.notices)
        return _Wiring(inputs.get("positive"), inputs.get("negative"))
    if cls == "BasicGuider":  # ComfyUI's Guider_Basic: a CFGGuider at its CFG 1, with no negative
        out.cfg = 1.0
        return _Wiring(inputs.get("conditioning"))
    graph.used.discard(node)  # listed with what is not taken
    out.notices.append(f"the guider is {graph.name(node)}, which pictor does not read: no prompt or CFG")
    return _Wiring()


def _sampler_node(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    ref = graph.follow(value)
    if ref is None:
        return
    if graph.cls(ref[0]) == "KSamplerSelect":
        out.sampler_name = graph.value(ref[0], "sampler_name", str, out.notices)
    else:  # a sampler node with settings of its own (SamplerEulerAncestral's eta...): not one of pictor's
        out.sampler_name = graph.cls(ref[0])


def _sigmas(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    """BasicScheduler gives its scheduler, steps and denoise; other sigma nodes their steps, if any."""
    ref = graph.follow(value)
    if ref is None:
        return
    node = ref[0]
    if graph.cls(node) == "BasicScheduler":
        out.scheduler = graph.value(node, "scheduler", str, out.notices)
        out.steps = graph.value(node, "steps", int, out.notices)
        _denoise(graph, node, out.notices)
        return
    out.scheduler = graph.cls(node)
    if isinstance(graph.inputs(node).get("steps"), int):
        out.steps = graph.value(node, "steps", int, out.notices)


def _conditioning(
    graph: ComfyGraph, value: Any, role: str, notices: list[str]
) -> tuple[str | None, float | None]:
    """The text a conditioning was encoded from, and the FLUX guidance set on the way (the outermost
    FluxGuidance: the last one applied). Nodes that only pass a conditioning on (ControlNet, style model,
    timestep range...) are followed, and listed as not taken; anything else stops with a notice."""
    guidance: float | None = None
    for _ in range(MAX_HOPS):
        ref = graph.follow(value)
        if ref is None:
            return None, guidance
        node, cls = ref[0], graph.cls(ref[0])
        inputs = graph.inputs(node)
        if cls == "FluxGuidance":
            if guidance is None:
                guidance = graph.value(node, "guidance", float, notices)
            value = inputs.get("conditioning")
        elif cls == "CLIPTextEncode":
            return graph.value(node, "text", str, notices), guidance
        elif cls == "CLIPTextEncodeFlux":
            return _flux_text(graph, node, notices), (
                guidance if guidance is not None else graph.value(node, "guidance", float, notices)
            )
        elif cls == "ConditioningZeroOut":  # FLUX graphs' "no negative": an empty one
            return "", guidance
        elif (passed := _passed_on(inputs, ref[1])) is not None:
            graph.used.discard(node)  # its own part is not taken: listed with the rest
            value = inputs[passed]
        else:
            graph.used.discard(node)
            notices.append(f"the {role} comes from {graph.name(node)}, which pictor does not read: not taken")
            return None, guidance
    notices.append(f"the {role}'s conditioning passes through more than {MAX_HOPS} nodes: not taken")
    return None, guidance


def _flux_text(graph: ComfyGraph, node: str, notices: list[str]) -> str | None:
    """CLIPTextEncodeFlux's T5 text (pictor encodes one prompt; FLUX.1's T5 reads most of it)."""
    t5 = graph.value(node, "t5xxl", str, notices)
    clip_l = graph.value(node, "clip_l", str, notices)
    if clip_l and t5 is not None and clip_l.strip() != t5.strip():
        notices.append(
            f"{graph.name(node)}'s CLIP-L text differs from its T5 text, which is taken as the prompt: "
            f"'{clip_l}' is not taken"
        )
    return t5


def _passed_on(inputs: dict[str, Any], output: int) -> str | None:
    """The input a conditioning node passes on to its output `output`: its one `conditioning`, or, for a
    node with positive and negative in and out (ControlNetApplyAdvanced...), the one of that output."""
    if "positive" in inputs and "negative" in inputs and output in (0, 1):
        return ("positive", "negative")[output]
    if "conditioning" in inputs and not any(k.startswith("conditioning_") for k in inputs):
        return "conditioning"
    return None


def _latent(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    """The size from an empty latent; a picture encoded into the latent (img2img) or another sampler's
    output (a later pass) is said in a notice."""
    ref = graph.follow(value)
    if ref is None:
        return
    node, cls = ref[0], graph.cls(ref[0])
    if EMPTY_LATENT.match(cls):
        width = graph.value(node, "width", int, out.notices)
        height = graph.value(node, "height", int, out.notices)
        if width is not None and height is not None:
            out.size = (width, height)
        out.batch_size = graph.value(node, "batch_size", int, out.notices)
        return
    graph.used.discard(node)
    source = graph.ancestors(node) | {node}
    pictures = [n for n in sorted(source, key=id_order) if graph.cls(n) == "LoadImage"]
    if any(graph.cls(n) in SAMPLER_CLASSES for n in source):
        out.notices.append(
            f"the sampler starts from another sampler's output (through {graph.name(node)}): a later pass, "
            "like a hires fix; only its own settings are taken (pictor's --hires SCALE runs a second pass)"
        )
    elif pictures:
        graph.used.update({node, *pictures})  # said here, not again with what is not taken
        files = ", ".join(f"'{graph.inputs(n).get('image')}'" for n in pictures)
        out.notices.append(
            f"the image is an edit (img2img) of another picture ({files}, through {graph.name(node)}): its "
            "prompt and settings are taken, not the picture (pictor edit takes one)"
        )
    else:
        out.notices.append(f"the starting latent comes from {graph.name(node)}: its size is not taken")


def _file_notices(graph: ComfyGraph, scope: set[str]) -> list[str]:
    """The model files the graph loaded (named, as the A1111 path names its model) and its LoRAs."""
    notices = []
    models = _file_names(graph, scope, MODEL_INPUTS)
    parts = _file_names(graph, scope, COMPONENT_INPUTS)
    if models or parts:
        name = listed([f"'{m}'" for m in models or parts], "files")
        beside = f" (with {listed([repr(p) for p in parts], 'files')})" if models and parts else ""
        notices.append(
            f"the image was made by model {name}{beside}; this run uses the one you load (--model)"
        )
    loras = [_lora_text(graph, n) for n in sorted(scope, key=id_order) if "lora_name" in graph.inputs(n)]
    if loras:
        notices.append(
            f"the graph's LoRAs ({listed(loras, 'LoRAs')}) are not taken: give the files with --lora "
            "FILE:SCALE"
        )
    return notices


def _file_names(graph: ComfyGraph, scope: Iterable[str], keys: tuple[str, ...]) -> list[str]:
    return [
        shortened(str(graph.inputs(n)[k]))
        for n in sorted(scope, key=id_order)
        for k in keys
        if isinstance(graph.inputs(n).get(k), str)
    ]


def _lora_text(graph: ComfyGraph, node: str) -> str:
    """'name:0.8', or 'name: model 0.8, text encoder 1' where LoraLoader weighs the two differently."""
    inputs = graph.inputs(node)
    model, clip = _number_text(inputs.get("strength_model")), _number_text(inputs.get("strength_clip"))
    name = shortened(str(inputs.get("lora_name")))
    if clip is None or clip == model:
        return f"{name}:{model}" if model is not None else name
    return f"{name}: model {model}, text encoder {clip}"


def _number_text(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return f"{value:g}"
        except OverflowError:  # an integer past any float: its digits, cut short
            return shortened(repr(value))
    return None if value is None else shortened(repr(value))


def _guidance_notices(graph: ComfyGraph, before: set[str]) -> list[str]:
    """ComfyUI's guidance patches on the model's way to the sampler that pictor does not take, each with
    why (GUIDANCE_NODES)."""
    notices = []
    for node in sorted(before, key=id_order):
        why = GUIDANCE_NODES.get(graph.cls(node))
        if why is not None:
            graph.used.add(node)  # said here, not again with what is not taken
            notices.append(f"{graph.name(node)} is not taken: {why}")
    return notices


def _leftover_notice(graph: ComfyGraph, scope: set[str]) -> list[str]:
    """The nodes on the saved picture's path that gave nothing taken, named (as A1111's leftover keys are)."""
    file_inputs = (*MODEL_INPUTS, *COMPONENT_INPUTS, "lora_name")
    left = [
        graph.name(n)
        for n in sorted(scope - graph.used, key=id_order)
        if graph.cls(n) not in PLUMBING and not any(k in graph.inputs(n) for k in file_inputs)
    ]
    if not left:
        return []
    return [f"not taken (no pictor equivalent, or given another way): {listed(left, 'nodes')}"]


def _shift_notices(graph: ComfyGraph, scope: set[str], size: tuple[int, int] | None) -> list[str]:
    """ModelSamplingFlux at its defaults for the picture's own size is pictor's `flux` schedule: said
    nothing of; at other values or for another size, what it sets is said (and it is not taken)."""
    notices = []
    for node in sorted(scope, key=id_order):
        if graph.cls(node) != "ModelSamplingFlux":
            continue
        graph.used.add(node)  # said here, or quietly pictor's own: not listed with what is not taken
        values = {k: _plain_number(graph, node, k) for k in (*FLUX_SHIFT_DEFAULTS, "width", "height")}
        shifts = all(_close(values[k], v) for k, v in FLUX_SHIFT_DEFAULTS.items())
        at_size = size is None or (values["width"], values["height"]) == size  # unknown size: no telling
        if shifts and at_size:
            continue
        written = ", ".join(f"{k} {'?' if v is None else format(v, 'g')}" for k, v in values.items())
        why = "for another size than the picture's" if shifts else "other than FLUX.1's own"
        notices.append(
            f"{graph.name(node)} shifts the schedule ({written}) {why}, where pictor's own (flux) schedule "
            "shifts FLUX.1's way for the image's size: not taken"
        )
    return notices


def _close(value: float | None, default: float) -> bool:
    return value is not None and math.isclose(value, default, rel_tol=1e-6)


def _plain_number(graph: ComfyGraph, node: str, name: str) -> float | None:
    """An input of `node` as a number (as written, or from a node holding only it), else None; quietly."""
    raw = graph.inputs(node).get(name)
    try:
        ref = graph.link(raw)
    except ComfyGraphError:
        return None
    if ref is not None:
        held = list(graph.inputs(ref[0]).values())
        raw = held[0] if len(held) == 1 else None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            return float(raw) if math.isfinite(raw) else None
        except OverflowError:  # an integer past any float: no number to take
            return None
    return None
