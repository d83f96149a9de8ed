"""Server settings: one frozen dataclass, filled by `pictor serve` or by a test."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

# ControlNet pictures one request may carry, and so ControlNets one server may load: each is a further
# picture in every request's body, so the body caps grow by one upload per loaded ControlNet (security.py).
MAX_CONTROLNETS = 4
# How running jobs are previewed (`ServeSettings.previews`).
PREVIEW_CHOICES = ("approx", "full", "off")


def default_data_dir() -> Path:
    return Path.home() / ".pictor" / "serve"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Bad input past these is a 400 that names the limit."""

    max_pixels: int = 1024 * 1024  # width * height of one image
    max_steps: int = 100
    max_images: int = 10  # n per request (OpenAI's own cap)
    max_prompt_chars: int = 4000  # OpenAI's dall-e-3 limit
    max_body_bytes: int = 1 << 20  # a JSON body; uploads have their own cap
    max_upload_bytes: int = 8 << 20
    # A reference or context picture is fitted down before use, so it may be larger than an output: a
    # camera's photo, within the upload's byte limit
    max_picture_pixels: int = 6000 * 4000


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None
    device: str | None = None
    offload: str | None = None  # CPU offload: None, "model" or "blocks" (`Pipeline.set_offload`)
    blocks_on_device: int = 0  # with offload "blocks": the transformer's first N blocks stay in
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    queue_size: int = 32  # jobs waiting (not counting the running batch); more get 429
    max_batch: int = 4  # images per sampler run, across merged jobs
    job_timeout: float = 600.0  # seconds of running time per job
    max_attempts: int = 3  # runs a job may start before a crash loop fails it
    block_words: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    url_ttl: int = 24 * 3600  # lifetime of signed image URLs (only used with an API key)
    retry_after: int = 5  # seconds, sent with 429 and 503
    # After the model failed to load, jobs are refused (503) for this many seconds (--load-retry); the first
    # job after that is queued and the model is loaded again for it (jobs resumed from before a restart wait
    # for it), so a fixed model file is picked up without a restart while a broken one is not reloaded for
    # every request.
    load_retry: float = 60.0
    # Decode through the autoencoder in tiles of this many pixels (bounds its memory on large images; the
    # images' records keep it); None: whole. The overlap None: a quarter of the tile.
    vae_tile: int | None = None
    vae_tile_overlap: int | None = None
    # The folder of LoRA files requests may choose from by name (`loras`); None: no LoRAs offered.
    lora_dir: Path | None = None
    # FLUX.1 Redux [dev]: its embedder file and a local SigLIP folder, both or neither; the loaded model gets
    # them (`Pipeline.set_redux`), so requests may send redux_image and variations use it. A pipeline handed
    # to `create_app` is served as it is.
    redux_model: Path | None = None
    siglip: Path | None = None
    # XLabs' FLUX.1 IP-Adapter: its ip_adapter.safetensors and a local CLIP vision folder, both or neither;
    # the loaded model gets them (`Pipeline.set_ip_adapter`), so requests may send ip_adapter_image. A
    # pipeline handed to `create_app` is served as it is.
    ip_adapter_model: Path | None = None
    clip_vision: Path | None = None
    # FLUX.1 ControlNets (files or diffusers folders), loaded with the model in this order
    # (`Pipeline.add_controlnet`); every request then gives one picture per ControlNet (controlnet_images).
    # A pipeline handed to `create_app` is served with the ControlNets it has.
    controlnets: tuple[Path, ...] = ()
    # An upscale model (ESRGAN, Real-ESRGAN...: `pictor.upscaler_files`), loaded with the model
    # (`Pipeline.set_upscaler`): POST /v1/images/upscale and /v1/jobs/upscales run it, and generations may
    # name it as their hires_upscaler. A pipeline handed to `create_app` is served with the one it has.
    upscaler: Path | None = None
    # Live previews of running jobs (`pictor.latent_preview`): "approx" (a linear map of the latents, for
    # the cost of a matrix product), "full" (the autoencoder decodes each step's prediction: exact, as
    # costly as a final decode per step) or "off".
    previews: str = "approx"

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_batch", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.load_retry < math.inf:  # NaN fails this too
            raise ValueError(f"load-retry must be a number of seconds >= 0, got {self.load_retry}")
        if not self.job_timeout > 0:  # NaN fails this too: it would never time a job out, silently
            raise ValueError(f"job-timeout must be a number of seconds > 0, got {self.job_timeout}")
        if self.vae_tile is not None and self.vae_tile <= 0:
            raise ValueError(f"vae-tile must be a positive number of pixels, got {self.vae_tile}")
        if self.vae_tile_overlap is not None and self.vae_tile is None:
            raise ValueError("vae-tile-overlap needs vae-tile: give the tile size too")
        if (self.redux_model is None) != (self.siglip is None):
            raise ValueError("FLUX.1 Redux needs both --redux-model FILE and --siglip DIR")
        if (self.ip_adapter_model is None) != (self.clip_vision is None):
            raise ValueError("the IP-Adapter needs both --ip-adapter-model FILE and --clip-vision DIR")
        if len(self.controlnets) > MAX_CONTROLNETS:
            raise ValueError(
                f"{len(self.controlnets)} --controlnet models given; a server loads at most "
                f"{MAX_CONTROLNETS} (every request carries one picture per ControlNet)"
            )
        if self.previews not in PREVIEW_CHOICES:
            raise ValueError(f"previews must be one of {', '.join(PREVIEW_CHOICES)}, got '{self.previews}'")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; pass a non-empty --api-key or none")

    def check_exposure(self) -> None:
        """Refuse to listen beyond this machine without an API key."""
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach it could run "
                "jobs and read the history. Pass --api-key KEY (or set PICTOR_API_KEY), or use "
                "--host 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything
