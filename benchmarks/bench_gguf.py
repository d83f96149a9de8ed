"""GGUF-quantized FLUX.1 weights: pictor's per-layer dequantization against diffusers' GGUF support
(`from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`), in one run.

A FLUX.1-width transformer (hidden 3072, 24 heads of 128, context 4096, guidance embedding) with --double
double and --single single blocks of FLUX.1's 19 + 38, random weights (std 0.02, like a trained FLUX.1's). The
parent writes one GGUF file per format (its block linears quantized by pictor's quantizer, which gives
llama.cpp's bytes; everything else F32), then each run loads in a fresh process and runs one forward of batch
1 with --tokens image tokens and 128 text tokens:

- `pictor_full` / `diffusers_full`: every weight dense in the compute dtype (the unquantized weights);
- `pictor_q8_0`, `pictor_q4_0`: the transformer file that `pictor convert flux` makes of the GGUF file
  (`import_flux_gguf`, written by the parent), read and loaded as a bundle's is (QuantizedLinear layers);
- `diffusers_q8_0`, `diffusers_q4_0`: the same files through diffusers' single-file loader (GGUFLinear), its
  config from a local folder (diffusers' converter handles FLUX.1's width only, hence no smaller model here).

Per run: bytes held by the weights, peak memory while the forwards run and its rise over the moment before
them, seconds per forward (median of --repeats after one warm-up), the output's distance from pictor_full's,
and each quantized run's distance from diffusers' run of the same file. `dequantize` then times one FLUX.1 MLP
matrix (3072 x 12288) per GGML format: pictor's torch code, diffusers' torch code, gguf's numpy reference.

Usage: python benchmarks/bench_gguf.py [--double 1] [--single 2] [--tokens 1024] [--device cpu] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _flux_reference import build_reference, diffusers_config, reference_forward
from _fresh_runs import SHARED_FLAGS, emit, measure, parse_args, rel_err, run_each
from bench_fp8 import flux_width_params, inputs, random_state

from pictor.checkpoint import load_into, read_safetensors, write_safetensors
from pictor.flux_files import import_flux_gguf
from pictor.models.flux import Flux
from pictor.models.ggml_quants import FORMATS, dequantize, quantize
from pictor.models.weight_storage import STORED_PREFIXES, place

RUNS = ("pictor_full", "pictor_q8_0", "pictor_q4_0", "diffusers_full", "diffusers_q8_0", "diffusers_q4_0")
QUANTIZED = ("Q8_0", "Q4_0")
TIMED_FORMATS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


def is_block_linear(key: str, t: torch.Tensor) -> bool:
    return key.startswith(STORED_PREFIXES) and key.endswith(".weight") and t.ndim == 2


def write_files(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """One GGUF file per quantized format and diffusers' config folder; returns each file's size in GB."""
    from gguf import GGMLQuantizationType, GGUFWriter

    params = flux_width_params(args.double, args.single)
    sd = random_state(params, torch.float32)
    sizes = {}
    for fmt in QUANTIZED:
        writer = GGUFWriter(str(folder / f"{fmt}.gguf"), arch="flux")
        for key, value in sd.items():
            if is_block_linear(key, value):
                writer.add_tensor(key, quantize(value, fmt).numpy(), raw_dtype=GGMLQuantizationType[fmt])
            else:
                writer.add_tensor(key, value.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        sizes[fmt] = round((folder / f"{fmt}.gguf").stat().st_size / 1e9, 3)
        write_safetensors(import_flux_gguf(folder / f"{fmt}.gguf"), folder / f"{fmt}.safetensors")
    (folder / "transformer").mkdir(exist_ok=True)
    config = {"_class_name": "FluxTransformer2DModel", **diffusers_config(params)}
    config["axes_dims_rope"] = list(config["axes_dims_rope"])
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return sizes


def worker(args: argparse.Namespace) -> None:
    """One model, one way, in this fresh process; prints its numbers as JSON and saves its output."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = flux_width_params(args.double, args.single)
    files = Path(args.files)
    kind, _, fmt = args.run.partition("_")
    model: torch.nn.Module
    if kind == "pictor":
        with torch.device("meta"):
            flux = Flux(params)
        sd = (
            read_safetensors(files / f"{fmt.upper()}.safetensors")
            if fmt != "full"
            else random_state(params, dtype)
        )
        load_into(flux, sd, args.run)
        del sd
        model = forward = place(flux, device, dtype)
    else:
        if fmt == "full":
            model = build_reference(params, random_state(params, dtype)).to(device)
        else:
            from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

            model = FluxTransformer2DModel.from_single_file(
                str(files / f"{fmt.upper()}.gguf"),
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                config=str(files),
                subfolder="transformer",
                torch_dtype=dtype,
            ).to(device)

        def forward(**kw: Any) -> torch.Tensor:
            return reference_forward(model, **kw)

    model.eval().requires_grad_(False)
    x = inputs(params, args.tokens, device, dtype)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return forward(**x)

    measure(step, args.repeats, device, args.save, model)


def plausible_blocks(fmt: str, rows: int, cols: int) -> np.ndarray:
    """Blocks of a format with random values and small half-precision scales (pictor cannot write K-quants;
    the dequantization cost does not depend on the values)."""
    spec = FORMATS[fmt]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows * cols // spec.block_size, spec.type_size), dtype=np.uint8)
    small = np.full((len(raw), 1), 0.001, np.float16).view(np.uint8)
    scale_at = {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q2_K": [80, 82], "Q3_K": [108]}
    for at in scale_at.get(fmt, [0, 2] if fmt in ("Q4_1", "Q5_1") else [0]):
        raw[:, at : at + 2] = small
    return raw.reshape(rows, -1)


def time_dequantize(threads: int, rows: int = 3072, cols: int = 12288, repeats: int = 3) -> dict[str, Any]:
    """Seconds to dequantize one FLUX.1 MLP matrix to float32: pictor, diffusers' torch port, gguf numpy."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as numpy_dequantize

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    for fmt in TIMED_FORMATS:
        raw = plausible_blocks(fmt, rows, cols)
        data = torch.from_numpy(raw)
        qtype = GGMLQuantizationType[fmt]
        param = GGUFParameter(data, quant_type=qtype)

        def best(call: Any, repeats: int = repeats) -> float:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            return round(min(times), 4)

        ours = dequantize(data, fmt, (rows, cols))
        theirs = dequantize_gguf_tensor(param).float().reshape(rows, cols)
        reference = torch.from_numpy(numpy_dequantize(raw, qtype))
        out[fmt] = {
            "pictor_s": best(lambda d=data, f=fmt: dequantize(d, f, (rows, cols))),
            "diffusers_s": best(lambda p=param: dequantize_gguf_tensor(p)),
            "gguf_numpy_s": best(lambda r=raw, q=qtype: numpy_dequantize(r, q)),
            "pictor_equals_gguf_numpy": bool(torch.equal(ours, reference)),
            "diffusers_max_abs_diff_vs_gguf_numpy": float((theirs - reference).abs().max()),
        }
        print(f"dequantize {fmt}: {out[fmt]}", file=sys.stderr, flush=True)
    return {"matrix": [rows, cols], "threads": threads, "formats": out}


def main() -> None:
    args = parse_args(__doc__, RUNS, repeats=2, hidden=("files",))
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.files = tmp
        sizes = write_files(args, Path(tmp))
        runs, outs = run_each(__file__, RUNS, args, flags=(*SHARED_FLAGS, "files"))
    for run, numbers in runs.items():
        numbers["rel_err_vs_pictor_full"] = rel_err(outs[run], outs["pictor_full"])
    for fmt in ("q8_0", "q4_0"):
        runs[f"pictor_{fmt}"]["rel_err_vs_diffusers_same_file"] = rel_err(
            outs[f"pictor_{fmt}"], outs[f"diffusers_{fmt}"]
        )
    params = flux_width_params(args.double, args.single)
    result = {
        "config": {
            "hidden_size": params.hidden_size,
            "double_blocks": params.depth,
            "single_blocks": params.depth_single_blocks,
            "image_tokens": args.tokens,
            "text_tokens": 128,
            "device": args.device,
            "threads": args.threads,
            "compute_dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
            "weights": "random, std 0.02 (norm scales around 1); block linears quantized, the rest F32",
            "gguf_file_gb": sizes,
        },
        "runs": runs,
        "dequantize": time_dequantize(args.threads),
        "torch": torch.__version__,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
