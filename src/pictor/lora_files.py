"""LoRA files: reading (no pickles), hashes, header metadata, applying a file to a model, and saving.

Reading a file gives its tensors and header; :func:`pictor.models.lora_formats.to_flux_updates` maps their
keys (native, diffusers/PEFT, kohya or LyCORIS layout; LoRA, LoHa or LoKr) onto the model's FLUX.1 layer
names, and :func:`apply_lora` installs them as a new, frozen adapter of :mod:`pictor.models.lora` (a
:class:`~pictor.models.factored_adapter.FactoredAdapter` for LoKr and LoHa, a
:class:`~pictor.models.dora_adapter.DoRAAdapter` for DoRA). Saving writes the native layout with
rank and alpha in the header, so every tool that reads kohya's ``ss_network_*`` keys shows them; trained
LoKr, LoHa and DoRA adapters are written in LyCORIS' kohya layout (:func:`save_lycoris`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pictor.checkpoint import read_safetensors, read_safetensors_metadata, refuse_pickle, write_safetensors
from pictor.models.dora_adapter import DoRAAdapter
from pictor.models.factored_adapter import FactoredAdapter
from pictor.models.lora import (
    adapter_tree,
    check_adapter_name,
    linear_layers,
    list_loras,
    remove_lora,
    unwrap_if_empty,
    wrap_linear,
)
from pictor.models.lora_formats import (
    KOHYA_TEXT_PREFIXES,
    FactoredUpdate,
    LayerUpdate,
    LoRAError,
    LoRAUpdate,
    control_lora_error,
    control_lora_key,
    to_flux_updates,
)
from pictor.models.lora_layers import LoRAAdapter, LoRALinear, adapter_dtype
from pictor.models.lora_updates import DoRAUpdate
from pictor.models.lycoris_train import LycorisAdapter
from pictor.notices import PictorWarning

__all__ = [
    "a1111_lora_hash",
    "apply_lora",
    "load_lora_file",
    "lora_file_hash",
    "lora_metadata",
    "lora_state_dict",
    "save_adapters",
    "save_lora",
    "save_lycoris",
    "without_text_encoder",
]


def load_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a ``.safetensors`` LoRA; pickles (.pt, .ckpt, .bin ...) are refused."""
    refuse_pickle(path)
    tensors = read_safetensors(path)
    return tensors, read_safetensors_metadata(path)


def lora_file_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the whole file (hex): the file's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def a1111_lora_hash(path: str | os.PathLike[str]) -> str:
    """The 12 hex digits A1111 writes under "Lora hashes": for a .safetensors file its ``shorthash`` is
    the SHA-256 of the bytes after the JSON header (sd-webui-additional-networks' "addnet hash", which
    civitai lists as AutoV3), so editing the metadata does not change it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, str]:
    """Header metadata of a native file: the common rank and alpha, and per-module alphas if they differ.

    ``ss_network_dim`` / ``ss_network_alpha`` repeat them under kohya's names, which LoRA browsers show.
    """
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {
        "format": "pt",
        "lora_format": "pictor",
        "lora_rank": str(rank),
        "lora_alpha": repr(float(alpha)),
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
    }
    if len(set(alphas.values())) > 1:
        meta["lora_alphas"] = json.dumps({k: float(v) for k, v in sorted(alphas.items())})
    if len(set(ranks.values())) > 1:
        meta["lora_ranks"] = json.dumps(dict(sorted(ranks.items())))
    return meta


def apply_lora(
    model: nn.Module,
    lora: str | os.PathLike[str] | Mapping[str, Tensor],
    scale: float = 1.0,
    name: str | None = None,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> str:
    """Load a LoRA (a file path or a state dict; native, diffusers/PEFT, kohya or LyCORIS layout; LoRA, LoHa
    or LoKr, detected) onto ``model`` as a new adapter at ``scale``; returns the adapter's name (default:
    the file's stem).

    Every key must land on a layer of the model; otherwise a :class:`LoRAError` names the key. With
    ``strict=False`` such keys are skipped with a warning that lists them. A text encoder's keys (kohya's
    ``lora_te*``) are always left out with such a warning: pictor applies LoRAs to the transformer.
    """
    if isinstance(lora, (str, os.PathLike)):
        sd, file_meta = load_lora_file(lora)
        metadata = {**file_meta, **(metadata or {})}
        default = re.sub(r"[^\w-]", "_", Path(lora).stem) or "lora"
        default = f"lora_{default}" if hasattr(nn.ModuleDict, default) else default
    else:
        sd, metadata, default = dict(lora), dict(metadata or {}), "lora"
    control = control_lora_key(sd)
    if control is not None:  # BFL's Canny / Depth LoRA widens img_in: only a merge can do that
        raise control_lora_error(lora if isinstance(lora, (str, os.PathLike)) else "the LoRA", control)
    if not math.isfinite(scale):
        raise LoRAError(f"LoRA scale must be a finite number, got {scale}")
    bad = next(
        (k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None
    )
    if bad is not None:  # it would turn every image black (NaN), not fail
        where = f"{lora}" if isinstance(lora, (str, os.PathLike)) else "the LoRA"
        raise LoRAError(
            f"{where}: {bad} holds NaN or infinite values; the file is broken, retrain or re-export it"
        )
    linears = {p: (m.in_features, m.out_features) for p, m in linear_layers(model).items()}
    sd, text = without_text_encoder(sd, lora if isinstance(lora, (str, os.PathLike)) else "the LoRA")
    if text:
        warnings.warn(
            f"text-encoder keys not applied ({len(text)}): {', '.join(text[:4])}", PictorWarning, stacklevel=2
        )
    updates, skipped = to_flux_updates(sd, metadata, linears, strict=strict)
    if skipped:
        warnings.warn(
            f"LoRA keys not applied ({len(skipped)}): {', '.join(skipped[:8])}", PictorWarning, stacklevel=2
        )
    if name is None:
        taken = set(list_loras(model))
        name = default
        i = 2
        while name in taken:
            name, i = f"{default}_{i}", i + 1
    check_adapter_name(model, name)
    for path, update in updates.items():
        merged = getattr(model.get_submodule(path), "merged", None)
        if isinstance(update, DoRAUpdate) and merged:
            raise LoRAError(
                f"LoRA key '{update.source}': a DoRA is decomposed against the layer's base weight, but "
                f"adapters {sorted(merged)} are merged into '{path}'; unmerge them first"
            )
    plain = [path for path in updates if not isinstance(model.get_submodule(path), LoRALinear)]
    try:
        for path, update in updates.items():
            _install(wrap_linear(model, path), name, update, scale)
    except BaseException:  # no half-applied file is left behind (e.g. out of memory)
        if name in list_loras(model):
            remove_lora(model, name)
        for path in plain:  # and the layers wrapped for it are plain Linears again
            unwrap_if_empty(model, path)
        raise
    return name


def without_text_encoder(sd: Mapping[str, Tensor], where: object) -> tuple[dict[str, Tensor], list[str]]:
    """(the tensors but a text encoder's, the text encoder's keys): kohya and OneTrainer files carry CLIP's
    (``lora_te*``), and pictor applies LoRAs to the transformer. A file of nothing else is an error."""
    text = sorted(k for k in sd if k.startswith(KOHYA_TEXT_PREFIXES))
    if text and len(text) == len(sd):
        raise LoRAError(
            f"{where}: holds only text-encoder weights ({len(text)} keys), and pictor applies LoRAs to the "
            "transformer; there is nothing here for it"
        )
    return {k: v for k, v in sd.items() if k not in text}, text


@torch.no_grad()
def _install(wrapper: LoRALinear, name: str, update: LayerUpdate, scale: float) -> None:
    if isinstance(update, DoRAUpdate):
        inner = _adapter(wrapper, update.inner, 1.0)
        # The ratio against the weight the layer has now (float64: the norm of a wide row in bf16 would
        # be off in its third digit).
        dora = DoRAAdapter(inner, update.magnitude, update.on_out, wrapper, scale)
        wrapper.adapters[name] = dora.requires_grad_(False)
    else:
        wrapper.adapters[name] = _adapter(wrapper, update, scale)


@torch.no_grad()
def _adapter(wrapper: LoRALinear, update: LoRAUpdate | FactoredUpdate, scale: float) -> nn.Module:
    w = wrapper.weight
    if isinstance(update, FactoredUpdate):
        return FactoredAdapter(update, scale, w.device, adapter_dtype(w)).requires_grad_(False)
    adapter = LoRAAdapter(
        wrapper.in_features,
        wrapper.out_features,
        update.rank,
        update.alpha,
        scale,
        0.0,
        w.device,
        adapter_dtype(w),  # never FP8 beside an FP8-stored base weight
    )
    adapter.lora_A.weight.copy_(update.A)
    adapter.lora_B.weight.copy_(update.B)
    return adapter.requires_grad_(False)


def lora_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter`` as native-layout tensors (``<layer>.lora_A.weight`` / ``.lora_B.weight``)."""
    return {k: v.detach() for k, v in adapter_tree(model, adapter).state_dict().items()}


def save_adapters(
    tree: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> str:
    """Write an :func:`adapter_tree` (or a copy of one, e.g. EMA weights) as a native LoRA file with its
    rank and alpha in the header; returns the file's SHA-256."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(f"{path}: LoRA files are written as .safetensors")
    adapters = {p: m for p, m in tree.named_modules() if isinstance(m, LoRAAdapter)}
    if not adapters:
        raise LoRAError("nothing to save: no LoRA adapters")
    tensors = {k: v.detach() for k, v in tree.state_dict().items()}
    meta = lora_metadata({p: a.rank for p, a in adapters.items()}, {p: a.alpha for p, a in adapters.items()})
    return write_safetensors(tensors, path, {**meta, **dict(metadata or {})})


def save_lycoris(
    tree: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a tree of :class:`~pictor.models.lycoris_train.LycorisAdapter` (or a copy of one, e.g. EMA
    weights) as the LyCORIS file its state dict is (kohya names, ``alpha`` tensors), with kohya's
    ``ss_network_*`` header keys as sd-scripts writes them for ``--network_module lycoris.kohya``; returns the
    file's SHA-256."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(f"{path}: LoRA files are written as .safetensors")
    adapters = [m for m in tree.modules() if isinstance(m, LycorisAdapter)]
    if not adapters:
        raise LoRAError("nothing to save: no LyCORIS adapters")
    first = adapters[0]
    args = {"algo": "locon" if first.algo == "lora" else first.algo}  # LyCORIS calls a LoRA "locon"
    if first.algo == "lokr":
        args["factor"] = str(first.lokr_factor)
    if first.dora_scale is not None:
        args["dora_wd"] = "True"
    meta = {
        "format": "pt",
        "lora_algo": first.algo + ("+dora" if first.dora_scale is not None else ""),
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(first.rank),
        # the alpha asked for, as sd-scripts writes it (a whole-matrix LoKr layer saves alpha = rank)
        "ss_network_alpha": repr(first.network_alpha),
        "ss_network_args": json.dumps(args),
    }
    tensors = {k: v.detach().contiguous() for k, v in tree.state_dict().items()}
    return write_safetensors(tensors, path, {**meta, **dict(metadata or {})})


def save_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter: str = "default",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Save one adapter of ``model`` as a native LoRA file; returns its SHA-256."""
    return save_adapters(adapter_tree(model, adapter), path, metadata)
