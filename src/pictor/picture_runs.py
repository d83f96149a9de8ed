"""Sampler runs that start from pictures instead of pure noise: an edit (img2img, inpainting, outpainting)
and the hires fix's second pass. `Pipeline.run_edit_seeds` / `run_hires_seeds` are these, so `reproduce`
reruns them the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pictor.edit_blending import LatentInit, composite, feather_weights, latent_mask, to_model_pixels, to_pil
from pictor.editing import EditInputs, new_area
from pictor.fill_images import check_fill_request, fill_conditioning
from pictor.generation_request import GeneratedImage, GenerationRequest, ProgressFn
from pictor.hires import hires_record, hires_size, upscale
from pictor.inpaint_area import back_to_box
from pictor.latent_preview import Previews
from pictor.models.autoencoder_tiling import autoencoder_encode
from pictor.models.block_cache import FirstBlockCache, cache_passes
from pictor.models.flux import pack_latents
from pictor.models.offload import bring_in

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline


def _encode(
    pipe: Pipeline, r: GenerationRequest, pixels: torch.Tensor, on_tile: Callable[[], None]
) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> packed latents, whole or in the request's VAE tiles (``on_tile``,
    which may cancel, after each)."""
    with torch.inference_mode():
        z = autoencoder_encode(
            pipe.autoencoder, pixels.to(pipe.device, pipe.dtype), r.vae_tile, r.vae_tile_overlap, on_tile
        )
        return pack_latents(z)


def run_edit_seeds(
    pipe: Pipeline,
    r: GenerationRequest,
    inputs: EditInputs,
    seeds: list[int],
    progress: ProgressFn,
    previews: Previews | None = None,
) -> list[GeneratedImage]:
    """One edit sampler run over exactly these seeds: the source noised to t = strength, the known region
    (outside the mask) kept on its path and composited back."""
    caches: list[FirstBlockCache] = []
    if pipe.fill:
        check_fill_request(r, has_mask=inputs.mask is not None)
    if inputs.strength == 0.0:
        # Nothing is repainted: the input itself, not a lossy autoencoder round trip.
        kept = inputs.picture if inputs.area is not None else inputs.canvas
        images = [Image.fromarray(kept) for _ in seeds]
    else:
        pixels = to_model_pixels(inputs.canvas, pipe.device, pipe.dtype)
        z0 = _encode(pipe, r, pixels, lambda: progress(0, int(r.steps or 0)))
        mask = fill = None
        if pipe.fill:  # the model reads the masked picture and paints the region: nothing to blend
            assert inputs.mask is not None
            bring_in(pipe.autoencoder)  # under offload: in before the helper reads where it is
            fill = fill_conditioning(
                pipe.autoencoder, inputs.canvas, inputs.mask, pipe.dtype, r.vae_tile, r.vae_tile_overlap
            )
        elif inputs.mask is not None:
            ae = pipe.autoencoder.params
            mask = latent_mask(inputs.mask, ae.downsample_factor, ae.z_channels).to(pipe.device)
        init = LatentInit(z0=z0, strength=inputs.strength, mask=mask, fill=fill)
        images = to_pil(pipe.sample(r, seeds, progress, init, caches, previews=previews))
        if inputs.area is not None:  # only the masked area was drawn: back into the whole picture
            images = _stitch(images, inputs)
        elif inputs.mask is not None:
            weights = feather_weights(inputs.mask, inputs.feather)
            if inputs.expand is not None:  # the new area has no pixels of its own to blend with
                weights = np.maximum(weights, new_area(inputs.canvas.shape[:2], inputs.expand))
            images = [Image.fromarray(composite(np.asarray(im), inputs.canvas, weights)) for im in images]
    edit_fields = inputs.record_fields()
    return [
        GeneratedImage(
            image,
            seed,
            {**pipe.record(r, seed, seeds, j), **edit_fields, **cache_passes(caches, j, len(seeds))},
        )
        for j, (image, seed) in enumerate(zip(images, seeds, strict=True))
    ]


def _stitch(generated: list[Image.Image], inputs: EditInputs) -> list[Image.Image]:
    """Inpainted masked areas (at the size they were drawn at) resized back to their box and blended into
    the whole picture inside the mask, feathered at the picture's own size (once for all): outside the mask,
    the picture's pixels, exactly."""
    area = inputs.area
    assert area is not None
    x0, y0, x1, y1 = area.box
    weights = feather_weights(area.picture_mask, inputs.feather)[y0:y1, x0:x1]
    out = []
    for image in generated:
        stitched = inputs.picture.copy()
        region = back_to_box(np.asarray(image), area)
        stitched[y0:y1, x0:x1] = composite(region, inputs.picture[y0:y1, x0:x1], weights)
        out.append(Image.fromarray(stitched))
    return out


def run_hires_seeds(
    pipe: Pipeline,
    r: GenerationRequest,
    seeds: list[int],
    progress: ProgressFn,
    previews: Previews | None = None,
) -> list[GeneratedImage]:
    """A hires-fix run over exactly these seeds: the first pass at the request's size, upscaled (Lanczos,
    or the pipeline's upscale model and then Lanczos), then image-to-image at the larger size from
    t = hires_strength with the same seeds."""
    assert r.width and r.height and r.steps and r.hires_scale and r.hires_strength and r.hires_steps
    steps, total = r.steps, r.steps + r.hires_steps  # progress runs over both passes
    caches: list[FirstBlockCache] = []
    first = to_pil(pipe.sample(r, seeds, lambda i, _n: progress(i, total), caches=caches, previews=previews))
    width, height = hires_size(r.width, r.height, r.hires_scale, pipe.patch)
    model = pipe.upscaler if r.hires_upscaler else None  # resolution checked it is the one asked for
    if model is not None:
        bring_in(model.net)  # under offload: in before the upscale reads where it is (its input, its tiles)
    pixels = torch.from_numpy(upscale(first, width, height, model)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z0 = _encode(pipe, r, pixels, lambda: progress(steps, total))  # a tile of the upscaled first pass
    init = LatentInit(z0=z0, strength=r.hires_strength, mask=None)
    second = replace(r, width=width, height=height, steps=r.hires_steps)
    # noise_pass=1: a stochastic sampler's fresh noise here is not the first pass's drawn again
    second_pass = pipe.sample(
        second,
        seeds,
        lambda i, _n: progress(steps + i, total),
        init,
        caches,
        noise_pass=1,
        previews=previews,
        first_pass_steps=steps,
    )
    images = to_pil(second_pass)
    extra = {"hires": hires_record(r.hires_scale, r.hires_strength, r.hires_steps, width, height, model)}
    return [
        GeneratedImage(
            image, seed, {**pipe.record(r, seed, seeds, j), **extra, **cache_passes(caches, j, len(seeds))}
        )
        for j, (image, seed) in enumerate(zip(images, seeds, strict=True))
    ]
