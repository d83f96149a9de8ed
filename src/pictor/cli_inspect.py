"""`pictor info` and `pictor models`: what an image, a bundle or a preset says about itself, and which
models there are. Presentation only, as the rest of the CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _json_chunk(path: Path, key: str, text: str) -> Any:
    from pictor.provenance import ProvenanceError

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProvenanceError(f"{path}: its '{key}' metadata is not valid JSON ({exc.msg})") from None


def _adapter_header(path: Path) -> dict[str, Any]:
    from pictor.checkpoint import read_safetensors_metadata, sha256_file

    header = read_safetensors_metadata(path)
    decoded = {
        k: json.loads(v) if k.endswith("_params") or k == "pictor_training" else v for k, v in header.items()
    }
    return {"file": path.name, "sha256": sha256_file(path), **decoded}


def cmd_info(args: argparse.Namespace) -> int:
    from pictor.checkpoint import is_bundle, read_bundle_config
    from pictor.presets import PRESETS
    from pictor.provenance import POSTPROCESSING_KEYS, RENDER_KEY, parse_parameters, read_text_chunks

    target = Path(args.target)
    from pictor.controlnet_runs import controlnet_summary

    if target.is_dir() and (net := controlnet_summary(target)) is not None:  # a diffusers ControlNet folder
        print(json.dumps(net, indent=2, ensure_ascii=False))
        return 0
    if target.is_file() and target.suffix.lower() == ".safetensors":  # LoRA, Redux, IP-Adapter, ControlNet
        from pictor.bnb_files import bnb_file_summary
        from pictor.ip_adapter_files import ip_adapter_file_summary
        from pictor.lora_tools import lora_summary
        from pictor.redux_images import redux_file_summary
        from pictor.upscaler_files import upscaler_file_summary

        summary = (
            redux_file_summary(target)
            or ip_adapter_file_summary(target)
            or controlnet_summary(target)
            or upscaler_file_summary(target)
            or bnb_file_summary(target)  # a bitsandbytes NF4 / FP4 FLUX.1 file (Forge's, diffusers')
            or lora_summary(target)
        )
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    from pictor.gguf_files import is_gguf

    if target.is_file() and is_gguf(target):  # a GGUF file (a quantized FLUX.1): its header
        print(json.dumps(_gguf_summary(target), indent=2, ensure_ascii=False))
        return 0
    if target.is_file():
        chunks = read_text_chunks(target)
        info: dict[str, Any] = {}
        if "pictor" in chunks:
            info["pictor"] = _json_chunk(target, "pictor", chunks["pictor"])
        if "parameters" in chunks:
            info["parameters"] = parse_parameters(chunks["parameters"])
        if POSTPROCESSING_KEYS[0] in chunks:  # an upscale's A1111 Extras text
            info["postprocessing"] = chunks[POSTPROCESSING_KEYS[0]]
        if RENDER_KEY in chunks:
            info["render"] = _json_chunk(target, RENDER_KEY, chunks[RENDER_KEY])
        if not info:
            print(f"{target}: no generation metadata found", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(info, indent=2, ensure_ascii=False))
        else:
            for key in ("parameters", POSTPROCESSING_KEYS[0]):
                if key in chunks:
                    print(chunks[key])
            for key in ("pictor", "render"):
                if key in info:
                    print(json.dumps(info[key], indent=2, ensure_ascii=False))
        return 0
    if target.is_dir() and is_bundle(target):
        shown = read_bundle_config(target).to_dict()
        shown["storage"] = _storage(target)
        quantized = _quantized_layers(target)
        if quantized:
            shown["quantized_layers"] = quantized
        for kind in ("layout", "reference"):  # the bundle's adapters: their headers
            if (target / f"{kind}.safetensors").is_file():
                shown[f"{kind}_adapter"] = _adapter_header(target / f"{kind}.safetensors")
        print(json.dumps(shown, indent=2))
        return 0
    if args.target in PRESETS:
        print(json.dumps(PRESETS[args.target], indent=2))
        return 0
    print(f"{args.target}: not an image, a bundle folder or a preset name", file=sys.stderr)
    return 2


def cmd_models(_args: argparse.Namespace) -> int:
    from pictor.checkpoint import read_bundle_config
    from pictor.locate import FALLBACK_PRESET, list_bundles, models_dir
    from pictor.presets import PRESETS

    bundles = list_bundles()
    print("bundles:")
    for name, path in bundles:
        cfg = read_bundle_config(path)
        print(f"  {name:<16} {path}  ({cfg.preset or 'custom'}, {'trained' if cfg.trained else 'untrained'})")
    if not bundles:
        print(f"  (none; put bundles in {models_dir()} or set PICTOR_MODELS)")
        print(f"  'default' falls back to the untrained preset '{FALLBACK_PRESET}'")
    print("presets (architectures; untrained unless you load weights):")
    for name, preset in PRESETS.items():
        print(f"  {name:<16} {preset['description']}")
    return 0


def _gguf_summary(path: Path) -> dict[str, Any]:
    """A GGUF file's header: its metadata (long arrays summarised), how many tensors of each format, the
    parameter count, and whether pictor can convert it (a FLUX.1 transformer), or, for a T5 encoder, its
    config and whether ``--t5`` takes it."""
    import math

    from pictor.checkpoint import CheckpointError
    from pictor.flux_files import gguf_flux_tensors
    from pictor.gguf_files import read_gguf
    from pictor.t5_gguf_files import t5_gguf_summary

    gguf = read_gguf(path)
    formats = [t.format for t in gguf.tensors.values()]
    metadata = {
        k: v if not isinstance(v, list) or len(v) <= 16 else f"[{len(v)} values]"
        for k, v in gguf.metadata.items()
    }
    summary = {
        "file": path.name,
        "gguf_version": gguf.version,
        "metadata": metadata,
        "tensors": len(formats),
        "parameters": sum(math.prod(t.shape) for t in gguf.tensors.values()),
        "formats": {f: formats.count(f) for f in sorted(set(formats))},
    }
    t5 = t5_gguf_summary(gguf)  # a T5 encoder (city96's t5-v1_1-xxl-encoder-Q8_0.gguf): for --t5, not FLUX
    if t5 is not None:
        return {**summary, "t5_encoder": t5}
    try:
        gguf_flux_tensors(path)
        flux = "yes: `pictor convert flux --transformer FILE ...` makes a bundle of it"
    except CheckpointError as exc:
        flux = f"no: {exc}"
    return {**summary, "flux_transformer": flux}


def _quantized_layers(bundle: Path) -> dict[str, int]:
    """How many transformer layers are in each stored block format (a GGUF or bitsandbytes import, or
    `convert dtype q4_0`): only the small ``ggml_type`` tensors are read."""
    from safetensors import safe_open

    from pictor.models.weight_storage import GGML_TYPE_KEY, format_of_type_id

    path = bundle / "transformer.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        names = [format_of_type_id(int(f.get_tensor(k))) for k in f.keys() if k.endswith("." + GGML_TYPE_KEY)]  # noqa: SIM118
    return {name: names.count(name) for name in sorted(set(names))}


def _storage(bundle: Path) -> dict[str, dict[str, int]]:
    """How many tensors of each dtype each weight file holds, from the headers (shows an FP8 bundle)."""
    from safetensors import safe_open

    counts: dict[str, dict[str, int]] = {}
    for fname in ("transformer.safetensors", "autoencoder.safetensors"):
        if (bundle / fname).is_file():
            with safe_open(str(bundle / fname), framework="pt") as f:
                dtypes = [f.get_slice(k).get_dtype() for k in f.keys()]  # noqa: SIM118
            counts[fname] = {d: dtypes.count(d) for d in sorted(set(dtypes))}
    return counts
