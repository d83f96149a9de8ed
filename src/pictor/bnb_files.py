"""FLUX.1 transformers in bitsandbytes' 4-bit (NF4 / FP4) safetensors files, read into pictor's key names.

Two layouts are shared: Forge's all-in-one files (lllyasviel's ``flux1-dev-bnb-nf4.safetensors`` and ``-v2``:
the transformer under ``model.diffusion_model.`` in FLUX.1's own key names, beside the autoencoder under
``vae.`` and CLIP-L / T5 under ``text_encoders.``), and diffusers' ``FluxTransformer2DModel`` quantized with
``BitsAndBytesConfig(load_in_4bit=True)`` and saved with ``save_pretrained`` (diffusers' key names: q, k and
v apart, the final layer's modulation in the order scale, shift). The blocks' linear weights stay 4-bit in
pictor's NF4 / FP4 rows (:mod:`pictor.models.bnb_quants`), dequantized per layer as it runs; any other
4-bit weight is dequantized on import to float32, which holds bitsandbytes' products exactly. Unquantized
tensors (norms, biases, embedders) are kept as stored. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from pictor.checkpoint import CheckpointError, refuse_pickle
from pictor.controlnet_keys import diffusers_target  # diffusers' FLUX.1 block names -> ours
from pictor.models.bnb_quants import (
    FORMAT_OF,
    STATE_PREFIX,
    SUFFIXES,
    BnbError,
    dequantize_4bit,
    dequantize_rows,
    fits_rows,
    quantize_rows,
    read_quant_state,
    to_rows,
)
from pictor.models.weight_storage import GGML_TYPE_KEY, STORED_PREFIXES, type_id_of
from pictor.notices import PictorWarning

FORGE_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")
TEXT_PREFIXES = ("text_encoders.", "cond_stage_model.", "conditioner.")
# LLM.int8 (load_in_8bit) weights carry their row scales as `W.SCB` (and `W.weight_format`).
INT8_SUFFIXES = (".SCB", ".weight_format")
_FINAL = {"norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}


@dataclass
class _Rows:
    """A 4-bit weight in pictor's rows, before it is named (diffusers' q, k, v join along the rows)."""

    fmt: str
    rows: Tensor  # uint8 [out, row bytes]
    shape: tuple[int, int]

    def dense(self) -> Tensor:
        """The values as float32 (exactly bitsandbytes' products), for a weight kept outside the blocks."""
        return dequantize_rows(self.rows, self.fmt, self.shape, torch.float32)


@dataclass
class BnbFlux:
    """A bitsandbytes 4-bit FLUX.1 transformer as pictor's state dict, and what else its file holds."""

    tensors: dict[str, Tensor]
    shapes: dict[str, Tensor]  # meta tensors of each key's logical shape (what the model checks)
    kept: dict[str, str] = field(default_factory=dict)  # layer -> "NF4" / "FP4"
    widened: list[str] = field(default_factory=list)  # 4-bit weights dequantized on import
    layout: str = "forge"
    vae_prefix: str | None = None  # the autoencoder's prefix in the file, when it holds one
    text_prefixes: list[str] = field(default_factory=list)  # text encoders in the file (not used)


def file_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of a safetensors file; a file safetensors cannot open (cut short, damaged) is a
    CheckpointError naming it."""
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors' own error: a Rust message such as "incomplete metadata"
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); it may be truncated (an interrupted download) "
            "or damaged: download it again"
        ) from None


def is_bnb_file(path: str | os.PathLike[str]) -> bool:
    """Whether a safetensors file holds bitsandbytes-quantized weights (4-bit, or 8-bit to be refused). A
    ``.safetensors`` file that cannot be opened is refused here (nothing else could read it either)."""
    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return False
    return any(STATE_PREFIX in k or k.endswith(INT8_SUFFIXES) for k in file_keys(path))


def bnb_file_summary(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """What `pictor info` says of a bitsandbytes file, from its header and the small JSON quant states (no
    weight is read); None for any other file."""
    if not is_bnb_file(path):
        return None
    keys = file_keys(path)
    try:
        layout, prefix = _layout(keys, str(path))
    except CheckpointError as exc:
        layout, prefix = f"not a FLUX.1 transformer: {exc}", ""
    states = [k for k in keys if STATE_PREFIX in k]
    kinds = [k.rsplit("__", 1)[1] for k in states]
    infos = []
    with safe_open(str(path), framework="pt") as f:
        for key in states:
            try:
                infos.append(json.loads(bytes(f.get_tensor(key).to(torch.uint8).tolist()).decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                infos.append({})
    int8 = any(k.endswith(INT8_SUFFIXES) for k in keys)
    return {
        "file": Path(path).name,
        "kind": "bitsandbytes LLM.int8 (8-bit): not supported" if int8 else "bitsandbytes 4-bit",
        "layout": layout,
        "quantized_weights": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "blocksizes": sorted({i["blocksize"] for i in infos if isinstance(i.get("blocksize"), int)}),
        "nested": sum("nested_offset" in i for i in infos),
        "dtypes": sorted({str(i["dtype"]) for i in infos if "dtype" in i}),
        "autoencoder": next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None),
        "text_encoders": _text_prefixes(keys),
        "convert": "pictor convert flux --transformer FILE --t5 T5 --clip CLIP --out BUNDLE"
        + ("" if any(k.startswith(VAE_PREFIXES) for k in keys) else " --ae ae.safetensors")
        if prefix or layout in ("diffusers", "flux")
        else "no",
    }


def _text_prefixes(keys: Iterable[str]) -> list[str]:
    return sorted({".".join(k.split(".")[:2]) for k in keys if k.startswith(TEXT_PREFIXES)})


def _layout(keys: Iterable[str], where: str) -> tuple[str, str]:
    """("forge" | "diffusers" | "flux", the transformer keys' prefix)."""
    keys = list(keys)
    if any(k.startswith(FORGE_PREFIX) for k in keys):
        return "forge", FORGE_PREFIX
    if any(k.startswith(("x_embedder.", "transformer_blocks.", "single_transformer_blocks.")) for k in keys):
        return "diffusers", ""
    if any(k.startswith("img_in.") for k in keys):
        return "flux", ""
    raise CheckpointError(
        f"{where}: bitsandbytes weights, but no FLUX.1 transformer (no {FORGE_PREFIX}img_in, img_in or "
        "diffusers' x_embedder keys); pictor reads Forge's flux1-*-bnb-nf4 files and diffusers' 4-bit "
        "FluxTransformer2DModel"
    )


def read_bnb_flux(path: str | os.PathLike[str]) -> BnbFlux:
    """Read a bitsandbytes 4-bit FLUX.1 file (Forge's or diffusers' layout) as pictor's state dict."""
    where = str(path)
    keys = file_keys(path)
    layout, prefix = _layout(keys, where)
    mine = [k for k in keys if k.startswith(prefix)]
    int8 = [k for k in mine if k.endswith(INT8_SUFFIXES)]  # the transformer's: a text encoder's is not read
    if int8:
        raise CheckpointError(
            f"{where}: {int8[0]} is an LLM.int8 (bitsandbytes 8-bit) scale: 8-bit files are not supported. "
            "Use the bf16 or FP8 file of the model (or an NF4 / GGUF Q8_0 one), or save it with bitsandbytes "
            "dequantized to bf16 and convert that"
        )
    quantized = sorted({k.split("." + STATE_PREFIX)[0] for k in mine if STATE_PREFIX in k})
    companions = {f"{w}.{s}" for w in quantized for s in SUFFIXES} | {k for k in mine if STATE_PREFIX in k}
    parts: dict[str, Tensor | _Rows] = {}
    not_fitting: list[str] = []
    with safe_open(str(path), framework="pt") as f:
        for key in mine:
            if key in companions:
                continue
            name = key[len(prefix) :]
            if key.endswith(tuple("." + s for s in SUFFIXES)):
                weight = key.rsplit(".", 1)[0]
                raise CheckpointError(
                    f"{where}: {key} has no {weight}.{STATE_PREFIX}nf4 (or __fp4) beside it: the quant state "
                    "is missing; re-save the model with bitsandbytes (save_pretrained) or use another file"
                )
            if key not in quantized:
                parts[name] = f.get_tensor(key)
                continue
            needed = [key] + [k for k in keys if k.startswith(key + ".") and k in companions]
            tensors = {k: f.get_tensor(k) for k in needed}
            try:
                state = read_quant_state(tensors, key)
            except BnbError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            packed = tensors[key]
            if fits_rows(state):
                fmt = FORMAT_OF[state.quant_type]
                parts[name] = _Rows(fmt, to_rows(packed, state), (state.shape[0], state.shape[1]))
            else:  # rows not whole 64-blocks, or bitsandbytes blocks of 32: widened, exactly
                parts[name] = dequantize_4bit(packed, state, torch.float32)
                not_fitting.append(name)
    if layout == "diffusers":
        parts = _from_diffusers(parts, where)
    result = BnbFlux({}, {}, layout=layout, widened=not_fitting)
    for name, part in parts.items():
        layer = name.removesuffix(".weight")
        if isinstance(part, _Rows) and name.startswith(STORED_PREFIXES) and name.endswith(".weight"):
            result.tensors[name] = part.rows
            result.tensors[f"{layer}.{GGML_TYPE_KEY}"] = torch.tensor(type_id_of(part.fmt), dtype=torch.int32)
            result.shapes[name] = torch.empty(part.shape, device="meta")
            result.kept[layer] = part.fmt
            continue
        if isinstance(part, _Rows):
            part = part.dense()
            result.widened.append(name)
        result.tensors[name] = part
        result.shapes[name] = torch.empty(part.shape, device="meta")
    result.vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
    result.text_prefixes = _text_prefixes(keys)
    return result


def _from_diffusers(parts: dict[str, Tensor | _Rows], where: str) -> dict[str, Tensor | _Rows]:
    """diffusers' FluxTransformer2DModel names as FLUX.1's: fused projections joined along the rows (4-bit
    rows stay 4-bit when every part is), the final modulation's halves put back in the order shift, scale."""
    out: dict[str, Tensor | _Rows] = {}
    fused: dict[str, dict[int, Tensor | _Rows]] = {}
    sources: dict[str, tuple[str, ...]] = {}
    unknown: list[str] = []
    for key, part in parts.items():
        module, _, param = key.rpartition(".")
        if module in _FINAL:
            name = f"{_FINAL[module]}.{param}"
            if module == "norm_out.linear":  # (scale, shift) -> (shift, scale): a swap of rows
                half = part.shape[0] // 2
                if isinstance(part, _Rows):
                    rows = torch.cat([part.rows[half:], part.rows[:half]], dim=0)
                    part = _Rows(part.fmt, rows, part.shape)
                else:
                    part = torch.cat([part[half:], part[:half]], dim=0)
            out[name] = part
            continue
        target = diffusers_target(key)
        if target is None or target[0].startswith(("pos_embed_input", "input_hint", "controlnet")):
            unknown.append(key)
            continue
        name, index, from_keys = target
        if index is None:
            out[name] = part
        else:
            fused.setdefault(name, {})[index] = part
            sources[name] = from_keys
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} key(s) that diffusers' FluxTransformer2DModel does not have: "
            f"{', '.join(sorted(unknown)[:8])}; the file is another kind of model"
        )
    for name, got in fused.items():
        lacking = [k for i, k in enumerate(sources[name]) if i not in got]
        if lacking:
            raise CheckpointError(
                f"{where}: missing {', '.join(lacking)} (parts of {name}); the file is incomplete"
            )
        ordered = [got[i] for i in range(len(sources[name]))]
        if all(isinstance(p, _Rows) for p in ordered) and len({p.fmt for p in ordered}) == 1:  # type: ignore[union-attr]
            rows = [p for p in ordered if isinstance(p, _Rows)]
            shape = (sum(p.shape[0] for p in rows), rows[0].shape[1])
            out[name] = _Rows(rows[0].fmt, torch.cat([p.rows for p in rows], dim=0), shape)
        else:  # a part unquantized or in another format: the layer is widened whole
            out[name] = torch.cat([_dense(p) for p in ordered], dim=0)
    return out


def _dense(part: Tensor | _Rows) -> Tensor:
    return part.dense() if isinstance(part, _Rows) else part


def read_vae(path: str | os.PathLike[str], prefix: str) -> dict[str, Tensor]:
    """The autoencoder an all-in-one file holds under ``prefix``, prefix stripped, checked to be one."""
    with safe_open(str(path), framework="pt") as f:
        sd = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise CheckpointError(
            f"{path}: the {prefix} tensors are no LDM/FLUX autoencoder (no encoder.conv_in / "
            "decoder.conv_out); give --ae ae.safetensors"
        )
    return sd


def bnb_transformer(path: Path) -> BnbFlux | None:
    """A bitsandbytes 4-bit transformer file, read, or None for any other file; warns about what the file
    holds that a bundle does not take from it."""
    if not is_bnb_file(path):
        return None
    bnb = read_bnb_flux(path)
    if bnb.text_prefixes:
        warnings.warn(
            f"{path.name} also holds text encoders ({', '.join(bnb.text_prefixes)}); pictor reads CLIP and "
            "T5 from the local folders given as --clip and --t5, and does not use them",
            PictorWarning,
            stacklevel=3,
        )
    if bnb.widened:
        warnings.warn(
            f"{len(bnb.widened)} 4-bit weight(s) outside the blocks, or in blocks that pictor's 4-bit rows "
            f"cannot hold, were dequantized to float32 (exactly), e.g. {bnb.widened[0]}",
            PictorWarning,
            stacklevel=3,
        )
    return bnb


def quantize_block_linears_4bit(sd: dict[str, Tensor], fmt: str, where: str) -> int:
    """The blocks' linear weights in pictor's NF4 / FP4 rows (bitsandbytes' quantizer, blocks of 64), one by
    one; everything else as it was stored. Rows that are not whole 64-blocks stay as they are. Returns how
    many layers were turned."""
    turned = 0
    for key in list(sd):
        t = sd[key]
        if (
            not (key.startswith(STORED_PREFIXES) and key.endswith(".weight") and t.ndim == 2)
            or t.shape[1] % 64
        ):
            continue
        wide = t.float()
        if not bool(torch.isfinite(wide).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values; it cannot be quantized")
        sd[key] = quantize_rows(wide, fmt)
        sd[key.removesuffix("weight") + GGML_TYPE_KEY] = torch.tensor(type_id_of(fmt), dtype=torch.int32)
        turned += 1
    return turned
