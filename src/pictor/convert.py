"""Turn weights made by other tools into pictor bundles (FLUX.1's original single files, GGUF files of
quantized FLUX.1 transformers), and rewrite a bundle's weights in another storage dtype or GGML format."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from pictor.bnb_files import bnb_transformer, quantize_block_linears_4bit, read_vae
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    STORAGE_DTYPES,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    check_keys,
    is_bundle,
    model_hash,
    read_bundle_config,
    read_bundle_file,
    refuse_pickle,
    sha256_file,
    staged_dir,
    write_json,
    write_safetensors,
)
from pictor.control_images import CONTROL_KINDS, is_control_model
from pictor.fill_images import is_fill_model
from pictor.flux_files import (
    AE_PREFIXES,
    FLUX_PREFIXES,
    PICTOR_CONFIG_KEY,
    flux_gguf_shapes,
    gguf_flux_tensors,
    gguf_pictor_record,
    import_flux_autoencoder,
    import_flux_gguf,
    import_flux_transformer,
    infer_autoencoder_params,
    infer_flux_params,
    is_scaled_fp8,
    keeps_blocks,
    without_scales,
)
from pictor.gguf_files import is_gguf, write_gguf
from pictor.layout_files import LAYOUT_FILE
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
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
from pictor.presets import get_preset
from pictor.reference_files import REFERENCE_FILE
from pictor.t5_gguf_files import check_t5_gguf

BUNDLE_FILES = (CONFIG_NAME, TRANSFORMER_FILE, AUTOENCODER_FILE)
# GGML block formats `pictor convert dtype` writes (llama.cpp's reference quantizers, byte for byte): from
# Q8_0's 8.5 bits a weight down to Q2_K's 2.625. The K-quants need rows of whole 256-value super-blocks.
QUANTIZE_FORMATS = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")
# bitsandbytes' 4-bit formats `pictor convert dtype` writes, in pictor's rows (4.5 bits a weight).
FOUR_BIT_DTYPES = ("nf4", "fp4")
# Adapters a bundle may carry beside its weights; a cast copies them, so they are the bundle's own too.
ADAPTER_FILES = (LAYOUT_FILE, REFERENCE_FILE)


def _keys(path: Path) -> list[str]:
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _shapes(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Meta tensors with the file's key names (prefix stripped) and shapes, read from the header only."""
    keys = _keys(path)
    prefix = next((p for p in prefixes if keys and all(k.startswith(p) for k in keys)), "")
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix) :]: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in keys}


def _place(src: Path, dst: Path, prefixes: tuple[str, ...], load, rewrite: bool = False) -> str:  # type: ignore[no-untyped-def]
    """Copy the file as is when its keys need no change (no 24 GB in memory); else rewrite it."""
    keys = _keys(src)
    if not rewrite and not any(all(k.startswith(p) for k in keys) for p in prefixes):
        shutil.copyfile(src, dst)
        return sha256_file(dst)
    return write_safetensors(load(src), dst, {"format": "pt"})


def convert_flux(
    transformer: str | os.PathLike[str],
    ae: str | os.PathLike[str] | None,
    t5: str | os.PathLike[str],
    clip: str | os.PathLike[str],
    out: str | os.PathLike[str],
    name: str | None = None,
    kontext: bool = False,
    control: str | None = None,
) -> Path:
    """FLUX.1 [dev] or [schnell] single files + local T5/CLIP folders -> a bundle folder. `kontext`: the
    transformer is FLUX.1 Kontext [dev] (its keys are [dev]'s, so only the caller can say so). `control`:
    "canny" or "depth" for FLUX.1 Canny / Depth [dev] (known as control models by their input width, but
    not which kind); None reads the kind off the file's name (flux1-canny-dev, flux1-depth-dev).

    The transformer may be a GGUF file (ComfyUI-GGUF's quantized FLUX.1): its blocks' linear layers keep
    their GGML blocks in the bundle and are dequantized one layer at a time as they run. It may be a
    bitsandbytes 4-bit file (Forge's flux1-dev-bnb-nf4, or diffusers' 4-bit FluxTransformer2DModel): its
    blocks' linears stay NF4 / FP4 the same way; ``ae`` may then be None when the file holds the
    autoencoder (Forge's all-in-one files)."""
    transformer, out = Path(transformer), Path(out)
    check_bundle_out(out)  # never replace a folder that holds anything but a bundle
    if Path(t5).is_file():  # a T5 encoder GGUF (ComfyUI-GGUF's t5-v1_1-xxl-encoder-Q8_0.gguf): checked here
        check_t5_gguf(t5)
    for folder, what in ((Path(t5), "T5"), (Path(clip), "CLIP")):
        if not (folder / "config.json").is_file() and not (what == "T5" and folder.is_file()):
            raise CheckpointError(
                f"{folder}: not a {what} model folder (no config.json); give a local folder"
            )
    # Shapes first, from the headers only, then a strict key check against the model built on meta.
    gguf = is_gguf(transformer)
    bnb = None if gguf else bnb_transformer(transformer)  # bitsandbytes NF4 / FP4 (Forge, diffusers)
    kept: dict[str, str] = {}  # GGUF: {key: GGML format} of the weights that stay quantized
    if bnb is not None:
        kept, shapes, scaled = bnb.kept, bnb.shapes, False
    elif gguf:
        tensors = gguf_flux_tensors(transformer)
        kept = {k: t.format for k, t in tensors.items() if keeps_blocks(k, t)}
        shapes, scaled = flux_gguf_shapes(tensors), False
        del tensors
    else:
        shapes = _shapes(transformer, FLUX_PREFIXES)
        scaled = is_scaled_fp8(shapes)  # ComfyUI's scaled FP8: widened to bf16 on the way in
        shapes = without_scales(shapes)
    if "img_in.weight" not in shapes:
        raise CheckpointError(f"{transformer}: not a FLUX.1 transformer in the original layout (no img_in)")
    # A file pictor wrote says what its bundle was (`export_gguf`); any other is read off its shapes.
    record = gguf_pictor_record(transformer) if gguf else None
    params = record["model"] if record else infer_flux_params(shapes)
    kontext = kontext or bool(record and record["kontext"])
    with torch.device("meta"):
        check_keys(Flux(FluxParams.from_dict(params)), shapes, f"{transformer}")
    ae_in_file = None  # an all-in-one file's own autoencoder, when no --ae is given
    if ae is None:
        if bnb is None or bnb.vae_prefix is None:
            raise CheckpointError(f"{transformer}: holds no autoencoder; give --ae ae.safetensors")
        ae_in_file = read_vae(transformer, bnb.vae_prefix)
        ae, ae_shapes = transformer, {k: torch.empty(v.shape, device="meta") for k, v in ae_in_file.items()}
    else:
        ae = Path(ae)
        ae_shapes = _shapes(ae, AE_PREFIXES)
    if "encoder.conv_in.weight" not in ae_shapes or "decoder.conv_out.weight" not in ae_shapes:
        raise CheckpointError(f"{ae}: not an LDM/FLUX autoencoder (no encoder.conv_in / decoder.conv_out)")
    ae_factor = AutoEncoderParams.from_dict(infer_autoencoder_params(ae_shapes, 1.0, 0.0)).downsample_factor
    fill = is_fill_model(FluxParams.from_dict(params), ae_factor)  # FLUX.1 Fill [dev]: 384 in, 64 out
    controlled = is_control_model(FluxParams.from_dict(params))  # FLUX.1 Canny / Depth [dev]: 128 in, 64 out
    if params["in_channels"] != params["out_channels"] and not fill and not controlled:
        raise CheckpointError(
            f"{transformer}: the transformer reads {params['in_channels']} channels a token and writes "
            f"{params['out_channels']}: a model with extra inputs that pictor does not know; FLUX.1 "
            "[dev] and [schnell], Kontext, Fill, Canny and Depth [dev] are read"
        )
    control = _control_kind(transformer, controlled, control or (record and record.get("control")))
    if control and kontext:
        raise CheckpointError(f"{transformer}: a FLUX.1 {control.capitalize()} model is no Kontext model")
    if kontext and not params["guidance_embed"]:
        raise CheckpointError(
            f"{transformer}: --kontext, but the file has no guidance_in (FLUX.1 Kontext [dev] is guidance-"
            "distilled, like [dev]): give flux1-kontext-dev.safetensors, or drop --kontext"
        )
    if fill and kontext:
        raise CheckpointError(f"{transformer}: a FLUX.1 Fill model (384 input channels) is no Kontext model")
    preset_name = (
        f"flux-{control}-dev"
        if control
        else "flux-kontext-dev"
        if kontext
        else "flux-fill-dev"
        if fill
        else "flux-dev"
        if params["guidance_embed"]
        else "flux-schnell"
    )
    preset = get_preset(preset_name)
    flux_ae = {**preset["autoencoder"], **(record["autoencoder"] if record else {})}
    ae_params = infer_autoencoder_params(ae_shapes, flux_ae["scale_factor"], flux_ae["shift_factor"])
    with torch.device("meta"):
        check_keys(AutoEncoder(AutoEncoderParams.from_dict(ae_params)), ae_shapes, f"{ae}")

    with staged_dir(out) as tmp:
        hashes = {
            TRANSFORMER_FILE: write_safetensors(
                import_flux_gguf(transformer) if gguf else bnb.tensors,  # type: ignore[union-attr]
                tmp / TRANSFORMER_FILE,
                {"format": "pt"},
            )
            if gguf or bnb is not None
            else _place(
                transformer, tmp / TRANSFORMER_FILE, FLUX_PREFIXES, import_flux_transformer, rewrite=scaled
            ),
            AUTOENCODER_FILE: write_safetensors(ae_in_file, tmp / AUTOENCODER_FILE, {"format": "pt"})
            if ae_in_file is not None
            else _place(ae, tmp / AUTOENCODER_FILE, AE_PREFIXES, import_flux_autoencoder),
        }
        text = preset["text_encoder"]
        text["t5"]["path"] = str(Path(t5).resolve())
        text["clip"]["path"] = str(Path(clip).resolve())
        config = BundleConfig(
            name=name or transformer.stem,
            preset=preset_name,
            model=params,
            autoencoder=ae_params,
            text_encoder=text,
            defaults=record["defaults"] if record and record["defaults"] else preset["defaults"],
            description=f"converted from {transformer.name}"
            + (" (with its autoencoder)" if ae_in_file is not None else f" and {ae.name}")
            + (" (scaled FP8 widened to bf16)" if scaled else "")
            + (
                f" ({len(kept)} layers kept 4-bit, bitsandbytes {format_names(kept)})"
                if kept and bnb is not None
                else f" ({len(kept)} layers kept in GGML {format_names(kept)})"
                if kept
                else ""
            ),
            hashes=hashes,
            kontext=kontext,
            control=control,
        )
        write_json(config.to_dict(), tmp / CONFIG_NAME)
    return out


def _control_kind(transformer: Path, controlled: bool, given: str | None) -> str | None:
    """The kind of control picture a FLUX.1 Canny / Depth transformer reads: `given` (--control, or the
    record of a GGUF file pictor wrote), else its file name's "canny" or "depth"; None for other models."""
    if not controlled:
        if given:
            raise CheckpointError(
                f"{transformer}: --control {given}, but the transformer reads no control picture (a FLUX.1 "
                "Canny / Depth model's input is twice its output); give flux1-canny-dev or flux1-depth-dev, "
                "or drop --control"
            )
        return None
    if given is not None:
        if given not in CONTROL_KINDS:
            raise CheckpointError(f"--control {given!r}: choose one of {', '.join(CONTROL_KINDS)}")
        return given
    named = [kind for kind in CONTROL_KINDS if kind in transformer.name.lower()]
    if len(named) != 1:
        raise CheckpointError(
            f"{transformer}: a FLUX.1 control model (input twice its output), but its name does not say "
            "whether it reads edge maps or depth maps; add --control canny or --control depth"
        )
    return named[0]


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


def check_bundle_out(out: Path) -> None:
    """Refuse an --out whose replacement would delete anything but a bundle's own files (the source's
    own, when converting in place)."""
    if not out.exists():
        return
    if not (out.is_dir() and is_bundle(out)):
        raise CheckpointError(
            f"--out {out}: exists and is not a model bundle, and it would be replaced; give a new folder"
        )
    others = _foreign_files(out)
    if others:
        raise CheckpointError(
            f"--out {out}: holds files that are not a bundle's ({', '.join(others[:5])}), and they would be "
            "lost when it is replaced; give a new folder"
        )


def _foreign_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in BUNDLE_FILES + ADAPTER_FILES)


def copy_adapters(src: Path, dst: Path) -> None:
    """The bundle's layout and reference adapters, copied as they are (they go with its weights)."""
    for adapter in ADAPTER_FILES:
        if (src / adapter).is_file():
            shutil.copyfile(src / adapter, dst / adapter)


def copy_autoencoder(src: Path, dst: Path, config: BundleConfig) -> str:
    """The bundle's autoencoder file, copied unchanged and checked against config.json; its SHA-256."""
    shutil.copyfile(src / AUTOENCODER_FILE, dst / AUTOENCODER_FILE)
    digest = sha256_file(dst / AUTOENCODER_FILE)
    if config.hashes.get(AUTOENCODER_FILE) not in (None, digest):
        raise CheckpointError(f"{src / AUTOENCODER_FILE}: not the file config.json's hash names")
    return digest


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
