"""Pipeline: GenerationRequest -> images. The one place that wires text encoder, transformer, sampler and
autoencoder together (the request types are `pictor.generation_request`'s, the conditioned and guided
velocity `pictor.guided_velocity`'s).

Its helpers live beside it: the sampler runs in `pictor.pipeline_sampling`, what it reads of prompts in
`pictor.pipeline_text`, the models it loads on request in `pictor.pipeline_addons`, each image's record in
`pictor.pipeline_records`, an edit's resolution in `pictor.edit_resolution`, offload's groups in
`pictor.pipeline_offload`.

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

import os
import warnings
from typing import Any

import torch

from pictor import (
    edit_resolution,
    picture_runs,
    pipeline_addons,
    pipeline_records,
    pipeline_sampling,
    pipeline_text,
)
from pictor.checkpoint import (
    BundleConfig,
    CheckpointError,
    model_hash,
)
from pictor.control_images import is_control_model
from pictor.controlnet_runs import ControlNetUnit
from pictor.edit_blending import to_pil
from pictor.editing import EditInputs, EditRequest
from pictor.fill_images import check_fill_request, is_fill_model
from pictor.generation_request import (
    MAX_SEED,
    GeneratedImage,
    GenerationError,
    GenerationRequest,
    ProgressFn,
    seed_notice,
)
from pictor.generation_settings import settings_problem
from pictor.ip_adapter_files import IPAdapterModel
from pictor.latent_preview import LatentColours, Previews
from pictor.models.autoencoder import AutoEncoder
from pictor.models.block_cache import FirstBlockCache, cache_passes
from pictor.models.flux import Flux
from pictor.models.layout import LayoutAdapter
from pictor.models.offload import Mover, Offload
from pictor.models.reference import (
    ReferenceAdapter,
)
from pictor.models.text import TextEmbeddings, TextEncoder
from pictor.models.weight_storage import place, storage_name
from pictor.pipeline_offload import check_offload, home_device, make_offload, offload_groups
from pictor.pipeline_sampling import step_noise_seed
from pictor.presets import get_preset
from pictor.redux_images import ReduxModel
from pictor.request_resolution import resolve_request
from pictor.sampling import NoiseFn
from pictor.upscaler_files import UpscalerFile

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
        return pipeline_text.prompt_notices(self, prompt, negative_prompt, weighted)

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
        return pipeline_sampling.in_runs(r, progress, previews, run)

    # -- editing --------------------------------------------------------------------------------------

    def edit(
        self, request: EditRequest, progress: ProgressFn | None = None, previews: Previews | None = None
    ) -> list[GeneratedImage]:
        """img2img, inpainting or outpainting (see `pictor.editing`); image i uses seed + i."""
        r, inputs = self.resolve_edit(request)
        return pipeline_sampling.in_runs(
            r,
            progress,
            previews,
            lambda run_r, seeds, step, shown: self.run_edit_seeds(run_r, inputs, seeds, step, shown),
        )

    # Bound, not wrapped (likewise `sample` and the layout and reference adapters' loaders): warnings raised
    # under these count stack frames up to their caller's code (stacklevel), which a wrapper would shift
    # (tests/test_pipeline_warning_sites.py). Their signatures, less `self`, are in the comments beside them.
    resolve_edit = edit_resolution.resolve_edit  # (request: EditRequest, reproducing=False) -> (r, inputs)

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
        return pipeline_sampling.initial_noise(self, seeds, lat_h, lat_w, r, noise_pass)

    def step_noise(self, seeds: list[int], shape: tuple[int, ...], noise_pass: int = 0) -> NoiseFn:
        """A stochastic sampler's fresh noise for this run: per image from CPU generators seeded by
        `step_noise_seed`, so like the initial noise it depends on neither the device nor the batch-mates.
        `shape` is one image's (packed) latent shape."""
        return pipeline_sampling.step_noise(self, seeds, shape, noise_pass)

    def encode_text(self, prompts: list[str], weighted: bool = False) -> TextEmbeddings:
        """The prompts' token states; `weighted`: read for prompt weights (`pictor.prompt_weights`)."""
        return pipeline_text.encode_text(self, prompts, weighted)

    # Bound, not wrapped (see `resolve_edit`): (path) -> the entry records name the adapter by.
    set_layout_adapter = pipeline_addons.set_layout_adapter
    set_reference_adapter = pipeline_addons.set_reference_adapter

    def set_redux(self, path: str | os.PathLike[str], siglip: str | os.PathLike[str]) -> dict[str, Any]:
        """Load FLUX.1 Redux (flux1-redux-dev.safetensors and a local SigLIP folder) for requests with a
        Redux picture; returns the entry records name."""
        return pipeline_addons.set_redux(self, path, siglip)

    def set_ip_adapter(self, path: str | os.PathLike[str], clip: str | os.PathLike[str]) -> dict[str, Any]:
        """Load XLabs' FLUX.1 IP-Adapter (ip_adapter.safetensors) and a local CLIP vision folder for requests
        with an IP-Adapter picture; returns the entry records name them by."""
        return pipeline_addons.set_ip_adapter(self, path, clip)

    def set_upscaler(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load an upscale model (ESRGAN, Real-ESRGAN, ...) that the hires fix can enlarge the first pass
        with (`GenerationRequest.hires_upscaler` = its name) and an upscaling edit its source
        (`EditRequest.upscaler`); returns what records say of it."""
        return pipeline_addons.set_upscaler(self, path)

    def add_controlnet(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a FLUX.1 ControlNet (InstantX, Union or XLabs; a diffusers folder or a single file) beside
        the transformer; returns the entry records name it by."""
        return pipeline_addons.add_controlnet(self, path)

    # Bound, not wrapped (see `resolve_edit`): (r, seeds, progress, init=None, caches=None, noise_pass=0,
    # previews=None, first_pass_steps=None) -> decoded pixels [B, 3, H, W].
    sample = pipeline_sampling.sample

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
        return pipeline_records.record(self, r, seed, run_seeds, index)

    def add_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> dict[str, Any]:
        """Apply a LoRA file (pictor, diffusers/PEFT or kohya format) to the transformer."""
        return pipeline_addons.add_lora(self, path, scale)
