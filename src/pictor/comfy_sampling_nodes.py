"""One sampling pass of a ComfyUI API graph, read in ComfyUI's terms (`ComfySettings`): the sampling node
(KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced and the noise, guider, sampler and sigma
nodes around it), its prompts and FLUX guidance, and its empty latent's size.

Separate from `pictor.comfy_workflow` (which picks the pass that made the saved picture and names what else
the graph holds) so that `pictor.comfy_passes` can read a two-pass graph's first pass the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pictor.comfy_graph import ComfyGraph
from pictor.comfy_sampler_settings import read_sampler_node

if TYPE_CHECKING:
    from pictor.comfy_passes import ComfyHires

# Empty latents that say the picture's size: EmptyLatentImage, EmptySD3LatentImage (FLUX.1's, in ComfyUI's
# own FLUX workflows), EmptyHunyuanLatentImage and the like all hold width, height and batch_size.
EMPTY_LATENT = re.compile(r"^Empty\w*Latent\w*$")
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
    # tcfg guidance method (see comfy_workflow.GUIDANCE_NODES)
    tcfg: bool = False
    # Said by `pass_notices` where this pass is the one taken, and read by `pictor.comfy_passes` where it
    # is a hires fix's second pass or half of a split run: the part of the schedule the sampler runs.
    denoise: float | None = None  # KSampler's or BasicScheduler's, below 1 (an img2img strength)
    denoise_node: str | None = None
    adds_noise: bool = True
    step_range: tuple[int, int | None] | None = None  # KSamplerAdvanced's start_at_step, end_at_step
    leftover_noise: bool = False  # KSamplerAdvanced's return_with_leftover_noise
    sampler_node: str | None = None
    # a two-pass graph's second pass (`pictor.comfy_passes`): these settings are then its first pass's
    hires: ComfyHires | None = None
    notices: list[str] = field(default_factory=list)


@dataclass
class _Wiring:
    """The links into the sampling node that lead to its prompts and its starting latent."""

    positive: Any = None
    negative: Any = None
    latent: Any = None


def read_pass(graph: ComfyGraph, sampler: str) -> tuple[ComfySettings, Any]:
    """The settings of one sampling node and of the prompts it was given, and the link to its starting
    latent (read by the caller: an empty latent, or another pass's output)."""
    out = ComfySettings(sampler_node=sampler)
    graph.used.add(sampler)
    read = _read_ksampler if graph.cls(sampler).startswith("KSampler") else _read_custom_sampler
    wiring = read(graph, sampler, out)
    out.prompt, out.guidance = conditioning(graph, wiring.positive, "prompt", out.notices)
    if wiring.negative is not None:
        out.negative, _ = conditioning(graph, wiring.negative, "negative prompt", out.notices)
    return out, wiring.latent


def empty_latent(graph: ComfyGraph, node: str, out: ComfySettings) -> bool:
    """The size and batch of an empty latent into `out`; False where `node` is not one."""
    if not EMPTY_LATENT.match(graph.cls(node)):
        return False
    width = graph.value(node, "width", int, out.notices)
    height = graph.value(node, "height", int, out.notices)
    if width is not None and height is not None:
        out.size = (width, height)
    out.batch_size = graph.value(node, "batch_size", int, out.notices)
    return True


def pass_notices(graph: ComfyGraph, out: ComfySettings) -> None:
    """What the pass taken runs of its schedule that pictor's generate does not: part of its steps
    (KSamplerAdvanced), or part of the way from noise (denoise below 1)."""
    if out.step_range is not None and out.sampler_node is not None:
        start, end = out.step_range
        if start > 0 or (end is not None and out.steps is not None and end < out.steps):
            out.notices.append(
                f"{graph.name(out.sampler_node)} runs steps {start} to {end} of {out.steps}, which pictor "
                "does not: the step count is taken, and all of its steps run"
            )
    if out.denoise is not None and out.denoise_node is not None:
        out.notices.append(
            f"{graph.name(out.denoise_node)} denoises {out.denoise:g} of the way (img2img strength), which "
            "pictor's generate does not: the whole schedule runs (pictor edit --strength takes it, with a "
            "picture)"
        )


def _read_ksampler(graph: ComfyGraph, node: str, out: ComfySettings) -> _Wiring:
    """KSampler, and KSamplerAdvanced (its seed is noise_seed; it may add no noise or run part of the
    steps: said by `pass_notices`, or read by `pictor.comfy_passes`)."""
    notices = out.notices
    advanced = graph.cls(node) == "KSamplerAdvanced"
    out.steps = graph.value(node, "steps", int, notices)
    out.cfg = graph.value(node, "cfg", float, notices)
    out.sampler_name = graph.value(node, "sampler_name", str, notices)
    out.scheduler = graph.value(node, "scheduler", str, notices)
    if advanced:
        if graph.value(node, "add_noise", str, notices) == "disable":
            out.adds_noise = False
            notices.append(f"{graph.name(node)} adds no noise (a later pass): its seed is not taken")
        else:
            out.seed = graph.value(node, "noise_seed", int, notices)
        start = graph.value(node, "start_at_step", int, notices) or 0
        out.step_range = (start, graph.value(node, "end_at_step", int, notices))
        out.leftover_noise = graph.value(node, "return_with_leftover_noise", str, notices) == "enable"
    else:
        out.seed = graph.value(node, "seed", int, notices)
        _denoise(graph, node, out)
    inputs = graph.inputs(node)
    return _Wiring(inputs.get("positive"), inputs.get("negative"), inputs.get("latent_image"))


def _denoise(graph: ComfyGraph, node: str, out: ComfySettings) -> None:
    denoise = graph.value(node, "denoise", float, out.notices)
    if denoise is not None and denoise < 1:
        out.denoise, out.denoise_node = denoise, node


def _read_custom_sampler(graph: ComfyGraph, node: str, out: ComfySettings) -> _Wiring:
    """SamplerCustom (seed and CFG its own) and SamplerCustomAdvanced (a noise and a guider node)."""
    notices = out.notices
    inputs = graph.inputs(node)
    if graph.cls(node) == "SamplerCustom":
        if graph.value(node, "add_noise", bool, notices) is False:
            out.adds_noise = False
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
        out.adds_noise = False
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
    """KSamplerSelect's sampler, or that of a sampler node with settings of its own (SamplerEulerAncestral's
    eta...: `pictor.comfy_sampler_settings`, which says the settings pictor does not run)."""
    ref = graph.follow(value)
    if ref is not None:
        out.sampler_name = read_sampler_node(graph, ref[0], out.notices)


def _sigmas(graph: ComfyGraph, value: Any, out: ComfySettings) -> None:
    """BasicScheduler gives its scheduler, steps and denoise; other sigma nodes their steps, if any."""
    ref = graph.follow(value)
    if ref is None:
        return
    node = ref[0]
    if graph.cls(node) == "BasicScheduler":
        out.scheduler = graph.value(node, "scheduler", str, out.notices)
        out.steps = graph.value(node, "steps", int, out.notices)
        _denoise(graph, node, out)
        return
    out.scheduler = graph.cls(node)
    if isinstance(graph.inputs(node).get("steps"), int):
        out.steps = graph.value(node, "steps", int, out.notices)


def conditioning(
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
