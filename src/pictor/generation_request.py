"""What a generation asks for (`GenerationRequest`), what it gives back (`GeneratedImage`), and the error
of a request a model cannot run (`GenerationError`). The pipeline fills a request's defaults and checks
it against its model (`Pipeline.resolve_request`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pictor.editing import ImageSource
from pictor.guidance_methods import GuidanceMethod

# (step, total) -> None; raising from it cancels the generation.
ProgressFn = Callable[[int, int], None]

MAX_SEED = 2**63 - 1
# torch's CPU generator (mt19937) keeps only a seed's low 32 bits, so the initial noise of seed s is that of
# s mod 2**32 (as in every tool that seeds torch's CPU generator: diffusers, ComfyUI). Larger seeds are still
# taken, since other tools' records carry them, but their users are told.
NOISE_SEED_RANGE = 2**32


def seed_notice(seed: int, num_images: int = 1, what: str = "seed") -> str | None:
    """A sentence for a user whose seeds (seed .. seed + num_images - 1) reach NOISE_SEED_RANGE, whose
    images repeat those of smaller seeds; None when every seed gives its own noise. `what`: "seed", or
    "variation seed" for those (`pictor.noise_variation`)."""
    last = seed + num_images - 1
    if last < NOISE_SEED_RANGE:
        return None
    first = max(seed, NOISE_SEED_RANGE)
    return (
        f"{what} {first} gives the image of {what} {first % NOISE_SEED_RANGE}: the noise generator reads "
        f"only a seed's low 32 bits, so seeds above {NOISE_SEED_RANGE - 1} repeat smaller ones; for images "
        f"of their own, use seeds 0 to {NOISE_SEED_RANGE - 1}"
    )


# Images per request: far beyond any batch, short of lists of seeds that fill memory by themselves.
MAX_IMAGES = 10_000
# How the autoencoder is run in tiles: set together, recorded together (all absent when it runs whole).
TILING_FIELDS = ("vae_tile", "vae_tile_overlap")
# How the transformer runs in windows of tokens (`pictor.denoise_tiles`): likewise set and recorded together.
DENOISE_TILING_FIELDS = ("denoise_tile", "denoise_tile_overlap")


class GenerationError(ValueError):
    """A request the model cannot run; the message says what to change."""


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int | None = None
    num_images: int = 1
    # How classifier-free guidance combines the predictions (`pictor.guidance_methods`: CFG rescale, a
    # guidance interval, APG, CFG-Zero*, Tangential CFG). None (or plain CFG): compose's CFG on every step.
    guidance_method: GuidanceMethod | None = None
    # Images per sampler run; None runs all images of the request together.
    batch_size: int | None = None
    # Boxes with phrases for the model's layout adapter (`pictor.layout_files.parse_layout`); None: none.
    layout: list[dict[str, Any]] | None = None
    # Regional prompts (`pictor.regional_prompts.parse_regions`): boxes, each with a prompt of its own and a
    # strength, followed with no adapter by one more transformer pass each per step. None: none.
    regions: list[dict[str, Any]] | None = None
    # Regions as one pass with masked attention (`pictor.regional_attention`): the regions' prompts join the
    # prompt's tokens and each reaches only its box. Off: a pass per region, their velocities blended.
    regional_attention: bool = False
    # Regional-Prompting-FLUX's controls of regional attention (`pictor.regional_attention.RegionalOptions`):
    # the steps the mask applies in from the first (a count, or a share below 1; None: every step); the mask
    # in every k-th double / single block only (None: 1, every block; the others see no region's words);
    # the share of the image tokens' attention taken from the unmasked attention in masked blocks (None: 0).
    regional_steps: float | None = None
    regional_double_interval: int | None = None
    regional_single_interval: int | None = None
    regional_base_ratio: float | None = None
    # A picture whose content the model's reference adapter carries into the images (a path, a PIL image
    # or uint8 [H, W, 3]); it is fitted to the image size. None: none.
    reference: ImageSource | np.ndarray | None = None
    # FLUX.1 Kontext: the picture to edit by the prompt's instruction (a path, a PIL image or uint8
    # [H, W, 3]), read by the transformer in context (`pictor.context_images`); fitted to the model's
    # preferred size, which the images take unless width or height is given. Only a Kontext model takes
    # one. None: none.
    context_image: ImageSource | np.ndarray | None = None
    # FLUX.1 Canny / Depth [dev]: the control picture (an edge map or a depth map; a path, a PIL image or
    # uint8 [H, W, 3]) read beside the noise (`pictor.control_images`), resized to the image's size. Only a
    # control model takes one, and a control model needs one. None: none.
    control_image: ImageSource | np.ndarray | None = None
    # (low, high): draw the control picture's Canny edges first (OpenCV's thresholds; BFL uses 50, 200),
    # for a photo given to a Canny model. None: the picture is read as it is.
    control_canny: tuple[float, float] | None = None
    # FLUX.1 Redux: a picture whose SigLIP features, projected by the Redux embedder, follow the prompt's
    # tokens (`pictor.redux_images`); needs `Pipeline.set_redux`. None: none.
    redux_image: ImageSource | np.ndarray | None = None
    # How strongly the Redux picture speaks (its tokens are multiplied by it); None: 1, BFL's.
    redux_strength: float | None = None
    # XLabs' FLUX.1 IP-Adapter: a picture whose CLIP image embedding the transformer's double blocks attend
    # to (`pictor.ip_adapter_files`); needs `Pipeline.set_ip_adapter`. None: none.
    ip_adapter_image: ImageSource | np.ndarray | None = None
    # How strongly the IP-Adapter's attention speaks (diffusers' set_ip_adapter_scale); None: 1.
    ip_adapter_scale: float | None = None
    # FLUX.1 ControlNets (`pictor.controlnet_runs`; loaded by `Pipeline.add_controlnet`): one control
    # picture per loaded ControlNet, in order (a path, a PIL image or uint8 [H, W, 3]), fitted to the
    # image's size. None: none (and then no ControlNet may be loaded).
    controlnet_images: list[ImageSource | np.ndarray] | None = None
    # Each ControlNet's residuals are multiplied by its scale: one for all, or one each. None: 1.
    controlnet_scales: list[float] | None = None
    # A Union ControlNet's mode per ControlNet (canny, tile, depth, blur, pose, gray, lq, or a number);
    # None where the ControlNet is not a Union one.
    controlnet_modes: list[str | int | None] | None = None
    # The share of the steps the ControlNets run in: from start to end (diffusers' control_guidance_start
    # and _end). None: 0 and 1, every step.
    controlnet_start: float | None = None
    controlnet_end: float | None = None
    # Decode (and, for edits, encode) through the autoencoder in tiles of this many image pixels, which
    # bounds its memory at large sizes; the result is close to, not equal to, the whole pass, so records
    # keep it. None: one pass over the whole image.
    vae_tile: int | None = None
    # Pixels neighbouring tiles share and blend over; None: a quarter of the tile.
    vae_tile_overlap: int | None = None
    # Run the transformer over windows of this many image pixels a side at each step, blending their
    # velocities (`pictor.denoise_tiles`: MultiDiffusion, A1111's Tiled Diffusion), which bounds its memory
    # and time at large sizes; for refining (img2img, a hires fix's second pass), since windows do not
    # coordinate a composition. A pass no larger than one window runs whole. None: every pass whole.
    denoise_tile: int | None = None
    # Pixels neighbouring windows share and blend over; None: a quarter of the window.
    denoise_tile_overlap: int | None = None
    # Hires fix (`pictor.hires`): after the first pass at width x height, upscale by this factor and redraw
    # that share (strength) of each picture in hires_steps steps. None: one pass. Defaults: strength 0.3,
    # the request's steps.
    hires_scale: float | None = None
    hires_strength: float | None = None
    hires_steps: int | None = None
    # What enlarges the first pass: None (or "lanczos"): Lanczos; else the name of the upscale model that
    # `Pipeline.set_upscaler` loaded (ESRGAN and the like: A1111's "Hires upscaler").
    hires_upscaler: str | None = None
    # First-block cache (`pictor.models.block_cache`): on steps where the transformer's first block changed
    # by at most this share since its last full pass, the other blocks are skipped. None or 0: off.
    cache_threshold: float | None = None
    # Read the prompt and negative prompt for A1111's weights, "(words:1.5)", "(words)",
    # "[words]" (`pictor.prompt_weights`); off: brackets are text like any other.
    prompt_weights: bool = False
    # A1111's prompt editing in the prompt and negative prompt, "[from:to:when]", "[to:when]",
    # "[from::when]", "[a|b]" (`pictor.prompt_editing`): the text changes during sampling. Needs
    # prompt_weights (A1111 reads its weights in every text). Off: brackets are read as prompt_weights says.
    prompt_editing: bool = False
    # A1111's composable diffusion (`pictor.composable_prompts`): the prompt's parts joined by "AND", each
    # with an optional ":weight", each run as a pass of its own and guided together. Off: AND is a word.
    composable: bool = False
    # Variation seeds (`pictor.noise_variation`, A1111's): with a strength above 0 (at most 1), every image
    # keeps `seed` and image i blends its noise with that of variation seed `variation_seed + i` (None: a
    # random one). A variation seed needs a strength; strength None or 0: off.
    variation_seed: int | None = None
    variation_strength: float | None = None
    # A1111's "resize seed from" (width, height pixels): the first pass's noise is drawn for an image of this
    # size and centred on the image's own, so a composition carries over to a nearby size. None: off.
    seed_resize_from: tuple[int, int] | None = None


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    record: dict[str, Any] = field(default_factory=dict)
