"""LoRA tools that people reach for kohya's scripts for: extract a LoRA from what fine-tuning changed in a
model (kohya's ``extract_lora_from_models``), resize a LoRA to another rank (``resize_lora``), and write a
LoRA in pictor's, kohya's or diffusers' layout so that ComfyUI, Forge, A1111 or diffusers load it.

All three are low-rank algebra on per-layer updates ``W += alpha / rank * B @ A``: the best rank-r
approximation of a matrix (Eckart-Young) is its truncated SVD, so extraction keeps the top singular values
of ``W_tuned - W_base`` and resizing keeps the top ones of ``alpha / rank * B @ A`` (computed from two QR
factorizations and an r x r SVD, never the full matrix). Each update keeps the whole scale in its factors
(alpha = rank), split evenly: ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pictor.checkpoint import BundleConfig, read_bundle_config, write_safetensors
from pictor.locate import resolve
from pictor.lora_files import (
    a1111_lora_hash,
    load_lora_file,
    lora_file_hash,
    lora_metadata,
    without_text_encoder,
)
from pictor.models.control_lora import control_kind_in_name
from pictor.models.flux import Flux, FluxParams
from pictor.models.lora import linear_layers
from pictor.models.lora_export import diffusers_keys, kohya_keys
from pictor.models.lora_formats import (
    CONTROL_NORM_SUFFIXES,
    KOHYA_TEXT_PREFIXES,
    DoRAUpdate,
    FactoredUpdate,
    LayerUpdate,
    LoRAError,
    LoRAUpdate,
    control_lora_error,
    control_lora_key,
    detect_format,
    module_kinds,
    to_flux_updates,
)
from pictor.presets import get_preset

FORMATS = ("pictor", "kohya", "diffusers")
_DORA = (
    "'{}' is a DoRA update, whose change depends on the weights it is applied to, so it cannot be resized or "
    "written as a plain LoRA; apply it with --lora, or bake it into a model with `pictor lora merge`"
)


@dataclass
class LowRankReport:
    """What a rank cut kept: per layer its rank and the fraction of the update's squared Frobenius norm
    (its "energy") that the kept singular values carry."""

    ranks: dict[str, int] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)
    # tensors that changed but that a LoRA cannot carry (biases, norm scales): name -> largest |change|
    not_carried: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.ranks:
            return "no layer changed"
        kept = list(self.kept.values())
        worst = min(self.kept, key=self.kept.__getitem__)
        ranks = sorted(set(self.ranks.values()))
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return (
            f"{len(self.ranks)} layers, rank {rank}; energy kept: mean {sum(kept) / len(kept):.4f}, "
            f"lowest {self.kept[worst]:.4f} ({worst})"
        )


def _truncate(
    u: Tensor, s: Tensor, vh: Tensor, rank: int, energy: float | None
) -> tuple[Tensor, Tensor, float]:
    """(A, B, kept) from an SVD: the top singular values, as many as ``rank`` or, with ``energy``, the
    fewest that carry that fraction of the squared norm (never more than ``rank``)."""
    power = s.double() ** 2
    total = float(power.sum())
    r = min(rank, s.numel())
    if energy is not None and total > 0:
        needed = int(torch.searchsorted(torch.cumsum(power, 0) / total, energy - 1e-12).item()) + 1
        r = max(1, min(r, needed))
    root = s[:r].sqrt()
    kept = float(power[:r].sum()) / total if total > 0 else 1.0
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous(), kept


def low_rank(delta: Tensor, rank: int, energy: float | None = None) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors of ``delta`` [out, in]: (A [r, in], B [out, r], fraction of its
    energy kept), B @ A closest to delta in Frobenius norm."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _truncate(u, s, vh, rank, energy)


def resized(update: LayerUpdate, rank: int, energy: float | None = None) -> tuple[LoRAUpdate, float]:
    """``update`` cut to ``rank`` (or the fewest singular values keeping ``energy``), alpha = rank. A LoHa is
    cut as the LoRA it is; a LoKr from its dense product: the best rank-r LoRA there is for it."""
    if isinstance(update, DoRAUpdate):
        raise LoRAError(_DORA.format(update.source))
    if isinstance(update, FactoredUpdate):
        lora = update.as_lora()
        if lora is None:
            a, b, kept = low_rank(update.delta(), rank, energy)
            return LoRAUpdate(a, b, float(a.shape[0]), update.source), kept
        update = lora
    a, b = update.A.float(), update.B.float() * (update.alpha / update.rank)
    qb, rb = torch.linalg.qr(b)  # B = Qb Rb: [out, r] [r, r]
    qa, ra = torch.linalg.qr(a.T)  # A^T = Qa Ra: [in, r] [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = Qb (Rb Ra^T) Qa^T, whose SVD is r x r
    new_a, new_b, kept = _truncate(qb @ u, s, vh @ qa.T, rank, energy)
    return LoRAUpdate(new_a, new_b, float(new_a.shape[0]), update.source), kept


def extract_lora(
    base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], rank: int, energy: float | None = None
) -> tuple[dict[str, LoRAUpdate], LowRankReport]:
    """A LoRA that turns ``base`` into (nearly) ``tuned``: both transformer state dicts of one architecture.
    Every 2-D weight (FLUX's linear layers) that changed gets its best low-rank update; other tensors that
    changed are listed in the report, since a LoRA cannot carry them."""
    check_rank(rank, energy)
    if set(base) != set(tuned):
        only = sorted(set(base) ^ set(tuned))
        raise LoRAError(
            f"the two models have different layers (e.g. '{only[0]}'): extract needs one architecture"
        )
    updates: dict[str, LoRAUpdate] = {}
    report = LowRankReport()
    for key in sorted(base):
        if base[key].shape != tuned[key].shape:
            raise LoRAError(
                f"'{key}' is {list(base[key].shape)} in the base and {list(tuned[key].shape)} in the tuned "
                "model: extract needs one architecture"
            )
        delta = tuned[key].float() - base[key].float()
        change = float(delta.abs().max()) if delta.numel() else 0.0
        if change == 0.0:
            continue
        if delta.ndim != 2 or not key.endswith(".weight"):
            report.not_carried[key] = change
            continue
        path = key.removesuffix(".weight")
        a, b, kept = low_rank(delta, rank, energy)
        updates[path] = LoRAUpdate(a, b, float(a.shape[0]), key)
        report.ranks[path], report.kept[path] = a.shape[0], kept
    return updates, report


def resize_lora(
    updates: Mapping[str, LayerUpdate], rank: int, energy: float | None = None
) -> tuple[dict[str, LoRAUpdate], LowRankReport]:
    check_rank(rank, energy)
    out: dict[str, LoRAUpdate] = {}
    report = LowRankReport()
    for path, update in sorted(updates.items()):
        out[path], kept = resized(update, rank, energy)
        report.ranks[path], report.kept[path] = out[path].rank, kept
    return out, report


def check_rank(rank: int, energy: float | None) -> None:
    if rank < 1:
        raise LoRAError(f"rank must be >= 1, got {rank}")
    if energy is not None and not (math.isfinite(energy) and 0 < energy <= 1):
        raise LoRAError(f"energy must be a fraction in (0, 1], e.g. 0.99, got {energy}")


# ------------------------------------------------------------------------------------------ layouts


def lora_tensors(updates: Mapping[str, LayerUpdate], fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of ``updates`` in layout ``fmt``."""
    if fmt not in FORMATS:
        raise LoRAError(f"unknown LoRA layout '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not updates:
        raise LoRAError("nothing to write: the LoRA has no layers")
    dora = next((u.source for u in updates.values() if isinstance(u, DoRAUpdate)), None)
    if dora is not None:
        raise LoRAError(_DORA.format(dora))
    # LoHa is a LoRA exactly (of rank r1 r2); LoKr is not
    updates = {p: u.as_lora() or u if isinstance(u, FactoredUpdate) else u for p, u in updates.items()}
    kron = next((u.source for u in updates.values() if isinstance(u, FactoredUpdate)), None)
    if kron is not None:
        raise LoRAError(
            f"'{kron}' is a LoKr update (a Kronecker product, usually of full rank), which no LoRA layout "
            "holds exactly; `pictor lora resize --rank R` writes its best rank-R LoRA (and reports the "
            "energy kept)"
        )
    ranks = {p: u.rank for p, u in updates.items()}
    alphas = {p: float(u.alpha) for p, u in updates.items()}
    meta = lora_metadata(ranks, alphas)
    tensors: dict[str, Tensor] = {}
    for path, u in sorted(updates.items()):
        assert isinstance(u, LoRAUpdate)
        if fmt == "pictor":
            tensors[f"{path}.lora_A.weight"] = u.A.float().contiguous()
            tensors[f"{path}.lora_B.weight"] = u.B.float().contiguous()
        elif fmt == "kohya":
            tensors.update(kohya_keys(path, u))
        else:
            tensors.update(diffusers_keys(path, u, (u.A.shape[1], u.B.shape[0])))
    if fmt == "kohya":
        meta = {k: v for k, v in meta.items() if k.startswith("ss_") or k == "format"}
        meta.update(ss_network_module="networks.lora_flux", ss_base_model_version="flux1")
    elif fmt == "diffusers":
        meta = {"format": "pt"}  # the scale is folded into B, so there is no alpha to carry
    return tensors, meta


def check_out(path: str | os.PathLike[str]) -> None:
    if not str(path).lower().endswith(".safetensors"):
        raise LoRAError(f"{path}: LoRA files are written as .safetensors")


def write_lora(
    updates: Mapping[str, LayerUpdate],
    path: str | os.PathLike[str],
    fmt: str = "pictor",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``updates`` as a LoRA file in layout ``fmt`` (atomically); returns its SHA-256."""
    check_out(path)
    tensors, meta = lora_tensors(updates, fmt)
    return write_safetensors(tensors, path, {**meta, **dict(metadata or {})})


# ---------------------------------------------------------------------------------------- reading


def model_config(model: str | os.PathLike[str] | None) -> BundleConfig | dict:
    ref = resolve(model)
    if ref.kind == "preset":
        return get_preset(ref.name)
    assert ref.path is not None
    return read_bundle_config(ref.path)


def model_linears(model: str | os.PathLike[str] | None) -> dict[str, tuple[int, int]]:
    """Every linear layer of a model's transformer: path -> (in, out), from its config alone (built on the
    meta device: no weights are read)."""
    config = model_config(model)
    params = config["model"] if isinstance(config, dict) else config.model
    with torch.device("meta"):
        flux = Flux(FluxParams.from_dict(params))
    return {p: (m.in_features, m.out_features) for p, m in linear_layers(flux).items()}


def read_lora(
    path: str | os.PathLike[str], linears: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, LayerUpdate], list[str]]:
    """A LoRA file in any layout pictor reads, as updates on the layers in ``linears``, and the keys left
    out: a text encoder's (kohya files often carry CLIP's). A key that names no layer at all is an error."""
    sd, meta = load_lora_file(path)
    control = control_lora_key(sd)
    if control is not None:
        raise control_lora_error(path, control)
    sd, text = without_text_encoder(sd, path)
    updates, _ = to_flux_updates(sd, meta, linears)
    return updates, text


def finite_update(update: LayerUpdate) -> bool:
    """Whether a layer's update holds only finite numbers (a NaN would turn every image black)."""
    return update.finite()


def lora_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a LoRA file holds, read without a model: its key layout, how many layers (and how many of them
    a text encoder's), their kinds (LoRA, LoHa, LoKr) and ranks, dtypes, hashes and header (kohya's
    ``ss_*`` training notes included). A LoKr of two whole factors has no rank to list."""
    sd, meta = load_lora_file(path)
    if control_lora_key(sd) is not None:
        return _control_summary(path, sd, meta)
    layout = detect_format(sd)  # a file that is no LoRA is an error naming a key
    modules = module_kinds(sd)
    return {
        "file": str(path),
        "kind": "LoRA",
        "layout": {"native": "pictor", "flat": "lycoris"}.get(layout, layout),
        "algorithms": sorted({algo for algo, _rank in modules.values()}),
        "layers": len(modules),
        "text_encoder_layers": sum(m.startswith(KOHYA_TEXT_PREFIXES) for m in modules),
        "ranks": sorted({rank for _algo, rank in modules.values() if rank is not None}),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}),
        "sha256": lora_file_hash(path),
        "a1111_hash": a1111_lora_hash(path),
        "metadata": dict(sorted(meta.items())),
    }


def _control_summary(path: str | os.PathLike[str], sd: Mapping[str, Tensor], meta: Mapping[str, str]) -> dict:
    """BFL's Canny / Depth LoRA: what it holds, and that it is merged, never applied."""
    ranks = {int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_A.weight")}
    return {
        "file": str(path),
        "kind": "FLUX.1 Canny/Depth [dev] LoRA (BFL)",
        "layout": "bfl-control",
        "control": control_kind_in_name(Path(path).name),
        "algorithms": ["lora"],
        "layers": sum(k.endswith(".lora_A.weight") for k in sd),
        "biased_layers": sum(k.endswith(".lora_B.bias") for k in sd),
        "replaced_norm_scales": sum(k.endswith(CONTROL_NORM_SUFFIXES) for k in sd),
        "text_encoder_layers": 0,
        "ranks": sorted(ranks),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}),
        "sha256": lora_file_hash(path),
        "a1111_hash": a1111_lora_hash(path),
        "use": "merge it into a FLUX.1 [dev] bundle: pictor lora merge --model BUNDLE --lora FILE --out NEW",
        "metadata": dict(sorted(meta.items())),
    }
