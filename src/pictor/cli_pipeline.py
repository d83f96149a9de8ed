"""The pipeline a command runs: loaded with the LoRAs and adapters its flags (or a record) name, and the
sampling settings that generate, edit and grid read from their flags. Separate from :mod:`pictor.cli` so
that every command's module loads and configures a pipeline the same way."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pictor.cli_conditioning_options import regional_option_args
from pictor.cli_options import offload_settings


def load_pipeline(  # type: ignore[no-untyped-def]
    args: argparse.Namespace,
    model: str | None = None,
    loras: list[tuple[str, float]] | None = None,
    layout_adapter: str | None = None,
    reference_adapter: str | None = None,
    redux: tuple[str, str] | None = None,
    controlnets: list[str] | None = None,
    ip_adapter: tuple[str, str] | None = None,
):
    """The pipeline for a command: the model, then its LoRAs in order, then the adapters given (`redux`:
    the Redux file and SigLIP folder, else --redux-model and --siglip; `controlnets`: the ControlNet
    files, else --controlnet's; `ip_adapter`: the IP-Adapter file and CLIP folder, else
    --ip-adapter-model and --clip-vision)."""
    from pictor.loading import load

    offload, blocks_on_device = offload_settings(args)
    pipe = load(
        model if model is not None else args.model,
        device=args.device,
        offload=offload,
        blocks_on_device=blocks_on_device,
    )
    for path, scale in args.lora if loras is None else loras:
        pipe.add_lora(path, scale)
    adapter = layout_adapter or getattr(args, "layout_adapter", None)
    if adapter:
        pipe.set_layout_adapter(adapter)
    reference = reference_adapter or getattr(args, "reference_adapter", None)
    if reference:
        pipe.set_reference_adapter(reference)
    redux_model, siglip = redux or (getattr(args, "redux_model", None), getattr(args, "siglip", None))
    if (redux_model is None) != (siglip is None):
        raise ValueError("FLUX.1 Redux needs both --redux-model FILE and --siglip FOLDER")
    if redux_model is not None and siglip is not None:
        pipe.set_redux(redux_model, siglip)
    ip_model, clip = ip_adapter or (
        getattr(args, "ip_adapter_model", None),
        getattr(args, "clip_vision", None),
    )
    if (ip_model is None) != (clip is None):
        raise ValueError("the IP-Adapter needs both --ip-adapter-model FILE and --clip-vision FOLDER")
    if ip_model is not None and clip is not None:
        pipe.set_ip_adapter(ip_model, clip)
    for path in controlnets if controlnets is not None else getattr(args, "controlnet", None) or []:
        pipe.add_controlnet(path)
    if not pipe.config.trained:
        print(f"note: '{pipe.name}' is untrained: expect noise, not pictures", file=sys.stderr)
    return pipe


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings that generate and edit share."""
    from pictor.cli_guidance import guidance_method_arg
    from pictor.layout_files import read_layout_arg
    from pictor.regional_prompts import read_regions_arg

    return {
        "negative_prompt": args.negative,
        "steps": args.steps,
        "guidance": args.guidance,
        "guidance_method": guidance_method_arg(args),
        "sampler": args.sampler,
        "schedule": args.schedule,
        "seed": args.seed,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "layout": read_layout_arg(args.layout) if args.layout is not None else None,
        "regions": read_regions_arg(args.regions) if getattr(args, "regions", None) is not None else None,
        "reference": args.reference,
        "context_image": _context_arg(args.context),
        "control_image": getattr(args, "control", None),
        "control_canny": _canny_arg(args),
        "redux_image": getattr(args, "redux", None),
        "redux_strength": getattr(args, "redux_strength", None),
        "ip_adapter_image": getattr(args, "ip_adapter", None),
        "ip_adapter_scale": getattr(args, "ip_adapter_scale", None),
        "controlnet_images": getattr(args, "controlnet_image", None),
        "controlnet_scales": getattr(args, "controlnet_scale", None),
        "controlnet_modes": getattr(args, "controlnet_mode", None),
        "controlnet_start": getattr(args, "controlnet_start", None),
        "controlnet_end": getattr(args, "controlnet_end", None),
        "vae_tile": args.vae_tile,
        "vae_tile_overlap": args.vae_tile_overlap,
        "denoise_tile": getattr(args, "denoise_tile", None),
        "denoise_tile_overlap": getattr(args, "denoise_tile_overlap", None),
        "cache_threshold": args.cache_threshold,
        # prompt editing reads A1111's whole syntax, its weights included
        "prompt_weights": getattr(args, "prompt_weights", False) or getattr(args, "prompt_editing", False),
        "prompt_editing": getattr(args, "prompt_editing", False),
        "composable": getattr(args, "composable", False),
        "regional_attention": getattr(args, "regional_attention", False),
        **regional_option_args(args),
        "variation_seed": args.variation_seed,
        "variation_strength": args.variation_strength,
        "seed_resize_from": getattr(args, "seed_resize_from", None),
    }


def _canny_arg(args: argparse.Namespace) -> tuple[float, float] | None:
    """--canny-thresholds (which implies --canny), else BFL's 50 and 200 with --canny, else None."""
    from pictor.edge_maps import FLUX_CANNY_HIGH, FLUX_CANNY_LOW

    thresholds = getattr(args, "canny_thresholds", None)
    if thresholds is not None:
        return thresholds
    return (float(FLUX_CANNY_LOW), float(FLUX_CANNY_HIGH)) if getattr(args, "canny", False) else None


def _context_arg(paths: list[str] | None) -> str | list[str] | None:
    """--context's one image; several are passed on as a list, which the pipeline refuses with the reason."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else paths
