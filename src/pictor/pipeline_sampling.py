"""A Pipeline's sampler runs: a request's seeds split into runs, each run's noise drawn on the CPU (the
initial noise and a stochastic sampler's fresh noise, `step_noise_seed`), the sampler over the guided
velocity, and the decode (the reproducibility rules are `pictor.pipeline`'s).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pictor.control_images import control_tokens
from pictor.controlnet_runs import ControlNetRun
from pictor.denoise_tiles import plan_windows
from pictor.edit_blending import LatentInit
from pictor.generation_request import GeneratedImage, GenerationError, GenerationRequest, ProgressFn
from pictor.guided_velocity import guided_velocity
from pictor.latent_preview import Previews, preview_pictures
from pictor.models.autoencoder_tiling import autoencoder_decode
from pictor.models.block_cache import FirstBlockCache
from pictor.models.flux import pack_latents, unpack_latents
from pictor.noise_variation import varied_noise
from pictor.notices import PictorWarning
from pictor.sampling import NoiseFn, get_sampler, get_schedule, is_stochastic
from pictor.sampling_steps import with_uncond

if TYPE_CHECKING:
    from pictor.pipeline import Pipeline

__all__ = ["in_runs", "initial_noise", "sample", "step_callback", "step_noise", "step_noise_seed"]


def step_noise_seed(seed: int, noise_pass: int, step: int) -> int:
    """The CPU generator seed of image `seed`'s fresh noise at sampler step `step` of pass `noise_pass`
    (0: the generation or edit, 1: the hires fix's second pass).

    The first 8 bytes (little-endian) of SHA-256 of the text "pictor step noise {seed} {pass} {step}":
    a pure function of the three, so each step's noise is the same whatever ran before it, and unrelated
    to the initial noise, whose generator is seeded with `seed` itself. (A hash, not an offset such as
    seed + 2**32: torch's CPU generator keeps only a seed's low 32 bits, so an offset could repeat the
    initial noise's stream.)
    """
    text = f"pictor step noise {seed} {noise_pass} {step}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def in_runs(
    r: GenerationRequest,
    progress: ProgressFn | None,
    previews: Previews | None,
    run: Callable[[GenerationRequest, list[int], ProgressFn, Previews | None], list[GeneratedImage]],
) -> list[GeneratedImage]:
    """Split a request's seeds into sampler runs of batch_size and report progress over all of them
    (and previews, each run's naming the request's index of its first image). Each run gets the
    request with its own first variation seed: image j of a run takes `variation_seed + j`."""
    assert r.seed is not None
    varied = bool(r.variation_strength)
    # image i takes seed + i; varied, every image keeps the seed (its variation seed counts instead)
    seeds = [r.seed + (0 if varied else i) for i in range(r.num_images)]
    size = r.batch_size or len(seeds)
    runs = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    per_run = int(r.steps or 0) + int(r.hires_steps or 0)  # a hires run has two sampler passes
    total = len(runs) * per_run
    done = 0
    out: list[GeneratedImage] = []
    for run_seeds in runs:

        def step_progress(step: int, _steps: int, _offset: int = done) -> None:
            if progress is not None:
                progress(_offset + step, total)

        shown = replace(previews, first_index=len(out)) if previews is not None else None
        assert not varied or r.variation_seed is not None  # resolution draws one
        run_r = replace(r, variation_seed=r.variation_seed + len(out)) if varied else r
        out += run(run_r, run_seeds, step_progress, shown)
        done += per_run
    return out


def initial_noise(
    pipe: Pipeline,
    seeds: list[int],
    lat_h: int,
    lat_w: int,
    r: GenerationRequest | None = None,
    noise_pass: int = 0,
) -> torch.Tensor:
    """Per-image noise from CPU generators: identical on every device and at every batch size. With
    `r`, its variation seeds and (on the first pass, `noise_pass` 0) its seed resize apply
    (`pictor.noise_variation`)."""
    channels = pipe.autoencoder.params.z_channels

    def draw(draw_seeds: list[int], h: int, w: int) -> torch.Tensor:
        gens = [torch.Generator("cpu").manual_seed(s) for s in draw_seeds]
        return torch.cat([torch.randn(1, channels, h, w, generator=g) for g in gens])

    if r is None:
        return draw(seeds, lat_h, lat_w).to(pipe.device, pipe.dtype)
    f = pipe.autoencoder.params.downsample_factor
    resize = r.seed_resize_from if noise_pass == 0 else None
    noise = varied_noise(
        draw,
        seeds,
        lat_h,
        lat_w,
        r.variation_seed,
        r.variation_strength,
        (resize[0] // f, resize[1] // f) if resize else None,
    )
    return noise.to(pipe.device, pipe.dtype)


def step_noise(pipe: Pipeline, seeds: list[int], shape: tuple[int, ...], noise_pass: int = 0) -> NoiseFn:
    """A stochastic sampler's fresh noise for this run: per image from CPU generators seeded by
    `step_noise_seed`, so like the initial noise it depends on neither the device nor the batch-mates.
    `shape` is one image's (packed) latent shape."""

    def noise(step: int) -> torch.Tensor:
        draws = [
            torch.randn(
                shape, generator=torch.Generator("cpu").manual_seed(step_noise_seed(s, noise_pass, step))
            )
            for s in seeds
        ]
        return torch.stack(draws).to(pipe.device, pipe.dtype)

    return noise


def sample(
    pipe: Pipeline,
    r: GenerationRequest,
    seeds: list[int],
    progress: ProgressFn,
    init: LatentInit | None = None,
    caches: list[FirstBlockCache] | None = None,
    noise_pass: int = 0,
    previews: Previews | None = None,
    first_pass_steps: int | None = None,
) -> torch.Tensor:
    """One sampler run -> decoded pixels [B, 3, H, W]. `init` starts from an edit's source latents at
    t = strength and keeps its known region; without it this is plain generation from t = 1. The run's
    first-block cache, if it has one, is appended to `caches` (for the records' counts). `noise_pass`
    tells a run's passes apart for a stochastic sampler's fresh noise (`step_noise_seed`). `previews`
    get the pictures of the sampler's prediction as it goes. `first_pass_steps`: this is a hires fix's
    second pass after a first of that many steps (prompt editing counts on from it)."""
    assert r.width and r.height and r.steps and r.sampler and r.schedule
    f = pipe.autoencoder.params.downsample_factor
    lat_h, lat_w = r.height // f, r.width // f
    with torch.inference_mode():
        noise = pipe.initial_noise(seeds, lat_h, lat_w, r, noise_pass)
        x = pack_latents(noise)
        start = 1.0 if init is None else init.strength
        ts = get_schedule(r.schedule, r.steps, image_seq_len=x.shape[1], start=start).to(pipe.device)
        # Tokens read beside the noise: Fill's masked picture and mask, or a control picture's latents.
        beside = init.fill if init is not None else None
        if r.control_image is not None:
            assert isinstance(r.control_image, np.ndarray)
            beside = control_tokens(
                pipe.autoencoder,
                r.control_image,
                r.control_canny,
                pipe.dtype,
                r.vae_tile,
                r.vae_tile_overlap,
            )
        nets = (
            ControlNetRun(pipe.controlnets, r, pipe.autoencoder, pipe.dtype, ts, pipe.transformer.params)
            if pipe.controlnets
            else None
        )
        windows = None
        if r.denoise_tile is not None:  # the transformer in windows of tokens (pictor.denoise_tiles)
            assert r.denoise_tile_overlap is not None
            size, overlap = r.denoise_tile // pipe.patch, r.denoise_tile_overlap // pipe.patch
            windows = plan_windows(lat_h // 2, lat_w // 2, size, overlap, pipe.device)
            if windows is not None and init is None:  # from noise: no composition to keep
                warnings.warn(
                    f"denoise tiles: this {r.width}x{r.height} pass starts from noise, and its "
                    f"{len(windows)} windows each draw their own part; for one composition, run the "
                    "first pass whole (a hires fix from a size no larger than one window, or an edit "
                    "of a picture)",
                    PictorWarning,
                    stacklevel=4,
                )
        fn = guided_velocity(
            pipe, r, len(seeds), lat_h, lat_w, caches, beside, nets, windows, ts, first_pass_steps
        )
        if init is not None:
            anchored = is_stochastic(r.sampler)
            inner, fn = fn, init.velocity(fn, x, anchored=anchored)
            # a CFG++ sampler's unconditional velocity keeps the known region as the guided one does
            fn = with_uncond(fn, inner, lambda u: init.velocity(u, x, anchored=anchored))
            x = init.start(x)
        sampler = get_sampler(r.sampler)
        # Only a stochastic sampler gets `noise`: a sampler written to the older four-argument
        # signature (a wrapper, a spy in a test) keeps working for the deterministic ones.
        extra = (
            {"noise": pipe.step_noise(seeds, tuple(x.shape[1:]), noise_pass)}
            if is_stochastic(r.sampler)
            else {}
        )
        x = sampler(fn, x, ts, callback=step_callback(pipe, r, progress, previews, lat_h, lat_w), **extra)
        if init is not None:
            x = init.finish(x)
        if not bool(torch.isfinite(x).all()):  # else a black image would be saved as a success
            raise GenerationError(
                "the sampler's result holds NaN or infinite values: the model's weights or a LoRA are "
                "broken, or the settings overflow it; no image was made"
            )
        latents = unpack_latents(x, lat_h, lat_w)

        def on_tile() -> None:  # a job can be cancelled between tiles too, not only between steps
            progress(r.steps, r.steps)

        pixels = autoencoder_decode(pipe.autoencoder, latents, r.vae_tile, r.vae_tile_overlap, on_tile)
        if previews is not None:  # pairs the approx previews' colours learn from, decoded anyway
            pipe.preview_colours.add(latents, pixels, f)
        return pixels


def step_callback(
    pipe: Pipeline,
    r: GenerationRequest,
    progress: ProgressFn,
    previews: Previews | None,
    lat_h: int,
    lat_w: int,
) -> Callable[[dict[str, Any]], None]:
    """The sampler's per-step callback: progress, and previews of its prediction when asked for."""
    assert r.steps

    def on_step(info: dict[str, Any]) -> None:
        step = int(info["i"]) + 1
        progress(step, r.steps)
        if previews is not None and (step % previews.every == 0 or step == r.steps):
            latents = unpack_latents(info["denoised"], lat_h, lat_w)
            pictures = preview_pictures(
                latents,
                pipe.autoencoder,
                pipe.preview_colours,
                previews.method,
                r.vae_tile,
                r.vae_tile_overlap,
            )
            previews.on_frame(pictures, previews.first_index)

    return on_step
