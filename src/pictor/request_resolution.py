"""Request resolution: a GenerationRequest with the model's defaults filled in and every setting checked
before anything runs; each error says what to change. `Pipeline.resolve_request` is this, on itself."""

from __future__ import annotations

import secrets
import warnings
from dataclasses import replace
from typing import Any, Protocol

from pictor.checkpoint import BundleConfig
from pictor.composable_prompts import MAX_PARTS, split_and, uses_and
from pictor.context_images import resolve_context
from pictor.control_images import resolve_control
from pictor.controlnet_requests import resolve_controlnets
from pictor.controlnet_runs import ControlNetUnit
from pictor.generation_request import (
    DENOISE_TILING_FIELDS,
    MAX_IMAGES,
    MAX_SEED,
    TILING_FIELDS,
    GenerationError,
    GenerationRequest,
    seed_notice,
)
from pictor.generation_settings import (
    MAX_PIXELS,
    MAX_STEPS,
    resolve_denoise_tiling,
    resolve_tiling,
    settings_problem,
)
from pictor.guidance_methods import cfg_pp_problem, resolve_guidance_method
from pictor.hires import DEFAULT_STRENGTH, hires_problem, hires_size
from pictor.ip_adapter_files import IPAdapterError, IPAdapterModel, ip_adapter_pixels, ip_adapter_problem
from pictor.layout_files import LayoutError, parse_layout
from pictor.models.autoencoder import AutoEncoder
from pictor.models.block_cache import cache_threshold_problem
from pictor.models.flux import Flux
from pictor.models.text_encoder import TextEncoder
from pictor.noise_variation import variation_problem
from pictor.notices import PictorWarning
from pictor.prompt_editing import texts_read
from pictor.prompt_weights import PromptWeightError, parse_weights
from pictor.redux_images import ReduxError, ReduxModel, redux_pixels, redux_problem
from pictor.reference_files import ReferenceImageError, reference_pixels
from pictor.regional_attention import check_regional_options
from pictor.regional_prompts import RegionError, parse_regions
from pictor.sampling import is_cfg_pp
from pictor.upscaler_files import UpscalerFile


class ResolvingPipeline(Protocol):
    """What resolution reads of a pipeline."""

    config: BundleConfig
    defaults: dict[str, Any]
    patch: int
    guidance_mode: str
    autoencoder: AutoEncoder
    transformer: Flux
    layout_adapter: Any
    reference_adapter: Any
    control: bool  # a FLUX.1 Canny / Depth model (`pictor.control_images.is_control_model`)
    redux: ReduxModel | None  # FLUX.1 Redux's embedder and SigLIP, once `Pipeline.set_redux` loaded them
    controlnets: list[ControlNetUnit]  # FLUX.1 ControlNets `Pipeline.add_controlnet` loaded, in order
    # XLabs' IP-Adapter and CLIP's vision tower, once `Pipeline.set_ip_adapter` loaded them
    ip_adapter: IPAdapterModel | None
    upscaler: UpscalerFile | None  # the upscale model `Pipeline.set_upscaler` loaded, for the hires fix

    @property
    def name(self) -> str: ...

    text_encoder: TextEncoder

    def prompt_notices(
        self, prompt: str | None, negative_prompt: str | None = None, weighted: bool = False
    ) -> list[str]: ...


def resolve_request(
    pipe: ResolvingPipeline, request: GenerationRequest, reproducing: bool = False
) -> GenerationRequest:
    """Fill defaults and validate; every error says what to change. `reproducing`: the request is an
    existing image's record, so settings that would change nothing are not refused (the image was
    made with them, perhaps by a version that allowed them)."""
    d = pipe.defaults
    request = resolve_context(request, pipe.name, pipe.config.kontext, d["width"] * d["height"], pipe.patch)
    r = replace(
        request,
        width=request.width if request.width is not None else d["width"],
        height=request.height if request.height is not None else d["height"],
        steps=request.steps if request.steps is not None else d["steps"],
        guidance=request.guidance if request.guidance is not None else d["guidance"],
        sampler=request.sampler or d["sampler"],
        schedule=request.schedule or d["schedule"],
        seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
    )
    if not isinstance(r.prompt, str):
        raise GenerationError("prompt must be a string")
    if not isinstance(r.negative_prompt or "", str):
        raise GenerationError("negative prompt must be a string")
    for what, text in (("prompt", r.prompt), ("negative prompt", r.negative_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: what Python makes of bytes that are not UTF-8
            raise GenerationError(
                f"the {what} is not valid text (it holds bytes that are not UTF-8); type it again or "
                "save the file that holds it as UTF-8"
            ) from None
    if r.prompt_editing and not r.prompt_weights:
        raise GenerationError(
            "prompt editing reads A1111's prompt syntax, whose weights are part of it: turn prompt weights "
            "on too (--prompt-weights; --prompt-editing on the command line does)"
        )
    problem = settings_problem(
        pipe.patch,
        width=r.width,
        height=r.height,
        steps=r.steps,
        guidance=r.guidance,
        sampler=r.sampler,
        schedule=r.schedule,
    )
    if problem:
        raise GenerationError(problem)
    if not reproducing:
        _check_guidance(pipe, r, asked=request.guidance)
    factor = pipe.autoencoder.params.downsample_factor
    try:
        tiling = resolve_tiling(factor, r.vae_tile, r.vae_tile_overlap)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
    r = replace(r, **dict(zip(TILING_FIELDS, tiling, strict=True)))
    try:
        windows = resolve_denoise_tiling(pipe.patch, r.denoise_tile, r.denoise_tile_overlap)
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc
    r = replace(r, **dict(zip(DENOISE_TILING_FIELDS, windows, strict=True)))
    r = _resolve_cache(pipe, r)
    r = _resolve_hires(pipe, r)
    passes = {"the sampler run": r.steps}
    if r.hires_steps:
        passes["the hires fix's second pass"] = r.hires_steps
    try:  # (pictor.guidance_methods: None for plain CFG, so its records are unchanged)
        method = resolve_guidance_method(r.guidance_method, pipe.guidance_mode, r.guidance, passes)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    if method is not None and (method.start > 0 or method.stop < 1) and r.composable and uses_and(r.prompt):
        total = sum(weight for _, weight in split_and(r.prompt))
        if abs(total - 1.0) > 1e-6:
            # Outside the interval no negative pass runs, and A1111's AND guidance (negative + sum of w_i
            # (v_i - negative)) cannot be formed without it: the velocity would jump at the interval's edges.
            raise GenerationError(
                f"a guidance interval with AND weights that add up to {total:g}: outside the interval no "
                "negative pass runs, so only weights that add up to 1 give the same velocity there as "
                "guidance 1; scale the weights to add up to 1 (e.g. 'a:0.5 AND b:0.5'), or drop the interval"
            )
    r = replace(r, guidance_method=method)
    if is_cfg_pp(r.sampler):  # refused before anything runs or is queued, not when the velocity is built
        problem = cfg_pp_problem(r.sampler, pipe.guidance_mode, method)
        if problem is None and r.redux_image is not None and pipe.guidance_mode == "cfg":
            # Redux runs on a CFG model at guidance 1 with the prompt's pass alone: its picture's tokens
            # have no place in the negative pass a CFG++ sampler would add there
            problem = (
                f"sampler {r.sampler} is a CFG++ sampler: it runs a negative pass beside the prompt's, but a "
                "Redux picture on a model with real CFG runs at guidance 1 with the prompt's pass alone; use "
                "the sampler without _cfg_pp"
            )
        if problem:
            raise GenerationError(problem)
    r = _resolve_passes(pipe, r)
    # The texts once the steps are known good (with prompt editing, each text its schedules reach; with
    # regions or AND, each pass's).
    assert r.steps
    hires_steps = (r.hires_steps or r.steps) if r.hires_scale else None
    texts = request_texts(
        r.prompt, r.negative_prompt or "", r.prompt_editing, r.steps, hires_steps, r.regions, r.composable
    )
    if r.prompt_weights:
        _check_prompt_weights(pipe, texts)
    # As diffusers does: the image is made, but the user learns what was not read.
    for notice in text_notices(pipe, texts, r.prompt_weights):
        warnings.warn(notice, PictorWarning, stacklevel=4)
    # FLUX.1 Canny / Depth: the control picture is fitted to the image's size, now known.
    r = resolve_control(r, pipe.name, pipe.control, pipe.config.control)
    # ControlNets: one picture each, fitted to the image's size; scales, modes and window spelled out.
    r = resolve_controlnets(r, pipe.controlnets)
    _check_denoise_tiles(r)
    problem = redux_problem(r, pipe.redux, pipe.guidance_mode)
    if problem:
        raise ReduxError(problem)
    if r.redux_image is not None:  # the picture as RGB pixels, hashed into the record
        strength = 1.0 if r.redux_strength is None else float(r.redux_strength)
        r = replace(r, redux_image=redux_pixels(r.redux_image), redux_strength=strength)
    problem = ip_adapter_problem(r, pipe.ip_adapter)
    if problem:
        raise IPAdapterError(problem)
    if r.ip_adapter_image is not None:  # the picture as RGB pixels, hashed into the record
        scale = 1.0 if r.ip_adapter_scale is None else float(r.ip_adapter_scale)
        r = replace(r, ip_adapter_image=ip_adapter_pixels(r.ip_adapter_image), ip_adapter_scale=scale)
    if not 1 <= r.num_images <= MAX_IMAGES:
        raise GenerationError(
            f"number of images must be between 1 and {MAX_IMAGES}, got {r.num_images}; for more, run "
            "again with the next --seed"
        )
    if r.batch_size is not None and r.batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {r.batch_size}")
    last = MAX_SEED - r.num_images + 1  # image i takes seed + i, up to MAX_SEED
    if not 0 <= r.seed <= last:
        raise GenerationError(f"seed must be between 0 and {last}, got {r.seed}")
    r = _resolve_variation(r, pipe.patch)
    varied = bool(r.variation_strength)  # every image keeps the seed; the variation seeds count
    aliased = [seed_notice(r.seed, 1 if varied else r.num_images)]
    if varied:
        assert r.variation_seed is not None
        aliased.append(seed_notice(r.variation_seed, r.num_images, "variation seed"))
    for notice in aliased:
        if notice:
            warnings.warn(notice, PictorWarning, stacklevel=4)
    if r.layout is not None:
        try:
            r = replace(r, layout=parse_layout(r.layout))
        except LayoutError as exc:
            raise GenerationError(str(exc)) from exc
        if pipe.layout_adapter is None:
            raise GenerationError(
                f"model '{pipe.name}' has no layout adapter, so it cannot follow a layout: pass one "
                "with --layout-adapter FILE (train it with `pictor train layout --base MODEL`), or drop "
                "the layout"
            )
    if r.reference is not None:
        if pipe.reference_adapter is None:
            raise GenerationError(
                f"model '{pipe.name}' has no reference adapter, so it cannot take a reference image: "
                "pass one with --reference-adapter FILE (train it with `pictor train reference --base "
                "MODEL`), or drop the reference"
            )
        try:
            r = replace(r, reference=reference_pixels(r.reference, r.width, r.height))
        except ReferenceImageError as exc:
            raise GenerationError(str(exc)) from exc
    if r.negative_prompt and pipe.guidance_mode != "cfg":
        raise GenerationError(
            f"model '{pipe.name}' uses {pipe.guidance_mode} guidance, which has no negative prompt; "
            "drop the negative prompt"
        )
    return r


def _resolve_variation(r: GenerationRequest, multiple: int) -> GenerationRequest:
    """Variation seeds and seed resize checked (`pictor.noise_variation`); a strength without a variation
    seed draws one, as a request without a seed draws its seed."""
    resize: tuple[int, int] | None = None
    if r.seed_resize_from is not None:
        if len(r.seed_resize_from) != 2:
            raise GenerationError(f"seed resize from must be a size WxH, got {r.seed_resize_from!r}")
        resize = (r.seed_resize_from[0], r.seed_resize_from[1])  # a list from JSON: a tuple
    problem = variation_problem(
        r.num_images, r.variation_seed, r.variation_strength, resize, multiple, MAX_PIXELS, MAX_SEED
    )
    if problem:
        raise GenerationError(problem)
    strength = float(r.variation_strength) if r.variation_strength is not None else None
    seed = r.variation_seed
    if strength and seed is None:
        seed = secrets.randbelow(2**32)
    return replace(r, variation_seed=seed, variation_strength=strength, seed_resize_from=resize)


def _check_guidance(pipe: ResolvingPipeline, r: GenerationRequest, asked: float | None) -> None:
    """Refuse guidance settings the model would not use: nothing asked for is silently dropped. (A
    stored default the model ignores is no request: only a guidance asked for is refused.)"""
    # A value equal to the model's default is no request either: the server fills defaults in.
    if pipe.guidance_mode == "none" and asked and asked != pipe.defaults.get("guidance"):
        raise GenerationError(
            f"model '{pipe.name}' takes no guidance (guidance_mode none, as FLUX.1 [schnell]): "
            f"guidance {asked:g} would change nothing; drop it or give 0"
        )
    # (A CFG++ sampler runs the negative pass at guidance 1 too and renoises with it: the negative acts.)
    if pipe.guidance_mode == "cfg" and r.negative_prompt and r.guidance == 1 and not is_cfg_pp(r.sampler):
        raise GenerationError(
            "a negative prompt acts through classifier-free guidance, which is off at guidance 1: "
            "raise the guidance (e.g. 4) or drop the negative prompt"
        )


def _check_denoise_tiles(r: GenerationRequest) -> None:
    """Denoise windows follow one another at each step; the first-block cache, which compares each call with
    the last, cannot run in them."""
    if r.denoise_tile is None:
        return
    if r.cache_threshold:
        raise GenerationError(
            "denoise tiles and the first-block cache do not go together (the cache compares each call with "
            "the last, and windows follow one another): drop one of them"
        )


def _resolve_passes(pipe: ResolvingPipeline, r: GenerationRequest) -> GenerationRequest:
    """Regional prompts and AND (composable diffusion), checked: each runs a transformer pass per prompt."""
    anded = r.composable and uses_and(r.prompt)
    problem = check_regional_options(r)
    if problem is not None:
        raise GenerationError(problem)
    if r.regional_attention and r.regions is None:
        raise GenerationError(
            "regional attention is a way to run regions: give regions (boxes with prompts) with it, or "
            "drop it"
        )
    if r.regions is None and not anded:
        return r
    if r.regions is not None:
        if anded:  # (composable on for a prompt without AND reads it as one text: regions go with that)
            raise GenerationError(
                "regional prompts and AND (composable diffusion) do not go together: give each part of the "
                "prompt a region of its own, or drop the regions"
            )
        try:
            r = replace(r, regions=parse_regions(r.regions))
        except RegionError as exc:
            raise GenerationError(str(exc)) from exc
    else:
        parts = split_and(r.prompt)
        if len(parts) > MAX_PARTS:
            raise GenerationError(
                f"the prompt has {len(parts)} parts joined by AND; at most {MAX_PARTS} (each is one more "
                "transformer pass a step)"
            )
        guided = pipe.guidance_mode == "cfg" and r.guidance != 1.0
        if not guided and sum(w for _, w in parts) <= 0:
            raise GenerationError(
                "without classifier-free guidance the AND parts' velocities are averaged by their weights, "
                "which here sum to 0 or less: give the parts weights with a positive sum"
            )
    return r


def request_texts(
    prompt: str,
    negative: str,
    editing: bool,
    steps: int,
    hires_steps: int | None,
    regions: list[dict[str, Any]] | None,
    composable: bool,
) -> list[tuple[str, str]]:
    """(what, text) for every text the model reads of a request: the prompt's and the negative prompt's
    (`texts_read`: with prompt editing each text their schedules reach over `steps` and a hires fix's second
    pass of `hires_steps`), and those regions or AND run as passes of their own, read likewise: each
    region's prompt beside the prompt, or each AND part in the prompt's place (the prompt is then never
    read as one text)."""
    texts = texts_read(prompt, negative, editing, steps, hires_steps)
    if regions:
        named = [(f"prompt of region {i}", region["prompt"]) for i, region in enumerate(regions)]
    elif composable and uses_and(prompt):
        named = [(f"prompt's AND part {i + 1}", text) for i, (text, _) in enumerate(split_and(prompt))]
        texts = [(what, text) for what, text in texts if what != "prompt"]
    else:
        return texts
    passes = [
        (what, read)
        for what, text in named
        for kind, read in texts_read(text, "", editing, steps, hires_steps)
        if kind == "prompt"
    ]
    return texts + list(dict.fromkeys(passes))


def _resolve_cache(pipe: ResolvingPipeline, r: GenerationRequest) -> GenerationRequest:
    problem = cache_threshold_problem(r.cache_threshold)
    if problem:
        raise GenerationError(problem)
    if not r.cache_threshold:
        return replace(r, cache_threshold=None)  # 0 is off: recorded like a request without one
    if not pipe.transformer.double_blocks:
        raise GenerationError(
            f"model '{pipe.name}' has no double blocks, which the first-block cache needs; drop "
            "the cache threshold"
        )
    return replace(r, cache_threshold=float(r.cache_threshold))


def text_notices(pipe: ResolvingPipeline, texts: list[tuple[str, str]], weighted: bool) -> list[str]:
    """`prompt_notices` of each text (`texts_read`'s pairs), each sentence once."""
    notices: list[str] = []
    for what, text in texts:
        if what == "negative prompt":
            said = pipe.prompt_notices(None, text, weighted)
        else:  # the prompt, a region's or an AND part: encoded as the prompt is, named as what it is
            said = pipe.prompt_notices(text, None, weighted)
            said = [n.replace("the prompt", f"the {what}", 1) for n in said]
        notices += [n for n in said if n not in notices]
    return notices


def _check_prompt_weights(pipe: ResolvingPipeline, texts: list[tuple[str, str]]) -> None:
    """The texts' weights read (errors say where), and a text encoder that can weigh tokens."""
    for what, text in texts:
        try:
            parse_weights(text or "")
        except PromptWeightError as exc:
            raise GenerationError(f"the {what}: {exc}") from None
    try:
        pipe.text_encoder.token_spans([""])
    except ValueError as exc:
        raise GenerationError(f"{exc}; drop prompt weights") from None


def _resolve_hires(pipe: ResolvingPipeline, r: GenerationRequest) -> GenerationRequest:
    upscaler = None if (r.hires_upscaler or "lanczos").lower() == "lanczos" else r.hires_upscaler
    problem = hires_problem(r.hires_scale, r.hires_strength, r.hires_steps, MAX_STEPS, upscaler)
    if problem:
        raise GenerationError(problem)
    if r.hires_scale is None:
        return r
    if upscaler is not None and (pipe.upscaler is None or pipe.upscaler.name != upscaler):
        loaded = f"'{pipe.upscaler.name}' is" if pipe.upscaler else "none is"
        raise GenerationError(
            f"hires upscaler '{upscaler}' is not loaded ({loaded}); load its file (--hires-upscaler FILE, "
            "`pictor serve --upscaler FILE`), or use lanczos"
        )
    assert r.width and r.height
    width, height = hires_size(r.width, r.height, r.hires_scale, pipe.patch)
    if (width, height) == (r.width, r.height):
        raise GenerationError(
            f"hires scale {r.hires_scale:g} rounds {r.width}x{r.height} to the same size (sizes are "
            f"multiples of {pipe.patch}); use a larger scale"
        )
    problem = settings_problem(pipe.patch, width=width, height=height)
    if problem:
        raise GenerationError(f"the hires size: {problem}")
    return replace(
        r,
        hires_strength=DEFAULT_STRENGTH if r.hires_strength is None else r.hires_strength,
        hires_steps=r.hires_steps or r.steps,
        hires_upscaler=upscaler,
    )
