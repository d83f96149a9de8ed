"""Turn weights made by other tools into pictor bundles: FLUX.1's original single files, GGUF files and
bitsandbytes 4-bit files of its transformer (`pictor convert flux`). Rewriting a bundle's storage is
`pictor.bundle_storage`'s; its folder rules are `pictor.bundle_folders`'."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from pictor.bnb_files import bnb_transformer, read_vae
from pictor.bundle_folders import check_bundle_out
from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    check_keys,
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
from pictor.gguf_files import is_gguf
from pictor.models.autoencoder import AutoEncoder, AutoEncoderParams
from pictor.models.flux import Flux, FluxParams
from pictor.models.weight_storage import (
    format_names,
)
from pictor.presets import get_preset
from pictor.t5_gguf_files import check_t5_gguf


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
    # A T5 encoder GGUF (ComfyUI-GGUF's t5-v1_1-xxl-encoder-Q8_0.gguf) is checked here; a missing .gguf is
    # said as a missing file, not as a folder without config.json
    t5_file = Path(t5).is_file() or Path(t5).suffix.lower() == ".gguf"
    if t5_file:
        check_t5_gguf(t5)
    for folder, what in ((Path(t5), "T5"), (Path(clip), "CLIP")):
        if not (folder / "config.json").is_file() and not (what == "T5" and t5_file):
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
