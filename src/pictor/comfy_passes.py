"""A ComfyUI graph's two sampling passes read as pictor's hires fix, or as one run split in two.

ComfyUI has no hires fix of its own: people build it. Pass 1 samples an empty latent; its output is
enlarged, in the latent (LatentUpscale, LatentUpscaleBy) or as a picture (VAEDecode, then ImageScale,
ImageScaleBy or an upscale model's ImageUpscaleWithModel, then VAEEncode); pass 2 samples that at denoise
below 1. `read_two_passes` reads pass 1 as the picture's settings and the rest as `ComfyHires` (scale, the
noise level pass 2 starts at, its steps, the upscaler), with a notice for each difference pictor cannot
express. A KSamplerAdvanced pair on the same latent (start_at_step / end_at_step) is one run split in two,
taken as that run where the halves make one. Any other shape returns None: `pictor.comfy_workflow` then
takes the last pass alone and says so.

The second pass's size is worked out as ComfyUI's nodes round it (`pictor.comfy_upscale_nodes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pictor.comfy_graph import SAMPLER_CLASSES, ComfyGraph, shortened
from pictor.comfy_sampling_nodes import (
    EMPTY_LATENT,
    MAX_HOPS,
    ComfySettings,
    empty_latent,
    read_pass,
)
from pictor.comfy_upscale_nodes import (
    DECODERS,
    ENCODERS,
    IMAGE_SCALERS,
    LATENT_FACTOR,
    LATENT_SCALERS,
    second_size,
)
from pictor.flow import resolution_mu, time_shift
from pictor.hires import MAX_SCALE, hires_size
from pictor.imported_settings import ImportedSettings

PICTOR_MULTIPLE = 16  # pictor packs 2x2 patches of 8-pixel latents: its sizes come in 16s
# ComfyUI's FLUX.1 [dev] shifts by this constant mu without a ModelSamplingFlux node (as
# `comfy_settings_import.COMFY_FLUX_SHIFT`; not imported from there, which imports this module's reader)
COMFY_DEV_SHIFT = 1.15
COMFY_TABLE = 10_000  # ModelSamplingFlux tabulates sigmas at t = k / 10,000
# Schedulers whose start under denoise is worked out exactly here (`_start_time`), and pictor's schedule
# for each (pictor.comfy_settings_import.COMFY_SCHEDULERS), which shifts by the hires pass's own size
START_SCHEDULERS = {"simple": "flux", "sgm_uniform": "flux", "normal": "normal"}
# ComfyUI's KSampler builds one step more for these and drops the second-to-last sigma (comfy/samplers.py,
# KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS); SamplerCustom's sigma nodes do not
DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
SHIFT_CLOSE = 0.02  # shifts (mu) this close give the same steps (as comfy_settings_import.SHIFT_CLOSE)
FILE_INPUTS = ("ckpt_name", "unet_name", "lora_name", "strength_model")
PASS_FIELDS = ("prompt", "negative", "seed", "cfg", "guidance", "sampler_name", "scheduler")


@dataclass
class ComfyHires:
    """A graph's second pass as a hires fix, in ComfyUI's terms and the noise level it starts at."""

    scale: float | None  # None: not one pictor's hires fix can take (a notice says why)
    size: tuple[int, int] | None  # the second pass's size as ComfyUI made it
    strength: float | None  # the noise level (t) the second pass starts at: pictor's hires strength
    steps: int | None  # the steps the second pass runs: pictor's hires steps count the same
    model_file: str | None = None  # an upscale model's file name, where the picture was enlarged by one


def take_hires(hires: ComfyHires | None, out: ImportedSettings) -> None:
    """A graph's hires fix as `pictor generate`'s --hires options (an upscale model by its name, which
    --hires-upscaler FILE must give, as for A1111's text)."""
    if hires is None or hires.scale is None:
        return
    out.values["hires"] = hires.scale
    if hires.strength is not None:
        out.values["hires_strength"] = hires.strength
    if hires.steps is not None:
        out.values["hires_steps"] = hires.steps
    if hires.model_file is not None:
        out.hires_upscaler_name = hires.model_file


def read_two_passes(graph: ComfyGraph, second: ComfySettings, latent: Any) -> ComfySettings | None:
    """The first pass's settings, with the second as `hires` (or the halves of a split run as one), where
    `second` (the saved picture's pass) starts from `latent` made by one of the shapes this module reads;
    else None, having marked nothing read."""
    found = _chain(graph, latent)
    if found is None:
        return None
    first_node, between = found
    start = graph.link(graph.inputs(first_node).get("latent_image"))
    if start is None or not EMPTY_LATENT.match(graph.cls(start[0])):
        second.notices.append(
            f"{graph.name(first_node)}, the pass before the last, does not start from an empty latent "
            "(more than two passes, or an edit): pictor reads two passes at most"
        )
        return None
    if not between:
        if graph.cls(first_node) == graph.cls(second.sampler_node or "") == "KSamplerAdvanced":
            return _split_run(graph, first_node, second)
        return None  # a second pass at the same size: not a hires fix, said as a later pass
    if second.step_range is not None or not second.adds_noise:
        return None  # a KSamplerAdvanced or noiseless second pass after an upscale: not read
    first, first_latent = read_pass(graph, first_node)
    ref = graph.follow(first_latent)
    assert ref is not None
    empty_latent(graph, ref[0], first)
    graph.used.update(between)
    first.notices[:0] = second.notices
    _whole_first_pass(graph, first)
    first.hires = _hires(graph, first, second, between)
    _differences(graph, first, second)
    return first


def _chain(graph: ComfyGraph, latent: Any) -> tuple[str, list[str]] | None:
    """The sampler a latent comes from and the upscaling nodes between, from that sampler on; None where
    the path holds anything else. Nothing is marked read."""
    ref = graph.link(latent)
    between: list[str] = []
    kind = "latent"
    for _ in range(MAX_HOPS):
        if ref is None:
            return None
        node, cls = ref[0], graph.cls(ref[0])
        inputs = graph.inputs(node)
        if cls in SAMPLER_CLASSES:
            # SamplerCustom(Advanced)'s second output is its denoised prediction, not the sample
            return (node, between[::-1]) if kind == "latent" and ref[1] == 0 else None
        if kind == "latent" and cls in LATENT_SCALERS:
            link = inputs.get("samples")
        elif kind == "latent" and cls in ENCODERS:
            kind, link = "image", inputs.get("pixels")
        elif kind == "image" and cls in IMAGE_SCALERS:
            link = inputs.get("image")
        elif kind == "image" and cls in DECODERS:
            kind, link = "latent", inputs.get("samples")
        else:
            return None
        between.append(node)
        ref = graph.link(link)
    return None


def _whole_first_pass(graph: ComfyGraph, first: ComfySettings) -> None:
    """A first pass that runs part of its schedule is not pictor's first pass: said."""
    start, end = first.step_range or (0, None)
    stops_early = end is not None and first.steps is not None and end < first.steps
    if first.denoise is not None or start > 0 or stops_early or not first.adds_noise:
        first.notices.append(
            f"the first pass ({graph.name(first.sampler_node or '')}) runs only part of its schedule, where "
            "pictor's first pass runs all of it"
        )


def _hires(graph: ComfyGraph, first: ComfySettings, second: ComfySettings, between: list[str]) -> ComfyHires:
    notices = first.notices
    size, factor, model_file = second_size(graph, first.size, between, notices)
    hires = ComfyHires(None, size, None, second.steps, model_file)
    if second.steps is not None and second.steps < 1:
        notices.append(
            f"the graph's second pass runs {second.steps} steps: no hires steps or strength are taken"
        )
        hires.steps = None
    if first.size is None:
        notices.append("the graph's first pass's size is not known: its hires fix is not taken")
    if first.size is None or size is None:  # second_size has said why
        return hires
    (w1, h1), (w2, h2) = first.size, size
    scale = factor if factor is not None else w2 / w1
    if not 1 < scale <= MAX_SCALE:
        notices.append(
            f"the graph's second pass at {w2}x{h2} is {scale:g} times the first's {w1}x{h1}, which pictor's "
            f"hires fix cannot take (its scale is above 1 and at most {MAX_SCALE:g}): the first pass's "
            "settings are taken, without a hires fix"
        )
        return hires
    ours = hires_size(w1, h1, scale, PICTOR_MULTIPLE)
    mu = _comfy_shift(graph, second, notices)
    hires.scale = scale
    if hires.steps is not None:
        hires.strength = _start_level(graph, second, mu, notices)
    if ours != (w2, h2):
        sides = (
            f": its sides grow {w2 / w1:g} and {h2 / h1:g} times, where pictor's hires scale grows both alike"
            if not math.isclose(w2 / w1, h2 / h1, rel_tol=0.01)
            else ""
        )
        notices.append(
            f"the graph's second pass is {w2}x{h2}; pictor's hires fix at scale {scale:g} makes "
            f"{ours[0]}x{ours[1]} (sides in {PICTOR_MULTIPLE}s){sides}"
        )
    _shift_notice(second, mu if hires.strength is not None else None, ours, notices)
    return hires


def _shift_notice(second: ComfySettings, mu: float | None, size: tuple[int, int], notices: list[str]) -> None:
    """The hires pass starts at ComfyUI's noise level, and steps below it by pictor's shift for its own
    size: said where ComfyUI's second pass shifted otherwise (a ModelSamplingFlux for another size, or
    FLUX.1 [dev]'s constant 1.15). `mu` None: no strength taken, nothing to compare."""
    schedule = START_SCHEDULERS.get(second.scheduler or "")
    if mu is None or schedule is None:
        return  # no shift to compare, or a scheduler whose steps are said to differ anyway
    ours = resolution_mu((size[0] // PICTOR_MULTIPLE) * (size[1] // PICTOR_MULTIPLE))
    if abs(ours - mu) > SHIFT_CLOSE:
        notices.append(
            f"the hires pass's steps differ: ComfyUI's second pass shifts by mu {mu:.3g}, pictor's "
            f"{schedule} schedule by {ours:.3g} for {size[0]}x{size[1]} (from the same starting noise level)"
        )


def _start_level(
    graph: ComfyGraph, second: ComfySettings, mu: float | None, notices: list[str]
) -> float | None:
    """The noise level the second pass starts at. ComfyUI's denoise d with N steps builds a schedule of
    int(N / d) steps (one more for DISCARD_PENULTIMATE samplers) and runs its last N; its first time is
    `_start_time`'s, shifted by ComfyUI's mu. pictor's hires strength is that noise level itself (its start
    t, after the shift: pictor.sampling_schedules), and its N steps then fall on the same unshifted times
    under simple where pictor's shift for the second pass's size is ComfyUI's."""
    steps, denoise, node = second.steps, second.denoise, second.sampler_node or ""
    sigmas = graph.link(graph.inputs(node).get("sigmas"))
    if sigmas is not None and graph.cls(sigmas[0]) != "BasicScheduler":
        notices.append(
            f"the second pass's sigmas come from {graph.name(sigmas[0])}, which says no denoise: the noise "
            "level it starts at is not known, so no hires strength is taken (pictor's default is used)"
        )
        return None
    if steps is None or steps < 1:
        return None
    if denoise is None:  # denoise 1: the whole schedule, from pure noise
        return 1.0
    if denoise <= 0:
        notices.append(
            f"the graph's second pass denoises {denoise:g}: nothing, so no hires strength is taken"
        )
        return None
    if mu is None:  # _comfy_shift has said why
        return None
    total = int(steps / denoise)
    built = (
        total + 1 if graph.cls(node) == "KSampler" and second.sampler_name in DISCARD_PENULTIMATE else total
    )
    try:
        strength = round(time_shift(mu, 1.0, _start_time(second.scheduler, built, total - steps, mu)), 4)
    except OverflowError:
        strength = math.nan
    if not 0 < strength <= 1:  # also NaN
        notices.append(
            f"the graph's second pass starts at no noise level pictor can take (shift mu {mu:g}): no hires "
            "strength is taken"
        )
        return None
    name = graph.name(second.denoise_node or second.sampler_node or "")
    notices.append(
        f"{name} denoises {denoise:g} in {steps} steps: ComfyUI runs the last {steps} of {total} steps, from "
        f"noise level {strength:g} (at ComfyUI's shift mu {mu:.3g}), which is taken as the hires strength "
        f"(pictor's is the noise level itself), and {steps} as the hires steps"
    )
    if second.scheduler not in START_SCHEDULERS:
        notices.append(
            f"the second pass's scheduler {second.scheduler}: its starting noise level is worked out as "
            "under simple, and may differ"
        )
    return strength


def _start_time(scheduler: str | None, built: int, index: int, mu: float) -> float:
    """The unshifted time of sigma `index` of a `built`-step schedule (comfy/samplers.py). simple indexes
    ModelSamplingFlux's table; normal (`built` points) and sgm_uniform (`built` + 1, the last dropped) space
    the model's timesteps evenly from 1 down to sigma_min, which a FLUX.1 model takes as its own timestep
    (pictor.sampling_schedules.schedule_normal)."""
    if scheduler in ("normal", "sgm_uniform"):
        sigma_min = time_shift(mu, 1.0, 1 / COMFY_TABLE)
        intervals = built - 1 if scheduler == "normal" else built
        return 1 - index * (1 - sigma_min) / max(intervals, 1)
    return (COMFY_TABLE - int(index * (COMFY_TABLE / built))) / COMFY_TABLE


def _comfy_shift(graph: ComfyGraph, second: ComfySettings, notices: list[str]) -> float | None:
    """The mu of the model the second pass's sigmas come from: ModelSamplingFlux's for its width and height
    (comfy_extras/nodes_model_advanced.py), else FLUX.1 [dev]'s constant; None (said) where it is none."""
    node = second.sampler_node
    sigmas = graph.link(graph.inputs(node).get("sigmas")) if node is not None else None
    where = sigmas[0] if sigmas is not None else node  # the model the sigmas are worked out for
    ref = graph.link(graph.inputs(where).get("model")) if where is not None else None
    if ref is None:
        return COMFY_DEV_SHIFT
    for node in [ref[0], *graph.ancestors(ref[0])]:
        if graph.cls(node) == "ModelSamplingFlux":
            values = [
                graph.value(node, k, float, notices) for k in ("max_shift", "base_shift", "width", "height")
            ]
            if any(v is None for v in values):
                break
            top, base, width, height = (float(v) for v in values)
            slope = (top - base) / (4096 - 256)
            mu = width * height / (LATENT_FACTOR * LATENT_FACTOR * 4) * slope + base - slope * 256
            if not math.isfinite(mu):
                notices.append(
                    f"{graph.name(node)} sets no shift a schedule can take: no hires strength is taken"
                )
                return None
            return mu
    return COMFY_DEV_SHIFT


def _differences(graph: ComfyGraph, first: ComfySettings, second: ComfySettings) -> None:
    """What the second pass does otherwise than the first, which pictor's hires fix (the first pass's
    prompt, seed, guidance, sampler and model in both) cannot express: said."""
    differ = _field_differences(first, second, PASS_FIELDS, "the first pass's")
    ours, theirs = _model_files(graph, first), _model_files(graph, second)
    if ours != theirs:
        differ.append(
            f"model files {', '.join(sorted(theirs)) or 'none named'} (the first pass's: "
            f"{', '.join(sorted(ours)) or 'none named'})"
        )
    if differ:
        first.notices.append(
            f"the graph's second pass ({graph.name(second.sampler_node or '')}) has {'; '.join(differ)}: "
            "pictor's hires fix runs the first pass's in both, so these are not taken"
        )


def _field_differences(
    first: ComfySettings, second: ComfySettings, names: tuple[str, ...], whose: str
) -> list[str]:
    """For each of `names` the second sets otherwise than the first: "seed 7 (the first pass's: 42)"."""
    said = []
    for name in names:
        ours, theirs = getattr(first, name), getattr(second, name)
        if theirs is not None and theirs != ours:
            said.append(f"{name.replace('_', ' ')} {_said(theirs)} ({whose}: {_said(ours)})")
    return said


def _said(value: Any) -> str:
    if isinstance(value, str):
        return f"'{shortened(value)}'"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _model_files(graph: ComfyGraph, settings: ComfySettings) -> set[str]:
    """The model and LoRA files (with LoRA strengths) on the way to a pass's sampler, guider and sigmas."""
    found = set()
    for n in model_way(graph, settings.sampler_node):
        held = [f"{graph.inputs(n)[k]}" for k in FILE_INPUTS if k in graph.inputs(n)]
        if held:
            found.add(shortened(":".join(held)))
    return found


def model_way(graph: ComfyGraph, sampler: str | None) -> set[str]:
    """The nodes on the model's way to a sampling node (through its guider and sigmas nodes too): its
    loaders, LoRAs and patches (ModelSamplingFlux...), not its prompts or starting latent."""
    if sampler is None:
        return set()
    starts = [sampler]
    for key in ("guider", "sigmas"):
        ref = graph.link(graph.inputs(sampler).get(key))
        if ref is not None:
            starts.append(ref[0])
    models = [ref[0] for n in starts if (ref := graph.link(graph.inputs(n).get("model"))) is not None]
    return graph.upstream(models) | set(models)


def _split_run(graph: ComfyGraph, first_node: str, second: ComfySettings) -> ComfySettings:
    """Two KSamplerAdvanced on one latent, the first from step 0 to k with its leftover noise, the second
    from k on without adding noise: one run of their steps where the two agree; else the first half's
    settings, with a notice of what differs."""
    first, latent = read_pass(graph, first_node)
    ref = graph.follow(latent)
    assert ref is not None
    empty_latent(graph, ref[0], first)
    # the second half adding no noise is the split's own: its seed is the first half's, taken
    first.notices[:0] = [n for n in second.notices if "adds no noise" not in n]
    (s1, e1), (s2, e2) = first.step_range or (0, None), second.step_range or (0, None)
    steps = first.steps
    # the seed is the first half's (the second adds no noise); every other setting must be the same
    differ = _field_differences(
        first, second, ("steps", *PASS_FIELDS[:2], *PASS_FIELDS[3:]), "the first half's"
    )
    if _model_files(graph, first) != _model_files(graph, second):
        differ.append("another model or LoRAs")
    if not (first.adds_noise and first.leftover_noise and not second.adds_noise):
        differ.append("not the first adding noise and returning its leftover noise, the second adding none")
    if s1 != 0 or e1 is None or e1 != s2 or (steps is not None and e2 is not None and e2 < steps):
        differ.append(f"steps {s1} to {e1} and {s2} to {e2}, which do not join into 0 to {steps}")
    names = f"{graph.name(first_node)} and {graph.name(second.sampler_node or '')}"
    if differ:
        first.notices.append(
            f"{names} split a run in two, but with {'; '.join(differ)}: pictor runs one sampler over all "
            "the steps, so the first half's settings are taken"
        )
    first.step_range = None  # taken as the whole run (or said above)
    return first
