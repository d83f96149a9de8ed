"""ComfyUI's own PNG metadata, read for the settings of the picture it saved.

ComfyUI's SaveImage writes the graph that ran as a `prompt` text chunk, in its API format
(`pictor.comfy_graph`; its `workflow` chunk, the editor's layout of the same graph, says nothing more here).
`read_comfy_graph` finds the sampling node whose latent became the saved picture, follows its links to the
prompt, seed, steps, CFG, FLUX guidance, sampler, scheduler and size, and gives them in ComfyUI's own terms
(`ComfySettings`); `pictor.settings_import` maps those onto `pictor generate`'s options. Each sampling pass
is read by `pictor.comfy_sampling_nodes`; a two-pass graph (a hires fix, or one run split in two) by
`pictor.comfy_passes`, which gives its first pass's settings with the second as `ComfySettings.hires`. Every
other node on the saved picture's path is named in a notice, not silently dropped.

The graph is data: nothing in it is run or evaluated, and only the node classes named here are understood.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
from pictor.comfy_passes import model_way, read_two_passes
from pictor.comfy_sampling_nodes import (
    ComfySettings,
    empty_latent,
    pass_notices,
    read_pass,
)

__all__ = ["PROMPT_KEY", "ComfySettings", "read_comfy_graph"]

PROMPT_KEY = "prompt"
# Inputs that name a model file: the model itself, and the text encoders and autoencoder beside it.
MODEL_INPUTS = ("ckpt_name", "unet_name")
COMPONENT_INPUTS = ("clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name")
# Nodes that only carry the latent to the saved file: decoding, and saving or showing the picture.
PLUMBING = {"VAEDecode", "VAEDecodeTiled", "SaveImage", "PreviewImage"}
# ModelSamplingFlux's defaults, at the picture's own size, are FLUX.1's resolution-dependent shift, which
# pictor's own (`flux`) schedule applies too; other values are a schedule pictor does not have. (Graphs
# carry the editor's float steps: 1.1500000000000001.)
FLUX_SHIFT_DEFAULTS = {"max_shift": 1.15, "base_shift": 0.5}


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
    notices: list[str] = []
    sampler, saved = final_sampler(graph, notices)
    out, latent = read_pass(graph, sampler)
    out.notices[:0] = notices
    two = read_two_passes(graph, out, latent)  # a hires fix, or a run split in two: its first pass
    first_way = None  # a hires fix's first pass's model's way: its shift is the one taken
    if two is not None:
        two.notices = [_taken_notice(graph, n, sampler, two) for n in two.notices]
        out = two
        if out.hires is not None:
            first_way = model_way(graph, out.sampler_node)
    else:
        pass_notices(graph, out)
        _latent(graph, latent, out)
    before = graph.ancestors(sampler)
    shifts = before if first_way is None else first_way
    out.model_sampling = any(graph.cls(n).startswith("ModelSampling") for n in shifts)
    out.tcfg = any(graph.cls(n) == TCFG_NODE for n in before)
    graph.used.update(n for n in before if graph.cls(n) == TCFG_NODE)  # taken, or said, by settings_import
    scope = before | picture_path(graph, sampler, saved)
    out.notices.extend(_file_notices(graph, scope))
    out.notices.extend(_shift_notices(graph, scope, out.size, first_way))
    out.notices.extend(_guidance_notices(graph, before))
    out.notices.extend(_leftover_notice(graph, scope))
    return out


def _taken_notice(graph: ComfyGraph, notice: str, sampler: str, two: ComfySettings) -> str:
    """final_sampler's notice of which sampler's picture is taken, saying whose settings that gives where
    it and the pass before it are read as one (a hires fix, or a run split in two)."""
    head, said, tail = notice.partition("; the settings of ")
    name = graph.name(sampler)
    if not said or not tail.startswith(name) or two.sampler_node is None:
        return notice
    why = tail[len(name) :].removesuffix(" are taken").strip()
    whose = graph.name(two.sampler_node)
    gives = (
        f"those of {whose} with a hires fix" if two.hires is not None else f"those of the run {whose} began"
    )
    return f"{head}; the picture of {name} {why} is taken to be this one: its settings are {gives}"


def _latent(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    """The size from an empty latent; a picture encoded into the latent (img2img) or another sampler's
    output through nodes `pictor.comfy_passes` does not read (a later pass) is said in a notice."""
    ref = graph.follow(value)
    if ref is None:
        return
    node = ref[0]
    if empty_latent(graph, node, out):
        return
    graph.used.discard(node)
    source = graph.ancestors(node) | {node}
    pictures = [n for n in sorted(source, key=id_order) if graph.cls(n) == "LoadImage"]
    if any(graph.cls(n) in SAMPLER_CLASSES for n in source):
        out.notices.append(
            f"the sampler starts from another sampler's output (through {graph.name(node)}), in a way pictor "
            "does not read as a hires fix: only its own settings are taken (pictor's --hires SCALE runs a "
            "second pass)"
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


def _shift_notices(
    graph: ComfyGraph, scope: set[str], size: tuple[int, int] | None, first_way: set[str] | None
) -> list[str]:
    """ModelSamplingFlux at its defaults for the picture's own size is pictor's `flux` schedule: said
    nothing of; at other values or for another size, what it sets is said (and it is not taken). In a hires
    fix (`first_way`: its first pass's model's way) one on the second pass's way alone is said by
    `pictor.comfy_passes`, which compares its shift with the hires pass's."""
    notices = []
    for node in sorted(scope, key=id_order):
        if graph.cls(node) != "ModelSamplingFlux":
            continue
        graph.used.add(node)  # said here, or quietly pictor's own: not listed with what is not taken
        if first_way is not None and node not in first_way:
            continue
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
