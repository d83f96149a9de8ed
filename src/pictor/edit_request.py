"""What an edit asks for: `EditRequest`, the edit's counterpart of `pictor.generation_request`'s
`GenerationRequest` (img2img, inpainting or outpainting of an image towards a prompt).

Separate from `pictor.editing`, which checks a request and prepares its inputs (`prepare_edit`), so the
request reads on its own: its fields and what each means, which the server, reproduction and the command
line fill in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pictor.edit_images import ImageSource
from pictor.guidance_methods import GuidanceMethod

DEFAULT_FEATHER = 2


@dataclass
class EditRequest:
    """An edit of `image` towards `prompt`.

    The generation fields (negative_prompt ... batch_size) mean what they mean in
    `pictor.pipeline.GenerationRequest` and carry the same names: `Pipeline.edit` copies them over by name,
    so a field added there must be added here too (tests/test_editing.py checks). Width and height are not
    among them: an edit keeps the image's size (plus `expand`, or times `upscale`).
    """

    image: ImageSource
    prompt: str
    # White (>= 128 after conversion to grey) = repaint, black = keep; same size as `image` (or a scaled
    # copy with the same aspect ratio, resized with nearest); with `upscale`, also the enlarged size.
    mask: ImageSource | None = None
    # None: 1.0 for inpainting/outpainting (with upscale too), DEFAULT_IMG2IMG_STRENGTH for img2img,
    # DEFAULT_UPSCALE_STRENGTH for an upscaling img2img.
    strength: float | None = None
    # Pixels added on the (left, top, right, bottom); each a multiple of the model's pixel multiple.
    expand: tuple[int, int, int, int] | None = None
    fill: str = "edge"  # how the expanded area starts: "edge" (replicated border pixels) or "noise"
    feather: int = DEFAULT_FEATHER  # pixels of blending inside the mask edge; 0 = hard edge
    # Enlarge the source (and mask) by this factor, above 1 and at most MAX_UPSCALE, before the edit; the
    # size rounds to the model's pixel multiple. img2img's default strength is then DEFAULT_UPSCALE_STRENGTH.
    upscale: float | None = None
    # With `upscale`: the name of the upscale model the pipeline loaded (`Pipeline.set_upscaler`), or
    # None / "lanczos" for Lanczos.
    upscaler: str | None = None
    # Inpainting: "whole" repaints the mask on the whole image; "masked" cuts the mask's box (grown by
    # `mask_padding` pixels) out, inpaints it at `inpaint_size` (None: the model's default pixel count in
    # the box's aspect ratio) and blends it back (`pictor.inpaint_area`).
    inpaint_area: str = "whole"
    mask_padding: int | None = None  # None: DEFAULT_MASK_PADDING
    inpaint_size: tuple[int, int] | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int | None = None
    num_images: int = 1
    guidance_method: GuidanceMethod | None = None  # `GenerationRequest.guidance_method`
    batch_size: int | None = None
    prompt_editing: bool = False
    composable: bool = False
    variation_seed: int | None = None
    variation_strength: float | None = None
    seed_resize_from: tuple[int, int] | None = None  # refused: an edit's composition is its picture's
    layout: list[dict[str, Any]] | None = None
    regions: list[dict[str, Any]] | None = None
    regional_attention: bool = False
    regional_steps: float | None = None  # `GenerationRequest.regional_steps` and the like
    regional_double_interval: int | None = None
    regional_single_interval: int | None = None
    regional_base_ratio: float | None = None
    reference: ImageSource | np.ndarray | None = None
    context_image: ImageSource | np.ndarray | None = None
    control_image: ImageSource | np.ndarray | None = None
    control_canny: tuple[float, float] | None = None
    redux_image: ImageSource | np.ndarray | None = None
    redux_strength: float | None = None
    ip_adapter_image: ImageSource | np.ndarray | None = None
    ip_adapter_scale: float | None = None
    controlnet_images: list[ImageSource | np.ndarray] | None = None
    controlnet_scales: list[float] | None = None
    controlnet_modes: list[str | int | None] | None = None
    controlnet_start: float | None = None
    controlnet_end: float | None = None
    vae_tile: int | None = None
    vae_tile_overlap: int | None = None
    denoise_tile: int | None = None
    denoise_tile_overlap: int | None = None
    cache_threshold: float | None = None
    prompt_weights: bool = False

    @property
    def mode(self) -> str:
        if self.expand is not None and any(self.expand):
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"
