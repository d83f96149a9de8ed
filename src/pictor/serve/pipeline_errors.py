"""The pipeline's errors about request values, in the API's words: which request field they are about, and
their CLI wording (``--control IMAGE``, ``--redux-strength``, ``--ip-adapter IMAGE``...) replaced by the
API's field names.

The pipeline is shared with the CLI, so its messages name flags; an API client never typed one. Both tables
are small and ordered (the first rule that matches wins); `tests/serve/test_serve_job_errors.py` runs them
over the messages the pipeline really gives, so a reworded message that no rule matches any more fails a test
rather than reaching a client unnamed.
"""

from __future__ import annotations

import re
from typing import Any

from pictor.editing import EditError
from pictor.layout_files import LayoutError
from pictor.pipeline import GenerationError
from pictor.reference_files import ReferenceImageError
from pictor.regional_attention import REGIONAL_OPTION_FIELDS
from pictor.regional_prompts import RegionError

# What the pipeline raises for a request it cannot run as asked (a value, or a value this model refuses).
REQUEST_ERRORS = (GenerationError, EditError, LayoutError, ReferenceImageError, RegionError)

CONTROLNET_FIELDS = (
    "controlnet_images",
    "controlnet_scales",
    "controlnet_modes",
    "controlnet_start",
    "controlnet_end",
)

# An edit's multipart field for the ControlNet pictures: one file each, the field repeated.
FORM_CONTROLNET_FILE = "controlnet_image"

# (a regex searched in the pipeline's message, the request field it is about); the first match wins. Most
# messages start with the setting ("steps must be...", "the mask is..."); the rest are told apart by the
# words they use for it.
FIELD_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), field)
    for pattern, field in (
        (r"^(width|height|size) ", "size"),
        (r"^steps ", "steps"),
        # guidance methods (guidance_methods.guidance_method_problem): before guidance's rule, which "guidance
        # method ..." and "guidance interval ..." would meet. A method on a distilled model or at guidance 1
        # is about the method; an interval that holds none of the steps about its stop (usually too low); the
        # request's own values are checked before that, by the dataclass (serve/guidance_fields.py)
        (r"^guidance method ", "guidance_method"),
        (r"^guidance interval ", "guidance_method.stop"),
        (r"^zero init steps ", "guidance_method.zero_init_steps"),
        (r"^guidance |takes no guidance", "guidance"),
        # variation seeds (noise_variation.variation_problem; an edit's refusal of seed resize): before
        # "seed ", which "seed resize from..." would meet; a variation seed without a strength is about the
        # strength, which is missing (as hires settings without a scale are)
        (r"^seed resize from", "seed_resize_from"),
        (r"^variation strength|without a variation strength", "variation_strength"),
        (r"^variation seed", "variation_seed"),
        (r"^seed ", "seed"),
        (r"^number of images", "n"),
        (r"^unknown sampler", "sampler"),
        # a CFG++ sampler on a model or guidance interval without a negative pass (guidance_methods)
        (r"^sampler \S+ is a CFG\+\+ sampler", "sampler"),
        (r"^unknown schedule", "schedule"),
        # prompt weights: a text encoder without token offsets, or a weight that is no number
        (r"cannot weigh prompts|prompt weights need a fast tokenizer", "prompt_weights"),
        # prompt editing without prompt weights: the weights are what is missing
        (r"^prompt editing reads A1111's prompt syntax", "prompt_weights"),
        (r"^the negative prompt: prompt weight", "negative_prompt"),
        (r"^the prompt: prompt weight", "prompt"),
        # a weight in one of the prompt's AND parts (composable diffusion reads each part as a text)
        (r"^the prompt's AND part \d+: prompt weight", "prompt"),
        (r"^the prompt of region \d+: prompt weight", "regions"),
        # upscaling edits (edit_upscale): a model named without a factor is about the missing factor
        (r"^upscaler '.*' enlarges the source", "upscale"),
        (r"^upscaler '", "upscaler"),
        # inpainting only the masked area (inpaint_area, editing._check_area)
        (r"or inpaints only the masked area", "inpaint_area"),
        (r"^upscale |^an edit either enlarges its source", "upscale"),
        (r"^mask padding", "mask_padding"),
        (r"^the inpaint size|^inpaint size", "inpaint_size"),
        (r"inpaint area", "inpaint_area"),
        # outpainting (editing._check_expand, prepare_edit): a side, or the grown canvas; the mask's blend
        # and how the added area starts ("unknown fill '...'"; FLUX.1 Fill, a model, is named with its
        # "FLUX.1"). "strength 0 keeps the image ..., so the expanded area would stay its raw fill" is about
        # the strength (below)
        (r"^expand |^the expanded canvas", "expand"),
        (r"^feather ", "feather"),
        (r"^unknown fill ", "fill"),
        (r"^the mask|FLUX\.1 Fill model: it repaints", "mask"),
        (r"^the image", "image"),
        (r"^strength", "strength"),
        # "hires strength, steps and upscaler need a hires scale": the scale is what is missing
        (r"^hires strength,? (and )?steps( and upscaler)? need a hires scale", "hires_scale"),
        (r"^hires strength", "hires_strength"),
        (r"^hires steps", "hires_steps"),
        (r"^hires upscaler", "hires_upscaler"),
        # "the hires fix cannot be combined with a context image; drop the hires scale"
        (r"^hires scale|^the hires (size|fix)", "hires_scale"),
        # AND (composable diffusion; request_resolution._resolve_passes): before the regions' rule, which
        # "regional prompts and AND ... do not go together" would meet. Regions are refused with a prompt
        # that composable splits at AND, so composable is the field to blame: regions are fine on their own.
        (r"^regional prompts and AND|parts joined by AND|the AND parts' velocities", "composable"),
        # regional attention without regions (request_resolution._resolve_passes): the switch is what is
        # wrong, not the regions it asks for (the server refuses it before queueing too, service.py)
        # its Regional-Prompting-FLUX controls (regional_attention.check_regional_options): each message
        # starts with the field it is about ("regional_steps must be ...", "regional_base_ratio shapes
        # regional attention: ..."); the first named when several are given without regional attention
        *((rf"^{name}\b", name) for name in REGIONAL_OPTION_FIELDS),
        (r"^regional attention", "regional_attention"),
        # regional prompts (regional_prompts.parse_regions): after inpaint_area's, whose "regions ... cover
        # the whole image, but inpaint area 'masked'" is about the area (as for layout boxes)
        (r"^regional prompts|^regions?\b|^region \d+:", "regions"),
        # denoise tiles (generation_settings.denoise_tiling_problem, request_resolution): before the cache's
        # rule, which "denoise tiles and the first-block cache do not go together" would meet; an overlap
        # without a tile is about the tile, which is missing (as hires settings without a scale are)
        (r"^denoise tile overlap ", "denoise_tile_overlap"),
        (r"^denoise tiles? |^a denoise tile overlap needs a tile", "denoise_tile"),
        (r"^cache threshold|first-block cache", "cache_threshold"),
        # an upscale job's settings (upscaling.upscale_problem), checked again when the job runs
        (r"^the upscale factor", "scale"),
        (r"^the tile size", "tile"),
        (r"^the tile overlap", "overlap"),
        (r"^layout|layout adapter|take a layout\b", "layout"),
        (
            r"^reference|reference adapter|take a reference picture|Redux picture and a reference",
            "reference_image",
        ),
        (r"context image", "context_image"),
        # FLUX.1 ControlNets (controlnet_runs): a field given without ControlNets names itself; the rest
        # are told apart by their words, before "control picture" below takes them.
        *((rf"^{name} was given but no ControlNet", name) for name in CONTROLNET_FIELDS),
        (
            r"ControlNets? (is|are) loaded: give|control pictures for \d+ ControlNets|ControlNet picture",
            "controlnet_images",
        ),
        (r"ControlNet scale", "controlnet_scales"),
        (r"ControlNet modes for|--controlnet-mode|^ControlNet '.*': mode ", "controlnet_modes"),
        (r"ControlNet's start and end", "controlnet_start"),
        (r"ControlNet window", "controlnet_end"),
        (r"ControlNets are not combined with a reference", "reference_image"),
        # a Canny threshold, or control_canny where it has nothing to draw for (no control model, Depth)
        (r"^canny thresholds|so --canny|--canny makes", "control_canny"),
        (r"control picture", "control_image"),
        (r"Redux strength", "redux_strength"),
        (r"Redux picture|^FLUX\.1 Redux", "redux_image"),
        # XLabs' IP-Adapter: "an IP-Adapter scale without an IP-Adapter picture" is about the scale
        (r"IP-Adapter scale", "ip_adapter_scale"),
        (r"IP-Adapter picture", "ip_adapter_image"),
        (r"negative prompt", "negative_prompt"),
    )
)

# What a request may send as hires_upscaler, said where one names an upscale model that is not loaded.
HIRES_UPSCALER_HELP = (
    "send lanczos or the name of the upscale model the server loaded (GET /v1/models: upscaler; a server "
    "loads one with pictor serve --upscaler FILE)"
)

# Whole CLI phrases with an API equivalent, rewritten before single flags (see FLAG_FIELDS).
PHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), words)
    for pattern, words in (
        (r" \(`--control IMAGE`, the server's control_image\)", " as control_image"),
        (
            r"pass --redux-model (\S+) --siglip (\S+)",
            r"this server was started without them (pictor serve --redux-model \1 --siglip \2); drop "
            "redux_image",
        ),
        (
            r"needs --ip-adapter-model FILE and --clip-vision FOLDER \(([^)]*)\)",
            r"needs the IP-Adapter (\1), which this server was started without (pictor serve "
            "--ip-adapter-model FILE --clip-vision DIR); drop ip_adapter_image",
        ),
        (  # the same without the parenthesis, should the pipeline's words lose it
            r"needs --ip-adapter-model FILE and --clip-vision FOLDER",
            "needs the IP-Adapter, which this server was started without (pictor serve --ip-adapter-model "
            "FILE --clip-vision DIR); drop ip_adapter_image",
        ),
        (
            r"pass one with --layout-adapter FILE \(train it with `pictor train layout --base MODEL`\), "
            "or drop the layout",
            "drop layout (a server's layout adapter comes with the model it serves)",
        ),
        (
            r"pass one with --reference-adapter FILE \(train it with `pictor train reference --base "
            r"MODEL`\), or drop the reference",
            "drop reference_image (a server's reference adapter comes with the model it serves)",
        ),
        (
            r"`pictor edit --source IMG --mask MASK`, or the server's edits with a mask",
            "POST /v1/images/edits",
        ),
        (r"run again with the next --seed", "send another request with the next seed"),
        (
            r"load one with --controlnet MODEL",
            "this server was started without ControlNets (pictor serve --controlnet MODEL); drop it",
        ),
        (
            r" \(in the order of --controlnet\)",
            " (one per ControlNet, in the order GET /v1/models lists them)",
        ),
        (r"\(or give 'none' in its place\)", "(or null in its place)"),
        (r"^hires strength and steps need a hires scale", "hires_strength and hires_steps need hires_scale"),
        (
            r"^hires strength, steps and upscaler need a hires scale",
            "hires_strength, hires_steps and hires_upscaler need hires_scale",
        ),
        (r"^hires upscaler '", "hires_upscaler '"),
        (
            r"load its file \(--hires-upscaler FILE, `pictor serve --upscaler FILE`\), or use lanczos",
            HIRES_UPSCALER_HELP,
        ),
        (r"give the scale too$", "give hires_scale too"),
        (
            r"load its file \(--upscaler FILE, `pictor serve --upscaler FILE`\), or use lanczos",
            HIRES_UPSCALER_HELP,
        ),
        (r"; drop prompt weights$", "; send prompt_weights false"),
        (
            r"give each part of the prompt a region of its own, or drop the regions$",
            "give each part of the prompt a region of its own and send composable false, or drop the regions",
        ),
        (
            r"turn prompt weights on too \(--prompt-weights; --prompt-editing on the command line does\)$",
            "send prompt_weights true with prompt_editing",
        ),
        (r"add inpaint area 'masked' or drop it", "send inpaint_area masked or drop it"),
        (
            r"^a denoise tile overlap needs a tile size: give the tile too$",
            "denoise_tile_overlap needs denoise_tile: give denoise_tile too",
        ),
    )
)

# Request flags of `pictor generate` / `pictor edit` -> the API's field. Flags of the server itself
# (--redux-model, --siglip, --ip-adapter-model, --clip-vision, --vae-tile, --lora-dir...) and of other
# commands stay: they tell the operator what to change. A metavar after a flag (IMAGE, FILE) goes with it.
FLAG_FIELDS = {
    "canny": "control_canny",
    "control": "control_image",
    "context": "context_image",
    "reference": "reference_image",
    "redux": "redux_image",
    "redux-strength": "redux_strength",
    "ip-adapter": "ip_adapter_image",
    "ip-adapter-scale": "ip_adapter_scale",
    "source": "image",
    "mask": "mask",
    "strength": "strength",
    "size": "size",
    "width": "size",
    "height": "size",
    "steps": "steps",
    "guidance": "guidance",
    "sampler": "sampler",
    "schedule": "schedule",
    "seed": "seed",
    "variation-seed": "variation_seed",
    "variation-strength": "variation_strength",
    "seed-resize-from": "seed_resize_from",
    "num-images": "n",
    "negative-prompt": "negative_prompt",
    "layout": "layout",
    "regions": "regions",
    "hires": "hires_scale",
    "hires-scale": "hires_scale",
    "hires-strength": "hires_strength",
    "hires-steps": "hires_steps",
    "hires-upscaler": "hires_upscaler",
    "cache-threshold": "cache_threshold",
    "denoise-tile": "denoise_tile",
    "denoise-tile-overlap": "denoise_tile_overlap",
    "upscale": "upscale",  # (--upscaler is also the server's own flag: kept)
    "inpaint-area": "inpaint_area",
    "mask-padding": "mask_padding",
    "inpaint-size": "inpaint_size",
    "expand": "expand",
    "fill": "fill",
    "feather": "feather",
    "prompt-weights": "prompt_weights",
    "prompt-editing": "prompt_editing",
    "composable": "composable",
    "regional-attention": "regional_attention",
    "regional-steps": "regional_steps",
    "regional-double-interval": "regional_double_interval",
    "regional-single-interval": "regional_single_interval",
    "regional-base-ratio": "regional_base_ratio",
    "controlnet-image": "controlnet_images",
    "controlnet-scale": "controlnet_scales",
    "controlnet-mode": "controlnet_modes",
    "controlnet-start": "controlnet_start",
    "controlnet-end": "controlnet_end",
}
_FLAG = re.compile(r"`?--([a-z][a-z-]*)( [A-Z][A-Z_]*\b)?`?")


def field_of(message: str) -> str | None:
    """The request field a pipeline message is about, or None when it names none (a server setting)."""
    return next((field for pattern, field in FIELD_RULES if pattern.search(message)), None)


def api_message(message: str) -> str:
    """A pipeline message with its CLI wording replaced by the API's field names."""
    for pattern, words in PHRASES:
        message = pattern.sub(words, message)

    def field(match: re.Match[str]) -> str:
        return FLAG_FIELDS.get(match.group(1), match.group(0))

    return _FLAG.sub(field, message)


def request_error(exc: Exception, form: bool = False) -> tuple[str, str | None]:
    """(the message in the API's words, the field it is about) for a pipeline error about a request.
    `form`: an edit's multipart form, whose ControlNet pictures are the repeated file field controlnet_image
    (a JSON body's list is controlnet_images)."""
    message = str(exc)
    text, field = api_message(message), field_of(message)
    if form:
        text = text.replace("controlnet_images", FORM_CONTROLNET_FILE)
        field = FORM_CONTROLNET_FILE if field == "controlnet_images" else field
    return text, field


def job_error(exc: Exception, form: bool = False) -> dict[str, Any]:
    """A job's error for a request the model refused when the job ran (accepted while the model loaded, or
    queued before a restart with another model): its field in `param` and at the start of the message, as
    the history shows the message without the request beside it. `form`: as for `request_error`."""
    message, field = request_error(exc, form)
    # The field as a word: "steps must be..." names it already, "number of images..." (n's) does not.
    if field and not re.match(rf"{re.escape(field)}\b", message):
        message = f"{field}: {message}"
    return {"message": message, "type": "invalid_request_error", "code": "invalid_parameters", "param": field}
