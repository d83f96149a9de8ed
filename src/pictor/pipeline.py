"""Pipeline: GenerationRequest -> images. The one place that wires text encoder, transformer, sampler and
autoencoder together (the request types are `pictor.generation_request`'s, the conditioned and guided
velocity `pictor.guided_velocity`'s).

Reproducibility rules:
- noise is drawn on the CPU from a per-image seed (image i of a request uses seed + i), so an image does not
  depend on the device or on how many images share its sampler run;
- text is padded to the encoder's fixed length, so a prompt's conditioning never depends on its batch-mates;
- the record of each image names the seeds of the sampler run it came from, so `reproduce` reruns exactly
  that run and gets the same pixels on the same device and dtype;
- a stochastic sampler's fresh noise (euler_ancestral, dpmpp_2m_sde, lcm) is drawn the same way, on the CPU
  per image, from generators of its own (`step_noise_seed`), so the initial noise, and with it every image
  of the deterministic samplers, is exactly what it was before stochastic samplers existed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pictor import __version__, picture_runs
from pictor.checkpoint import (
    BundleConfig,
    CheckpointError,
    model_hash,
)
from pictor.context_images import context_fields
from pictor.control_images import control_fields, control_tokens, is_control_model
from pictor.controlnet_runs import ControlNetRun, ControlNetUnit, controlnet_fields, open_controlnet
from pictor.denoise_tiles import plan_windows
from pictor.edit_blending import LatentInit, to_pil
from pictor.editing import EditInputs, EditRequest, image_info, prepare_edit
from pictor.fill_images import check_fill_request, is_fill_model
from pictor.generation_request import (
    DENOISE_TILING_FIELDS,
    MAX_SEED,
    TILING_FIELDS,
    GeneratedImage,
    GenerationError,
    GenerationRequest,
    ProgressFn,
    seed_notice,
)
from pictor.generation_settings import MAX_PIXELS, settings_problem
from pictor.guided_velocity import guided_velocity
from pictor.hires import HIRES_FIELDS, source_upscaler
from pictor.ip_adapter_files import IPAdapterModel, ip_adapter_fields, open_ip_adapter
from pictor.latent_preview import LatentColours, Previews, preview_pictures
from pictor.layout_files import LayoutError, open_layout_adapter
from pictor.models.autoencoder import AutoEncoder
from pictor.models.autoencoder_tiling import autoencoder_decode
from pictor.models.block_cache import FirstBlockCache, cache_passes
from pictor.models.flux import Flux, pack_latents, unpack_latents
from pictor.models.layout import LayoutAdapter
from pictor.models.offload import Mover, Offload
from pictor.models.reference import (
    ReferenceAdapter,
)
from pictor.models.text import TextEmbeddings, TextEncoder
from pictor.models.weight_storage import place, storage_name
from pictor.noise_variation import variation_fields, varied_noise
from pictor.notices import PictorWarning
from pictor.pipeline_offload import check_offload, home_device, make_offload, offload_groups
from pictor.presets import get_preset
from pictor.prompt_weights import PromptWeightError, parse_weights, plain_text
from pictor.redux_images import ReduxModel, open_redux, redux_fields
from pictor.reference_files import (
    ReferenceImageError,
    open_reference_adapter,
)
from pictor.regional_attention import regional_record_fields
from pictor.request_resolution import resolve_request
from pictor.sampling import NoiseFn, get_sampler, get_schedule, is_stochastic
from pictor.sampling_steps import with_uncond
from pictor.upscaler_files import UpscalerFile, load_upscaler

# Re-exported: callers import the request types from here, with the pipeline that runs them.
__all__ = [
    "MAX_SEED",
    "GeneratedImage",
    "GenerationError",
    "GenerationRequest",
    "Pipeline",
    "ProgressFn",
    "seed_notice",
    "step_noise_seed",
    "to_pil",
]

GUIDANCE_MODES = ("cfg", "distilled", "none")
# An edit's size comes from its image (and expand), never from the request.
_SIZE = ("width", "height")


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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(
        self,
        transformer: Flux,
        autoencoder: AutoEncoder,
        text_encoder: TextEncoder,
        config: BundleConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model_id_hash: str | None = None,
        offload: str | None = None,
        blocks_on_device: int = 0,
    ) -> None:
        self.device = torch.device(device) if device is not None else _default_device()
        # bf16 on accelerators (FLUX.1 is trained in it); fp32 on the CPU where bf16 matmuls are slow.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        # CPU offload (`set_offload`): checked before anything moves, so a bad mode never fills the GPU.
        check_offload(offload, blocks_on_device)
        self.offload: str | None = offload
        self._offload: Offload | None = None
        # Under offload the models are placed in CPU memory from the start: a FLUX.1-size transformer
        # placed on a small GPU first would not fit.
        home = home_device(self.device, offload)
        # FP8-stored block weights stay FP8 (cast per layer as it runs); everything else takes the dtype.
        self.transformer = place(transformer, home, self.dtype).eval().requires_grad_(False)
        self.autoencoder = place(autoencoder, home, self.dtype).eval().requires_grad_(False)
        # Recorded: "float8_e4m3fn", GGML formats ("Q4_K+Q6_K"), or None when nothing is stored narrow.
        self.weight_dtype = storage_name(self.transformer)
        self.text_encoder = text_encoder.to(home).eval().requires_grad_(False)
        # FLUX.1 Fill [dev] (known by its input width): it only repaints masked pictures (`pictor.edit`).
        self.fill = is_fill_model(transformer.params, autoencoder.params.downsample_factor)
        # FLUX.1 Canny / Depth [dev] (input twice the output): every image needs a control picture.
        self.control = is_control_model(transformer.params)
        self.config = config
        self.hash = model_id_hash or model_hash(config) or ""
        # How this model was asked for (bundle path, bundle name or preset); recorded so `reproduce`
        # can find the same model again. The hash in the record guards against a changed one.
        self.ref: str | None = None
        # LoRAs applied to the transformer, in order; each entry goes into every record.
        self.loras: list[dict[str, Any]] = []
        # The layout adapter (boxes with phrases), if one is loaded, and its entry for the records.
        self.layout_adapter: LayoutAdapter | None = None
        self.layout_info: dict[str, Any] | None = None
        # Likewise the reference adapter (image prompts).
        self.reference_adapter: ReferenceAdapter | None = None
        self.reference_info: dict[str, Any] | None = None
        # FLUX.1 Redux's embedder and SigLIP vision tower (`set_redux`), for requests with a Redux picture.
        self.redux: ReduxModel | None = None
        # XLabs' FLUX.1 IP-Adapter and CLIP's vision tower (`set_ip_adapter`), for requests with its picture.
        self.ip_adapter: IPAdapterModel | None = None
        self._upscaler: UpscalerFile | None = None  # `upscaler`: setting it re-syncs offload's groups
        # FLUX.1 ControlNets (`add_controlnet`), in order; each request gives one picture per ControlNet.
        self.controlnets: list[ControlNetUnit] = []
        # The approx previews' latent -> colour map of this autoencoder (`pictor.latent_preview`), fitted
        # from the pictures of runs that asked for previews.
        self.preview_colours = LatentColours(autoencoder.params.z_channels)
        self.defaults = {**get_preset("shapes-small")["defaults"], **config.defaults}
        mode = self.defaults.get("guidance_mode", "cfg")
        if mode not in GUIDANCE_MODES:
            raise CheckpointError(f"config defaults: guidance_mode '{mode}' is not one of {GUIDANCE_MODES}")
        self.guidance_mode: str = mode
        self.patch = 2 * autoencoder.params.downsample_factor
        stored = {
            k: self.defaults.get(k) for k in ("width", "height", "steps", "guidance", "sampler", "schedule")
        }
        problem = settings_problem(self.patch, **stored)
        if problem:  # else every request that leaves the setting out would fail, naming no cause
            raise CheckpointError(
                f"model '{config.name}': a stored default is unusable ({problem}); set it with "
                "`pictor convert defaults BUNDLE`"
            )
        if not config.trained:
            warnings.warn(
                f"model '{config.name}' is UNTRAINED (random weights from preset '{config.preset}'): "
                "its images are noise-like. Train one with `pictor train` or pass --model.",
                stacklevel=2,
            )
        if offload is not None:
            self.set_offload(offload, blocks_on_device)

    @property
    def name(self) -> str:
        return self.config.name

    # -- CPU offload ----------------------------------------------------------------------------------

    def set_offload(self, mode: str | None, blocks_on_device: int = 0, mover: Mover | None = None) -> None:
        """CPU offload (`pictor.models.offload`): "model" keeps every model in CPU memory and moves each onto
        the device only while it runs, one at a time (diffusers' enable_model_cpu_offload); "blocks" also
        moves the transformer's double and single blocks in one at a time around their forward, keeping its
        small top layers and its first `blocks_on_device` blocks in while it runs (block swap / group
        offload); None turns it off and moves every model to the device. `mover(module, device)` replaces
        the move (tests record moves with it). Images are the same pixels in every mode."""
        check_offload(mode, blocks_on_device)
        if self._offload is not None:
            self._offload.detach()
        self._offload = make_offload(mode, self.device, blocks_on_device, mover)
        self.offload = mode
        if self._offload is None:  # off: every model back where a pipeline without offload keeps it
            for group in offload_groups(self).values():
                for module in group:
                    place(module, self.device)
        self._sync_offload()

    def _sync_offload(self) -> None:
        """(Re)install offload's hooks over the models as they are now: after an adapter is loaded or a LoRA
        wraps layers of the transformer (new modules need hooks too)."""
        if self._offload is not None:
            self._offload.attach(offload_groups(self), self.transformer)

    def release_offload(self) -> None:
        """Move whatever offload has on the device back to CPU memory (after every sampler run, so nothing
        stays on the device between requests; diffusers' maybe_free_model_hooks)."""
        if self._offload is not None:
            self._offload.release()

    @property
    def upscaler(self) -> UpscalerFile | None:
        """The upscale model (`set_upscaler`) of the hires fix and of upscaling edits."""
        return self._upscaler

    @upscaler.setter
    def upscaler(self, upscaler: UpscalerFile | None) -> None:
        # Set directly too (a grid's hires-upscaler axis switches between loaded files): offload's groups
        # must follow, or the new model's runs would go unmanaged and the old one's group stay in them.
        if upscaler is not self._upscaler:
            self._upscaler = upscaler
            self._sync_offload()

    @property
    def _home(self) -> torch.device:
        """Where a newly loaded model waits: CPU memory under offload, else the execution device."""
        return home_device(self.device, self.offload)

    # -- request handling -------------------------------------------------------------------------

    def resolve_request(self, request: GenerationRequest, reproducing: bool = False) -> GenerationRequest:
        """Fill defaults and validate; every error says what to change. `reproducing`: the request is an
        existing image's record, so settings that would change nothing are not refused (the image was
        made with them, perhaps by a version that allowed them). See `pictor.request_resolution`."""
        return resolve_request(self, request, reproducing)

    def prompt_notices(
        self, prompt: str | None, negative_prompt: str | None = None, weighted: bool = False
    ) -> list[str]:
        """What `resolve_request` warns about these texts: for each that is longer than the text encoder
        reads, a sentence naming the end that is not read; empty when all of both is read. Public so that
        a caller that cannot catch warnings safely (the server's worker thread: `warnings.catch_warnings`
        is process-wide) can hand the same sentences to its user. `weighted`: the texts carry prompt
        weights, which the encoder does not read."""
        notices = []
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            try:
                read = plain_text(text or "", weighted)
            except PromptWeightError:  # resolution refuses it, naming the weight; nothing to say here
                continue
            dropped = self.text_encoder.cut_off(read) if read else ""
            if dropped:
                notices.append(
                    f"the {what} is longer than the text encoder's {self.text_encoder.max_length} tokens; "
                    f"this end of it is not read: '{dropped}'"
                )
        return notices

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        previews: Previews | None = None,
    ) -> list[GeneratedImage]:
        """The request's images; `previews`: pictures while the sampler runs (`pictor.latent_preview`)."""
        r = self.resolve_request(request)
        if self.fill:
            check_fill_request(r, has_mask=False)
        run = self.run_hires_seeds if r.hires_scale else self.run_seeds
        return self._in_runs(r, progress, previews, run)

    def _in_runs(
        self,
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

    # -- editing --------------------------------------------------------------------------------------

    def edit(
        self, request: EditRequest, progress: ProgressFn | None = None, previews: Previews | None = None
    ) -> list[GeneratedImage]:
        """img2img, inpainting or outpainting (see `pictor.editing`); image i uses seed + i."""
        r, inputs = self.resolve_edit(request)
        return self._in_runs(
            r,
            progress,
            previews,
            lambda run_r, seeds, step, shown: self.run_edit_seeds(run_r, inputs, seeds, step, shown),
        )

    def resolve_edit(
        self, request: EditRequest, reproducing: bool = False
    ) -> tuple[GenerationRequest, EditInputs]:
        """Validate an edit: its image and mask, and the generation settings at the canvas size
        (`reproducing` as for `resolve_request`)."""
        if request.seed_resize_from is not None:
            raise GenerationError(
                "seed resize from keeps a composition drawn from noise at another size; an edit's "
                "composition is its picture's, so drop it (variation seeds do work on edits)"
            )
        try:
            shared = {
                f.name: getattr(request, f.name)
                for f in fields(GenerationRequest)
                if f.name not in _SIZE and f.name not in HIRES_FIELDS
            }
        except AttributeError as exc:  # a GenerationRequest field EditRequest lacks: a bug, not user error
            raise TypeError(f"EditRequest is missing a GenerationRequest field: {exc}") from exc
        upscaler = source_upscaler(self.upscaler) if self.upscaler else None  # what request.upscaler names
        work_pixels = self.defaults["width"] * self.defaults["height"]  # a masked area's, by default
        inputs = prepare_edit(request, self.patch, MAX_PIXELS, reproducing, upscaler, work_pixels)
        width, height = inputs.size
        shared_request = GenerationRequest(**{**shared, "width": width, "height": height})
        r = self.resolve_request(shared_request, reproducing)
        return r, inputs

    def run_edit_seeds(
        self,
        r: GenerationRequest,
        inputs: EditInputs,
        seeds: list[int],
        progress: ProgressFn,
        previews: Previews | None = None,
    ) -> list[GeneratedImage]:
        """One edit sampler run over exactly these seeds (what `reproduce` reruns)."""
        try:
            return picture_runs.run_edit_seeds(self, r, inputs, seeds, progress, previews)
        finally:
            self.release_offload()

    # -- the sampler run --------------------------------------------------------------------------

    def initial_noise(
        self,
        seeds: list[int],
        lat_h: int,
        lat_w: int,
        r: GenerationRequest | None = None,
        noise_pass: int = 0,
    ) -> torch.Tensor:
        """Per-image noise from CPU generators: identical on every device and at every batch size. With
        `r`, its variation seeds and (on the first pass, `noise_pass` 0) its seed resize apply
        (`pictor.noise_variation`)."""
        channels = self.autoencoder.params.z_channels

        def draw(draw_seeds: list[int], h: int, w: int) -> torch.Tensor:
            gens = [torch.Generator("cpu").manual_seed(s) for s in draw_seeds]
            return torch.cat([torch.randn(1, channels, h, w, generator=g) for g in gens])

        if r is None:
            return draw(seeds, lat_h, lat_w).to(self.device, self.dtype)
        f = self.autoencoder.params.downsample_factor
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
        return noise.to(self.device, self.dtype)

    def step_noise(self, seeds: list[int], shape: tuple[int, ...], noise_pass: int = 0) -> NoiseFn:
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
            return torch.stack(draws).to(self.device, self.dtype)

        return noise

    def encode_text(self, prompts: list[str], weighted: bool = False) -> TextEmbeddings:
        """The prompts' token states; `weighted`: read for prompt weights (`pictor.prompt_weights`)."""
        if weighted:
            emb = self.text_encoder.encode_weighted([parse_weights(p).pieces for p in prompts])
        else:
            emb = self.text_encoder.encode(prompts)
        return TextEmbeddings(
            tokens=emb.tokens.to(self.device, self.dtype),
            mask=emb.mask.to(self.device),
            pooled=emb.pooled.to(self.device, self.dtype),
        )

    def set_layout_adapter(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a layout adapter file (made by `pictor train layout`) for requests with a layout."""
        try:
            adapter, info = open_layout_adapter(path, self.transformer.params, self.text_encoder, self.hash)
        except LayoutError as exc:
            raise GenerationError(str(exc)) from exc
        self.layout_adapter, self.layout_info = adapter.to(self._home), info
        self._sync_offload()
        return info

    def set_reference_adapter(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a reference adapter file (made by `pictor train reference`) for requests with a reference."""
        try:
            adapter, info = open_reference_adapter(
                path, self.transformer.params, self.text_encoder.max_length, self.hash
            )
        except ReferenceImageError as exc:
            raise GenerationError(str(exc)) from exc
        self.reference_adapter, self.reference_info = adapter.to(self._home), info
        self._sync_offload()
        return info

    def set_redux(self, path: str | os.PathLike[str], siglip: str | os.PathLike[str]) -> dict[str, Any]:
        """Load FLUX.1 Redux (flux1-redux-dev.safetensors and a local SigLIP folder) for requests with a
        Redux picture; returns the entry records name."""
        redux = open_redux(path, siglip, self.transformer.params.context_in_dim)
        self.redux = redux.to(self._home, self.dtype)
        self._sync_offload()
        return redux.info

    def set_ip_adapter(self, path: str | os.PathLike[str], clip: str | os.PathLike[str]) -> dict[str, Any]:
        """Load XLabs' FLUX.1 IP-Adapter (ip_adapter.safetensors) and a local CLIP vision folder for requests
        with an IP-Adapter picture; returns the entry records name them by."""
        model = open_ip_adapter(path, clip, self.transformer.params)
        self.ip_adapter = model.to(self._home, self.dtype)
        self._sync_offload()
        return model.info

    def set_upscaler(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load an upscale model (ESRGAN, Real-ESRGAN, ...) that the hires fix can enlarge the first pass
        with (`GenerationRequest.hires_upscaler` = its name) and an upscaling edit its source
        (`EditRequest.upscaler`); returns what records say of it."""
        if (
            Path(path).stem.lower() == "lanczos"
        ):  # requests name a model by its stem, and "lanczos" means none
            raise GenerationError(
                f"{path}: an upscale model named 'lanczos' would be taken for Lanczos; rename it"
            )
        self.upscaler = upscaler = load_upscaler(path, self._home)  # the setter syncs offload's groups
        return upscaler.describe()

    def add_controlnet(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a FLUX.1 ControlNet (InstantX, Union or XLabs; a diffusers folder or a single file) beside
        the transformer; returns the entry records name it by."""
        same = next((u for u in self.controlnets if u.info["path"] == str(Path(path).resolve())), None)
        if same is not None:  # one Union ControlNet for two pictures: its weights once, as diffusers does
            unit = ControlNetUnit(same.model, dict(same.info))
        else:
            unit = open_controlnet(path, self.transformer.params, self._home, self.dtype)
        self.controlnets.append(unit)
        self._sync_offload()
        return unit.info

    def sample(
        self,
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
        f = self.autoencoder.params.downsample_factor
        lat_h, lat_w = r.height // f, r.width // f
        with torch.inference_mode():
            noise = self.initial_noise(seeds, lat_h, lat_w, r, noise_pass)
            x = pack_latents(noise)
            start = 1.0 if init is None else init.strength
            ts = get_schedule(r.schedule, r.steps, image_seq_len=x.shape[1], start=start).to(self.device)
            # Tokens read beside the noise: Fill's masked picture and mask, or a control picture's latents.
            beside = init.fill if init is not None else None
            if r.control_image is not None:
                assert isinstance(r.control_image, np.ndarray)
                beside = control_tokens(
                    self.autoencoder,
                    r.control_image,
                    r.control_canny,
                    self.dtype,
                    r.vae_tile,
                    r.vae_tile_overlap,
                )
            nets = (
                ControlNetRun(self.controlnets, r, self.autoencoder, self.dtype, ts, self.transformer.params)
                if self.controlnets
                else None
            )
            windows = None
            if r.denoise_tile is not None:  # the transformer in windows of tokens (pictor.denoise_tiles)
                assert r.denoise_tile_overlap is not None
                size, overlap = r.denoise_tile // self.patch, r.denoise_tile_overlap // self.patch
                windows = plan_windows(lat_h // 2, lat_w // 2, size, overlap, self.device)
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
                self, r, len(seeds), lat_h, lat_w, caches, beside, nets, windows, ts, first_pass_steps
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
                {"noise": self.step_noise(seeds, tuple(x.shape[1:]), noise_pass)}
                if is_stochastic(r.sampler)
                else {}
            )
            x = sampler(fn, x, ts, callback=self._step_callback(r, progress, previews, lat_h, lat_w), **extra)
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

            pixels = autoencoder_decode(self.autoencoder, latents, r.vae_tile, r.vae_tile_overlap, on_tile)
            if previews is not None:  # pairs the approx previews' colours learn from, decoded anyway
                self.preview_colours.add(latents, pixels, f)
            return pixels

    def _step_callback(
        self, r: GenerationRequest, progress: ProgressFn, previews: Previews | None, lat_h: int, lat_w: int
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
                    self.autoencoder,
                    self.preview_colours,
                    previews.method,
                    r.vae_tile,
                    r.vae_tile_overlap,
                )
                previews.on_frame(pictures, previews.first_index)

        return on_step

    def run_seeds(
        self, r: GenerationRequest, seeds: list[int], progress: ProgressFn, previews: Previews | None = None
    ) -> list[GeneratedImage]:
        """One sampler run over exactly these seeds (what `reproduce` reruns)."""
        caches: list[FirstBlockCache] = []
        try:
            images = to_pil(self.sample(r, seeds, progress, caches=caches, previews=previews))
        finally:
            self.release_offload()
        return [
            GeneratedImage(
                image, seed, {**self.record(r, seed, seeds, j), **cache_passes(caches, j, len(seeds))}
            )
            for j, (image, seed) in enumerate(zip(images, seeds, strict=True))
        ]

    def run_hires_seeds(
        self, r: GenerationRequest, seeds: list[int], progress: ProgressFn, previews: Previews | None = None
    ) -> list[GeneratedImage]:
        """A hires-fix run over exactly these seeds (what `reproduce` reruns)."""
        try:
            return picture_runs.run_hires_seeds(self, r, seeds, progress, previews)
        finally:
            self.release_offload()

    # -- provenance ----------------------------------------------------------------------------------

    def record(self, r: GenerationRequest, seed: int, run_seeds: list[int], index: int) -> dict[str, Any]:
        return {
            "pictor_version": __version__,
            "model": {
                "name": self.config.name,
                "hash": self.hash,
                "preset": self.config.preset,
                "ref": self.ref,
                "trained": self.config.trained,
            },
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "guidance_mode": self.guidance_mode,
            **({"guidance_method": r.guidance_method.record()} if r.guidance_method is not None else {}),
            "sampler": r.sampler,
            "schedule": r.schedule,
            "seed": seed,
            "batch_seeds": run_seeds,
            "batch_index": index,
            "batch_size": len(run_seeds),
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"weight_dtype": self.weight_dtype} if self.weight_dtype else {}),
            "loras": [dict(lo) for lo in self.loras],
            **({"layout": r.layout, "layout_adapter": dict(self.layout_info or {})} if r.layout else {}),
            **(self._reference_fields(r) if r.reference is not None else {}),
            **(context_fields(r.context_image) if r.context_image is not None else {}),
            **(control_fields(r.control_image, r.control_canny) if r.control_image is not None else {}),
            **(self._redux_fields(r) if r.redux_image is not None else {}),
            **(self._ip_adapter_fields(r) if r.ip_adapter_image is not None else {}),
            **(controlnet_fields(r, self.controlnets) if self.controlnets else {}),
            **({name: getattr(r, name) for name in TILING_FIELDS} if r.vae_tile else {}),
            **({name: getattr(r, name) for name in DENOISE_TILING_FIELDS} if r.denoise_tile else {}),
            **({"cache_threshold": r.cache_threshold} if r.cache_threshold else {}),
            **({"prompt_weights": True} if r.prompt_weights else {}),
            **({"prompt_editing": True} if r.prompt_editing else {}),
            **({"regions": r.regions} if r.regions else {}),
            **({"regional_attention": True} if r.regions and r.regional_attention else {}),
            **regional_record_fields(r),
            **({"composable": True} if r.composable else {}),
            **variation_fields(r, index),
        }

    def _redux_fields(self, r: GenerationRequest) -> dict[str, Any]:
        assert isinstance(r.redux_image, np.ndarray) and self.redux is not None
        return redux_fields(r.redux_image, float(r.redux_strength or 0.0), self.redux.info)

    def _ip_adapter_fields(self, r: GenerationRequest) -> dict[str, Any]:
        assert isinstance(r.ip_adapter_image, np.ndarray) and self.ip_adapter is not None
        return ip_adapter_fields(r.ip_adapter_image, float(r.ip_adapter_scale or 0.0), self.ip_adapter.info)

    def _reference_fields(self, r: GenerationRequest) -> dict[str, Any]:
        """A record holds the hash of the reference's fitted pixels, not the picture, and the adapter."""
        assert isinstance(r.reference, np.ndarray)
        return {
            "reference_image": image_info(r.reference),  # the fitted pixels' hash and size
            "reference_adapter": dict(self.reference_info or {}),
        }

    def add_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> dict[str, Any]:
        """Apply a LoRA file (pictor, diffusers/PEFT or kohya format) to the transformer."""
        from pictor.lora_files import a1111_lora_hash, apply_lora, lora_file_hash

        self.release_offload()  # the LoRA's layers are made beside the transformer's, in CPU memory
        name = apply_lora(self.transformer, path, scale=scale)
        place(self.transformer, self._home, self.dtype).requires_grad_(False)
        self._sync_offload()  # the LoRA's new layers need offload's hooks too
        entry = {
            "name": name,
            "path": str(Path(path).resolve()),
            "sha256": lora_file_hash(path),
            "hash": a1111_lora_hash(path),
            "scale": float(scale),
        }
        self.loras.append(entry)
        return entry
