"""`pictor serve`: the HTTP API, job queue, history and web page of :mod:`pictor.serve`, with the model and
the files loaded with it: parser and run (the flags become a `ServeSettings`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pictor.cli_conditioning_options import add_ip_adapter_model, add_redux_model
from pictor.cli_options import add_model, add_vae_tiling, offload_settings


def add_serve_parser(sub: Any) -> None:
    from pictor.serve.settings import Limits

    s = sub.add_parser("serve", help="HTTP API (OpenAI Images compatible), job queue, history and web page")
    add_model(s)
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need --api-key)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (env: PICTOR_API_KEY)"
    )
    s.add_argument("--data-dir", default=None, help="history and images (default: ~/.pictor/serve)")
    s.add_argument("--queue-size", type=int, default=32, help="jobs that may wait; more get 429")
    s.add_argument("--max-batch", type=int, default=4, help="images per sampler run, merging equal requests")
    s.add_argument("--job-timeout", type=float, default=600.0, help="seconds a job may run")
    s.add_argument("--max-attempts", type=int, default=3, help="runs cut short by crashes before a job fails")
    s.add_argument(
        "--load-retry",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="after the model failed to load, refuse jobs (503) this long, then load it again for the next "
        "job (default 60)",
    )
    s.add_argument("--block-words", default=None, help="file of blocked prompt words, one per line")
    s.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="width*height limit")
    s.add_argument("--max-steps", type=int, default=Limits.max_steps)
    s.add_argument("--max-images", type=int, default=Limits.max_images, help="n limit per request")
    add_vae_tiling(s)
    s.add_argument(
        "--lora-dir", default=None, help="folder of LoRA files requests may choose by name (loras)"
    )
    add_redux_model(s)  # FLUX.1 Redux for requests with redux_image, and for variations
    add_ip_adapter_model(s)  # XLabs' FLUX.1 IP-Adapter for requests with ip_adapter_image
    s.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="MODEL",
        help="a FLUX.1 ControlNet (InstantX, Union or XLabs: a diffusers folder or a .safetensors file) "
        "loaded with the model; repeat for several (at most 4). Every request then gives one picture per "
        "ControlNet, in this order (controlnet_images)",
    )
    s.add_argument(
        "--upscaler",
        default=None,
        metavar="FILE",
        help="an upscale model (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... as .safetensors) loaded with the "
        "model: POST /v1/images/upscale runs it, and generations may name it as their hires_upscaler",
    )
    s.add_argument(
        "--previews",
        choices=["approx", "full", "off"],
        default="approx",
        help="live previews of running jobs (GET /v1/jobs/ID/preview, the page): approx (a linear map of "
        "the latents, nearly free), full (the autoencoder decodes every step: exact, a decode per step) "
        "or off (default approx)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from pictor.serve.security import BlockList
    from pictor.serve.server import serve
    from pictor.serve.settings import Limits, ServeSettings, default_data_dir

    offload, blocks_on_device = offload_settings(args)  # refused before the server starts
    block = BlockList.from_file(args.block_words).words if args.block_words else ()
    settings = ServeSettings(
        model=args.model,
        device=args.device,
        offload=offload,
        blocks_on_device=blocks_on_device,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("PICTOR_API_KEY") or None,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        job_timeout=args.job_timeout,
        max_attempts=args.max_attempts,
        load_retry=args.load_retry,
        block_words=block,
        limits=Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images),
        vae_tile=args.vae_tile,
        vae_tile_overlap=args.vae_tile_overlap,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        redux_model=Path(args.redux_model) if args.redux_model else None,
        siglip=Path(args.siglip) if args.siglip else None,
        ip_adapter_model=Path(args.ip_adapter_model) if args.ip_adapter_model else None,
        clip_vision=Path(args.clip_vision) if args.clip_vision else None,
        controlnets=tuple(Path(p) for p in args.controlnet or ()),
        upscaler=Path(args.upscaler) if args.upscaler else None,
        previews=args.previews,
    )
    return serve(settings, log_level=args.log_level)
