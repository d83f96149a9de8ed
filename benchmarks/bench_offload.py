"""CPU offload (`Pipeline.set_offload`): peak GPU memory and seconds per image for offload none / "model" /
"blocks", beside diffusers' FluxPipeline with enable_model_cpu_offload / enable_sequential_cpu_offload.

Prints one JSON object. With CUDA (default config "flux-dev"): FLUX.1 [dev]'s transformer (the "flux-dev"
preset: 19 double + 38 single blocks, hidden 3072) and autoencoder with random bf16 weights, and FLUX.1's
text encoders at full size (CLIP-L and T5-XXL configurations, random bf16 weights, saved to a temporary
folder with letter-level tokenizers, since no real tokenizer files can be fetched). Every model is built on
the meta device and filled in bf16 in CPU memory, so no float32 copy of 12B parameters ever exists. One
pictor Pipeline is switched between modes with `set_offload` (each switch moves everything back to CPU
memory first); peak memory is ``torch.cuda.max_memory_allocated`` over one timed image (after a 1-step
warm-up at 256x256), weights included. The diffusers pipeline holds the same weights (converted to its
layout) and runs after pictor's, which is moved out first.

Without CUDA it runs the "tiny" config on the CPU: it checks that the code path works and that the three
modes give the same pixels, and says that memory was not measured (there is no GPU; offload on a CPU run
moves nothing). diffusers' offload modes need an accelerator and are skipped there.

    python benchmarks/bench_offload.py                   # flux-dev on CUDA, tiny on the CPU
    python benchmarks/bench_offload.py --config tiny --steps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import string
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ae_reference import diffusers_config as ae_diffusers_config
from _flux_reference import build_reference

from pictor.checkpoint import BundleConfig
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.text import build_text_encoder
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.presets import get_preset

LETTERS = list(string.ascii_lowercase)
# Text encoders: CLIP-L and T5-XXL (google/t5-v1_1-xxl) shapes for flux-dev; tiny ones for the CPU check.
TEXT = {
    "flux-dev": {
        "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "clip_len": 77,
        "t5": dict(
            d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
        ),
        "t5_len": 512,
    },
    "tiny": {
        "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        "clip_len": 16,
        "t5": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),
        "t5_len": 20,
    },
}


def random_(model: torch.nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A meta-device model materialised in CPU memory in `dtype` with seeded small random values (norm
    weights at 1), tensor by tensor."""
    model = model.to(dtype).to_empty(device="cpu")  # cast on meta first: no float32 copy
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if ("norm" in name and name.endswith("weight")) or name.endswith("scale"):
                t.fill_(1.0)
            else:
                t.copy_((torch.randn(t.shape, generator=gen) * 0.02).to(dtype))
    return model


def text_folders(root: Path, config: str, dtype: torch.dtype) -> dict[str, Any]:
    """CLIP and T5 folders (letter tokenizers, random weights) and pictor's FLUX.1 text-encoder config."""
    spec = TEXT[config]
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    clip_vocab.update({c: i + 2 for i, c in enumerate(LETTERS)})
    clip_vocab.update({c + "</w>": i + 2 + len(LETTERS) for i, c in enumerate(LETTERS)})
    clip_len, t5_len = spec["clip_len"], spec["t5_len"]
    tok = transformers.CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=clip_len)
    tok.save_pretrained(root / "clip")
    clip_config = transformers.CLIPTextConfig(
        vocab_size=len(clip_vocab), max_position_embeddings=max(clip_len, 24), bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=spec["clip"]["hidden_size"], **spec["clip"],
    )  # fmt: skip
    with torch.device("meta"):
        clip = transformers.CLIPTextModel(clip_config)
    random_(clip, dtype, 1).save_pretrained(root / "clip")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in LETTERS] + [("▁" + c, -2.5) for c in LETTERS]
    transformers.T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(root / "t5")
    t5_config = transformers.T5Config(
        vocab_size=len(pieces), relative_attention_num_buckets=32, relative_attention_max_distance=128,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False, **spec["t5"],
    )  # fmt: skip
    with torch.device("meta"):
        t5 = transformers.T5EncoderModel(t5_config)
    random_(t5, dtype, 2).save_pretrained(root / "t5")
    del clip, t5
    gc.collect()
    return {
        "kind": "flux",
        "t5": {"kind": "t5", "path": str(root / "t5"), "max_length": t5_len},
        "clip": {"kind": "clip", "path": str(root / "clip"), "max_length": clip_len},
    }


def model_params(config: str) -> tuple[FluxParams, AutoEncoderParams]:
    if config == "flux-dev":
        preset = get_preset("flux-dev")
        return FluxParams.from_dict(preset["model"]), AutoEncoderParams.from_dict(preset["autoencoder"])
    tiny = get_preset("tiny")
    # diffusers' Flux takes mlp_ratio 4 only (the tiny preset's is 2); two blocks of each kind
    changes = {"vec_in_dim": 32, "context_in_dim": 32, "guidance_embed": True, "mlp_ratio": 4.0}
    model = FluxParams.from_dict({**tiny["model"], **changes, "depth": 2, "depth_single_blocks": 2})
    return model, AutoEncoderParams.from_dict(tiny["autoencoder"])


def pictor_pipeline(config: str, root: Path, device: torch.device, dtype: torch.dtype) -> Pipeline:
    params, ae_params = model_params(config)
    text = text_folders(root, config, dtype)
    with torch.device("meta"):
        flux, ae = Flux(params), AutoEncoder(ae_params)
    random_(flux, dtype, 3)
    random_(ae, dtype, 4)
    defaults = {"guidance_mode": "distilled", "guidance": 3.5, "sampler": "euler", "schedule": "flux"}
    bundle = BundleConfig(
        name=f"{config} (random)", model=params.to_dict(), autoencoder=ae_params.to_dict(), text_encoder=text,
        defaults=defaults, trained=True,
    )  # fmt: skip
    # offload="model" from the start: the models are placed in CPU memory, none on the GPU yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pipeline(flux, ae, build_text_encoder(text), bundle, device, dtype, offload="model")


def peak_and_time(device: torch.device, run: Any) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result: dict[str, Any] = {"seconds_per_image": round(time.perf_counter() - start, 3)}
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["resting_gpu_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    result["pixels"] = out
    return result


def bench_pictor(pipe: Pipeline, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    request = GenerationRequest("a red circle", width=args.size, height=args.size, steps=args.steps, seed=1)
    warm = GenerationRequest("a red circle", width=min(args.size, 256), height=min(args.size, 256), steps=1)
    results: dict[str, Any] = {}
    for mode, kept in (("model", 0), ("blocks", 0), ("blocks", args.blocks_on_device), (None, 0)):
        name = f"blocks_on_device={kept}" if mode == "blocks" and kept else str(mode or "none")
        if name in results:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.set_offload(mode, kept)
        pipe.generate(warm)
        results[name] = peak_and_time(device, lambda: np.asarray(pipe.generate(request)[0].image))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.set_offload("model")  # everything back in CPU memory before diffusers' turn
    want = results["none"]["pixels"]
    for entry in results.values():
        entry["same_pixels_as_none"] = bool(np.array_equal(entry.pop("pixels"), want))
    return results


def bench_diffusers(
    pipe: Pipeline, root: Path, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    dtype = pipe.dtype
    vae_config = ae_diffusers_config(pipe.autoencoder.params)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(
        convert_ldm_vae_checkpoint(dict(pipe.autoencoder.state_dict()), vae_config), assign=True
    )
    transformer = build_reference(pipe.transformer.params, dict(pipe.transformer.state_dict())).to(dtype)
    theirs = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=vae.to(dtype).eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "clip", torch_dtype=dtype),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "clip"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(root / "t5", torch_dtype=dtype),
        tokenizer_2=transformers.T5Tokenizer.from_pretrained(root / "t5"),
        transformer=transformer,
    )  # fmt: skip
    kw = {
        "prompt": "a red circle", "height": args.size, "width": args.size, "num_inference_steps": args.steps,
        "guidance_scale": 3.5, "max_sequence_length": TEXT[args.config]["t5_len"], "output_type": "np",
    }  # fmt: skip
    results: dict[str, Any] = {}
    modes = ["none", "enable_model_cpu_offload", "enable_sequential_cpu_offload"]
    for mode in modes if device.type == "cuda" else ["none"]:
        if mode == "none":
            theirs.to(device)
        else:
            theirs.remove_all_hooks()
            theirs.to("cpu")
            getattr(theirs, mode)(device=device)
        warm = {**kw, "height": min(args.size, 256), "width": min(args.size, 256), "num_inference_steps": 1}
        theirs(**warm, generator=torch.Generator("cpu").manual_seed(0))
        entry = peak_and_time(
            device, lambda: theirs(**kw, generator=torch.Generator("cpu").manual_seed(1)).images
        )
        entry.pop("pixels")
        results[mode] = entry
    if device.type != "cuda":
        results["offload_modes"] = "skipped: diffusers' CPU offload needs an accelerator"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", choices=sorted(TEXT), default=None, help="default: flux-dev on CUDA, tiny on CPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (1024 / 32)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--blocks-on-device", type=int, default=None, help="kept blocks (8 / 1)")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.config = args.config or ("flux-dev" if device.type == "cuda" else "tiny")
    args.size = args.size or (1024 if args.config == "flux-dev" else 32)
    if args.blocks_on_device is None:
        args.blocks_on_device = 8 if args.config == "flux-dev" else 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict[str, Any] = {
        "config": args.config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "size": args.size, "steps": args.steps, "torch": torch.__version__,
    }  # fmt: skip
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["memory"] = (
            "not measured: no GPU. On a CPU run the execution and offload devices are the same memory, so "
            "offload moves nothing; this run checks the code path and that the modes give the same pixels"
        )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = pictor_pipeline(args.config, Path(tmp), device, dtype)
            out["pictor"] = bench_pictor(pipe, args, device)
            if not args.no_diffusers:
                try:
                    out["diffusers"] = bench_diffusers(pipe, Path(tmp), args, device)
                except Exception as exc:  # diffusers is only the comparison
                    out["diffusers"] = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # the JSON says what failed
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=5)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
