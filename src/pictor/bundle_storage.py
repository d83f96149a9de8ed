"""A bundle's weights in another storage: `pictor convert dtype` (fp16 / bf16 / fp32, FP8, GGML block
formats, bitsandbytes 4-bit, or widened back) and `pictor convert gguf` (the transformer as a GGUF file, as
ComfyUI-GGUF and city96's files have it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pictor.bnb_files import quantize_block_linears_4bit
from pictor.bundle_folders import check_bundle_out, copy_adapters
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    STORAGE_DTYPES,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    model_hash,
    read_bundle_config,
    read_bundle_file,
    staged_dir,
    write_json,
    write_safetensors,
)
from pictor.flux_files import (
    PICTOR_CONFIG_KEY,
)
from pictor.gguf_files import write_gguf
from pictor.models.ggml_quants import FORMATS, quantize
from pictor.models.weight_storage import (
    FOUR_BIT_TYPE_IDS,
    FP8_STORAGE,
    GGML_TYPE_KEY,
    STORED_PREFIXES,
    dequantize_stored,
    format_names,
    fp8_problem,
    is_fp8,
    quantized_formats,
    quantized_kind,
    stored_columns,
)

# GGML block formats `pictor convert dtype` writes (llama.cpp's reference quantizers, byte for byte): from
# Q8_0's 8.5 bits a weight down to Q2_K's 2.625. The K-quants need rows of whole 256-value super-blocks.
QUANTIZE_FORMATS = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")
# bitsandbytes' 4-bit formats `pictor convert dtype` writes, in pictor's rows (4.5 bits a weight).
FOUR_BIT_DTYPES = ("nf4", "fp4")


def _cast_in_place(sd: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> None:
    """Cast floating tensors one by one (a part is never held twice over), refusing any cast that turns
    finite weights into inf: fp16 ends at 65,504, bf16 has fp32's range."""
    for key, tensor in sd.items():
        if not tensor.is_floating_point():
            continue
        cast = tensor.to(dtype)
        if is_fp8(tensor):  # FP8 (e4m3fn) has no infinities, and no isfinite either
            tensor = tensor.float()
        if bool((torch.isfinite(tensor) & ~torch.isfinite(cast)).any()):
            biggest = float(tensor[torch.isfinite(tensor)].abs().max())
            raise CheckpointError(
                f"{where}: {key} holds {biggest:.4g}, beyond the range of the chosen dtype; "
                "store this bundle as bf16 (fp32's range) or keep fp32"
            )
        sd[key] = cast


def _store_fp8_in_place(sd: dict[str, torch.Tensor], where: str) -> None:
    """The blocks' linear weights in FP8 (e4m3fn), one by one; everything else as it was stored.

    FP8 holds +-448 and 3 significant bits: ~2.7% relative rounding per weight on the shipped model,
    which is why the embedders, norms, biases and the final layer, 1% of FLUX.1's bytes, keep their dtype.
    """
    for key, tensor in sd.items():
        if not (key.startswith(STORED_PREFIXES) and key.endswith(".weight") and tensor.ndim == 2):
            continue
        problem = fp8_problem(key, tensor)
        if problem:
            raise CheckpointError(f"{where}: {problem}; store this bundle as bf16 instead")
        sd[key] = tensor.to(FP8_STORAGE)


def _widen_quantized_in_place(sd: dict[str, torch.Tensor]) -> None:
    """GGML-quantized (or NF4 / FP4) layers as float32 weights (exactly their dequantized values); the type
    keys go."""
    for path, fmt in quantized_formats(sd).items():
        blocks = sd[f"{path}.weight"]
        cols = stored_columns(fmt, blocks.shape[1])
        sd[f"{path}.weight"] = dequantize_stored(blocks, fmt, (blocks.shape[0], cols), torch.float32)
        del sd[f"{path}.{GGML_TYPE_KEY}"]


def quantize_block_linears(sd: dict[str, torch.Tensor], fmt: str, where: str) -> int:
    """The blocks' linear weights in a GGML block format, one by one; everything else as it was stored.
    Layers whose rows are not a whole number of 32-value blocks stay as they are. Returns how many.

    A K-quant (256-value super-blocks) refuses a layer whose rows are whole 32-value blocks but not whole
    super-blocks, naming it and the formats that fit: llama.cpp would silently store such a layer in
    another format (Q4_K as Q5_0, ...), which would make `--dtype q4_k` mean different things for different
    models. Every FLUX.1 block linear has rows of 3072, 12288 or 15360 values, all whole super-blocks."""
    spec = FORMATS[fmt]
    turned = 0
    for key in list(sd):
        tensor = sd[key]
        if not (key.startswith(STORED_PREFIXES) and key.endswith(".weight") and tensor.ndim == 2):
            continue
        cols = tensor.shape[1]
        if cols % 32:
            continue
        if cols % spec.block_size:
            fits = ", ".join(f for f in QUANTIZE_FORMATS if cols % FORMATS[f.upper()].block_size == 0)
            raise CheckpointError(
                f"{where}: {key} has rows of {cols} values, not a multiple of {spec.block_size}, so it "
                f"cannot be stored as {fmt}; formats that fit: {fits}"
            )
        wide = tensor.float()
        if not bool(torch.isfinite(wide).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values; it cannot be quantized")
        sd[key] = quantize(wide, fmt)
        sd[key[: -len("weight")] + GGML_TYPE_KEY] = torch.tensor(spec.type_id, dtype=torch.int32)
        turned += 1
    return turned


def _refuse_requantizing(where: str, formats: dict[str, str], way: str) -> None:
    raise CheckpointError(
        f"{where}: {len(formats)} layers are {_already(formats)}; quantizing "
        f"again compounds the rounding. {way} the original wide bundle instead"
    )


def _already(formats: dict[str, str]) -> str:
    kind = quantized_kind(formats)
    return (
        f"GGML-quantized already ({format_names(formats)})"
        if kind == "GGML-quantized"
        else f"quantized already ({kind})"
    )


_GGUF_DENSE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def export_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str | None = None) -> Path:
    """A bundle's transformer as a GGUF file in FLUX.1's original key layout (architecture ``flux``), the
    format ComfyUI-GGUF's "Unet Loader (GGUF)" and city96's files use.

    Quantized layers (a GGUF import, `convert dtype q4_0`) keep their blocks byte for byte; with ``dtype``
    (``q8_0`` ... ``q2_k``) the blocks' linear weights of a wide bundle are quantized on the way. F32, F16
    and BF16 tensors are written as they are stored; FP8 ones (GGUF has no FP8) as F16, which holds every
    e4m3fn value exactly. The autoencoder stays in the bundle: GGUF files of FLUX.1 carry the transformer.
    """
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in QUANTIZE_FORMATS:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(QUANTIZE_FORMATS)}")
    if out.suffix != ".gguf":
        raise CheckpointError(f"--out {out}: a GGUF file's name ends in .gguf")
    if out.is_dir():
        raise CheckpointError(f"--out {out}: is a folder; give a file name ending in .gguf")
    config = read_bundle_config(src)
    sd = read_bundle_file(src, TRANSFORMER_FILE, config, verify=True)
    formats = quantized_formats(sd)
    four_bit = {path: fmt for path, fmt in formats.items() if fmt in FOUR_BIT_TYPE_IDS}
    if four_bit:  # pictor's own rows: no GGUF reader knows them, and re-quantizing compounds the rounding
        raise CheckpointError(
            f"{src}: {len(four_bit)} transformer layers are {quantized_kind(four_bit)}, e.g. "
            f"{min(four_bit)}, which GGUF has no type for. Widen the bundle (`pictor convert dtype {src} "
            "--dtype bf16 --out WIDE`) and export that, with --dtype q4_k (or another GGML type) if you like"
        )
    if dtype is not None:
        if formats:
            _refuse_requantizing(f"{src}", formats, "Export without --dtype to keep them, or quantize")
        quantize_block_linears(sd, dtype.upper(), f"{src / TRANSFORMER_FILE}")
        formats = quantized_formats(sd)
    tensors: dict[str, tuple[str, tuple[int, ...], torch.Tensor]] = {}
    for key, t in sd.items():
        path = key[: -len(".weight")]
        if key.endswith("." + GGML_TYPE_KEY):
            continue
        if path in formats:
            spec = FORMATS[formats[path]]
            cols = t.shape[1] // spec.type_size * spec.block_size
            tensors[key] = (formats[path], (t.shape[0], cols), t)
        elif t.dtype in _GGUF_DENSE:
            tensors[key] = (_GGUF_DENSE[t.dtype], tuple(t.shape), t)
        elif is_fp8(t):
            tensors[key] = ("F16", tuple(t.shape), t.to(torch.float16))
        else:
            raise CheckpointError(f"{src / TRANSFORMER_FILE}: {key} is {t.dtype}, which GGUF cannot hold")
    metadata = {
        "general.architecture": "flux",
        "general.name": config.name,
        "general.quantization_version": 2,  # llama.cpp's block layouts of today (what pictor reads)
        "pictor.model_hash": model_hash(config) or "",
        PICTOR_CONFIG_KEY: json.dumps(
            {
                "model": config.model,
                "defaults": config.defaults,
                "kontext": config.kontext,
                **({"control": config.control} if config.control else {}),
                "autoencoder": {k: config.autoencoder[k] for k in ("scale_factor", "shift_factor")},
            }
        ),
    }
    write_gguf(out, tensors, metadata)
    return out


def cast_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str) -> Path:
    """Rewrite a bundle's transformer and autoencoder weights in ``dtype`` (fp32, fp16 or bf16), or with
    ``fp8`` only the transformer blocks' linear weights in float8 e4m3fn (kept FP8 in memory when loaded),
    or with a GGML format (``q8_0``, ``q4_0``, ...) those weights in its blocks (kept so in memory too).
    A bundle whose layers are GGML-quantized (a GGUF import) is widened: its blocks are dequantized first.

    Config, defaults and training record stay; the hashes are the new files'. The bundle's layout and
    reference adapters (layout.safetensors, reference.safetensors) are copied unchanged. Pictor computes
    in the device's dtype whatever the storage (float32 on the CPU), so fp16 storage halves an fp32
    bundle on disk at the cost of rounding each weight to 11 significant bits. Written atomically, so
    ``out`` may be ``src``; an ``out`` that holds anything but a bundle is refused, never replaced.
    """
    if dtype not in (*STORAGE_DTYPES, "fp8", *QUANTIZE_FORMATS, *FOUR_BIT_DTYPES):
        choices = ", ".join((*STORAGE_DTYPES, "fp8", *QUANTIZE_FORMATS, *FOUR_BIT_DTYPES))
        raise CheckpointError(f"dtype {dtype!r}: choose one of {choices}")
    src, out = Path(src), Path(out)
    config = read_bundle_config(src)
    check_bundle_out(out)
    with staged_dir(out) as tmp:
        hashes = {}
        for fname in (TRANSFORMER_FILE, AUTOENCODER_FILE):  # one part in memory at a time
            sd = read_bundle_file(src, fname, config, verify=True)
            formats = quantized_formats(sd)
            if formats and dtype in (*QUANTIZE_FORMATS, *FOUR_BIT_DTYPES):
                _refuse_requantizing(f"{src / fname}", formats, "Quantize")
            _widen_quantized_in_place(sd)
            if dtype in FOUR_BIT_DTYPES:
                if fname == TRANSFORMER_FILE:  # NF4 / FP4 as bitsandbytes quantizes, kept so in memory
                    quantize_block_linears_4bit(sd, dtype.upper(), f"{src / fname}")
            elif dtype in QUANTIZE_FORMATS:
                if fname == TRANSFORMER_FILE:  # the autoencoder keeps its dtype, as with FP8
                    quantize_block_linears(sd, dtype.upper(), f"{src / fname}")
            elif dtype != "fp8":
                _cast_in_place(sd, STORAGE_DTYPES[dtype], f"{src / fname}")
            elif fname == TRANSFORMER_FILE:  # the autoencoder keeps its dtype: FP8 covers the blocks only
                _store_fp8_in_place(sd, f"{src / fname}")
            hashes[fname] = write_safetensors(sd, tmp / fname, {"format": "pt"})
            del sd
        copy_adapters(src, tmp)
        write_json(BundleConfig(**{**config.__dict__, "hashes": hashes}).to_dict(), tmp / CONFIG_NAME)
    return out
