"""LoRA key layouts -> updates on FLUX.1 names (reading, hashing and saving files: :mod:`pictor.lora_files`).

Three kinds of FLUX LoRA files are read:

- native (pictor, also ComfyUI's generic form): PEFT-style keys on FLUX.1 names,
  ``double_blocks.0.img_attn.qkv.lora_A.weight`` / ``.lora_B.weight``, optionally behind a
  ``diffusion_model.`` / ``model.diffusion_model.`` / ``transformer.`` prefix; alpha from the header
  metadata (``lora_alpha`` / ``lora_alphas``) or ``.alpha`` tensors, else alpha = rank;
- diffusers / PEFT: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``. diffusers splits FLUX's
  fused projections (q, k, v and, in single blocks, the MLP input), so those parts are FUSED back into our
  ``qkv`` / ``linear1``: A = the parts' A's stacked (rank r_q + r_k + r_v ...), B = block-diagonal of the
  parts' B's, each part's alpha/r folded into its B block. ``norm_out.linear`` emits (scale, shift) where
  FLUX's ``final_layer.adaLN_modulation.1`` emits (shift, scale), so its B rows are swapped back (diffusers'
  ``swap_scale_shift``). Alpha from ``.alpha`` tensors or diffusers' ``lora_adapter_metadata``, else
  alpha = rank (diffusers' convention: scale 1);
- kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``. sd-scripts' ``split_qkv`` option trains split parts but saves them fused (A stacked,
  B block-diagonal, one alpha), so those files are ordinary fused LoRAs; like ComfyUI and diffusers we
  read their scale as alpha / (total rank).

LyCORIS' LoHa and LoKr modules (``.hada_w1_a`` ..., ``.lokr_w1`` ...; :mod:`pictor.models.lycoris`) are read
in each of these layouts, and in the flattened names LyCORIS gives any module it wraps: ``lycoris_`` (LyCORIS
itself, SimpleTuner) or ``lora_transformer_`` (OneTrainer) + a diffusers name with dots as underscores
(``lycoris_transformer_blocks_0_attn_to_q``), or a FLUX.1 one (``lycoris_double_blocks_0_img_attn_qkv``).

Every key must be used: one that names no module of the model is an error that quotes it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pictor.models.lora_fusing import fuse_parts, swapped_halves
from pictor.models.lora_names import (
    DIFFUSERS_ROOTS,
    FLAT_PREFIXES,
    FLUX_ROOTS,
    KOHYA_PREFIX,
    KOHYA_TEXT_PREFIXES,
    NATIVE_PREFIXES,
    SWAP_HALVES,
    diffusers_target,
    flat_names,
    fused_split_sizes,
    strip_prefix,
)
from pictor.models.lora_updates import DoRAUpdate, FactoredUpdate, LayerUpdate, LoRAError, LoRAUpdate
from pictor.models.lycoris import LOHA_ROLES, LOKR_ROLES, loha_piece, lokr_piece

__all__ = [
    "CONTROL_NORM_SUFFIXES",
    "DoRAUpdate",
    "FactoredUpdate",
    "LayerUpdate",
    "LoRAError",
    "LoRAUpdate",
    "control_lora_error",
    "control_lora_key",
    "detect_format",
    "module_kinds",
    "to_flux_updates",
]

# key suffix -> role; lora_down/lora_up are kohya's (and ComfyUI's) names for A/B
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".lora.down.weight": "A",  # diffusers' older LoRACompatibleLinear layout
    ".lora.up.weight": "B",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",  # DoRA's magnitude (kohya, LyCORIS): [out, 1] or [1, in]
    ".lora_magnitude_vector": "magnitude",  # DoRA's magnitude (PEFT, diffusers): [out]
    ".lora_magnitude_vector.weight": "magnitude",
    **{f".{role}": role for role in LOHA_ROLES + LOKR_ROLES},
}
_SCALARS = frozenset({"alpha", "dora_scale", "magnitude"})  # roles that scale a module's weights, not weights
# variants pictor cannot apply, named so the error says what the file is
_UNSUPPORTED = {
    ".hada_t1": "LoHa with Tucker factors (a convolution LyCORIS)",
    ".hada_t2": "LoHa with Tucker factors (a convolution LyCORIS)",
    ".lokr_t2": "LoKr with Tucker factors (a convolution LyCORIS)",
    ".lora_mid.weight": "LoCon with Tucker factors (a convolution LyCORIS)",
    ".diff": "LyCORIS 'full' (whole weight differences)",
    ".diff_b": "LyCORIS 'full' (whole bias differences)",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".weight_bias": "IA3",
}


@dataclass
class _Module:
    """One module's tensors in a file: role (A, B, alpha, hada_w1_a, lokr_w1 ...) -> (key, tensor)."""

    entries: dict[str, tuple[str, Tensor]]

    @property
    def algo(self) -> str:
        roles = set(self.entries) - _SCALARS
        if roles & set(LOHA_ROLES):
            return "loha"
        if roles & set(LOKR_ROLES):
            return "lokr"
        return "lora"

    @property
    def key(self) -> str:
        """A key of the module to quote in messages (a weight's, not its alpha's)."""
        return next((k for role, (k, _t) in self.entries.items() if role not in _SCALARS), self.keys()[0])

    def keys(self) -> list[str]:
        return [k for k, _t in self.entries.values()]

    def tensor(self, role: str) -> Tensor:
        return self.entries[role][1]

    @property
    def rank(self) -> int | None:
        """A LoRA's rank, a LoHa's or a decomposed LoKr's inner size; None for a LoKr of two whole factors."""
        for role in ("A", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if role in self.entries:
                return int(self.tensor(role).shape[0])
        return None


def _unsupported(key: str) -> LoRAError:
    for suffix, what in _UNSUPPORTED.items():
        if key.endswith(suffix) or f"{suffix}." in key:
            return LoRAError(
                f"LoRA key '{key}' belongs to a {what} file, which pictor cannot apply; LoRA, LoHa and LoKr "
                "files are read"
            )
    return LoRAError(
        f"LoRA key '{key}' is not a LoRA weight (expected names ending in .lora_A.weight / .lora_B.weight, "
        ".lora_down.weight / .lora_up.weight or .alpha, or LyCORIS' .hada_w1_a ... / .lokr_w1 ...)"
    )


def _group(sd: Mapping[str, Tensor]) -> dict[str, _Module]:
    """Keys -> {module name: its tensors by role}. A key with another suffix, half a LoRA pair, or a module
    mixing LoRA, LoHa and LoKr tensors is an error that names a key."""
    groups: dict[str, _Module] = {}
    for key, value in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise _unsupported(key)
        groups.setdefault(key[: -len(suffix)], _Module({})).entries[_SUFFIXES[suffix]] = (key, value)
    for module, mod in groups.items():
        roles = set(mod.entries) - _SCALARS
        if not roles:
            raise LoRAError(
                f"LoRA key '{mod.key}': module '{module}' has an alpha or a DoRA scale but no weights"
            )
        kinds = {"lora" if r in ("A", "B") else "loha" if r in LOHA_ROLES else "lokr" for r in roles}
        if len(kinds) > 1:
            raise LoRAError(
                f"LoRA key '{mod.key}': module '{module}' mixes {' and '.join(sorted(kinds))} tensors"
            )
        if mod.algo == "lora":
            _check_pair(module, mod)
    return groups


def _check_pair(module: str, mod: _Module) -> None:
    if "A" not in mod.entries or "B" not in mod.entries:
        raise LoRAError(
            f"LoRA key '{mod.key}': module '{module}' has no matching "
            f"{'B' if 'B' not in mod.entries else 'A'}"
        )
    (key_a, a), (_key_b, b) = mod.entries["A"], mod.entries["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoRAError(
            f"LoRA key '{key_a}': A {tuple(a.shape)} and B {tuple(b.shape)} are not "
            "a rank-r pair (A [r, in], B [out, r]); convolutional LoRAs do not apply to FLUX"
        )
    if a.shape[0] < 1:
        raise LoRAError(f"LoRA key '{key_a}' has rank 0: it changes nothing; the file is broken")


def module_kinds(sd: Mapping[str, Tensor]) -> dict[str, tuple[str, int | None]]:
    """What a file holds, read without a model: module name -> (algorithm, rank), see ``_Module.rank``; a
    weight-decomposed module's algorithm reads ``lora+dora`` (``lokr+dora`` ...)."""
    return {
        module: (mod.algo + ("+dora" if {"dora_scale", "magnitude"} & set(mod.entries) else ""), mod.rank)
        for module, mod in _group(sd).items()
    }


def _kind(module: str) -> str:
    if module.startswith(KOHYA_PREFIX) or module.startswith(KOHYA_TEXT_PREFIXES):
        return "kohya"
    if module.startswith(FLAT_PREFIXES):
        return "flat"
    root = strip_prefix(module, NATIVE_PREFIXES).split(".")[0]
    if root in FLUX_ROOTS:
        return "native"
    if root in DIFFUSERS_ROOTS:
        return "diffusers"
    return "unknown"


# BFL's FLUX.1 Canny / Depth [dev] LoRAs (flux `modules/lora.py` LinearLora, `util.load_flow_model`): a
# biased lora_B on every linear and whole qk-norm scales that replace the model's, on FLUX.1 names; they
# widen img_in, so they can only be merged (`pictor.models.control_lora`).
CONTROL_NORM_SUFFIXES = (".norm.query_norm.scale", ".norm.key_norm.scale")


def control_lora_key(keys: Iterable[str]) -> str | None:
    """A key that marks BFL's FLUX.1 Canny / Depth [dev] LoRA format (a qk-norm scale or a lora_B bias on a
    FLUX.1 name, beside ``.lora_A.weight`` keys), or None for any other file. Read from the names alone."""
    keys = [strip_prefix(k, NATIVE_PREFIXES) for k in keys]
    if not any(k.endswith(".lora_A.weight") for k in keys):
        return None
    return next(
        (
            k
            for k in keys
            if k.split(".")[0] in FLUX_ROOTS
            and (k.endswith(CONTROL_NORM_SUFFIXES) or k.endswith(".lora_B.bias"))
        ),
        None,
    )


def control_lora_error(where: object, key: str) -> LoRAError:
    """Why BFL's Canny / Depth LoRA cannot be applied as a LoRA, and what to do instead."""
    return LoRAError(
        f"{where}: BFL's FLUX.1 Canny/Depth [dev] LoRA (key '{key}': lora_B biases and qk-norm scales that "
        "replace the model's): it widens the model's input (img_in) to read a control picture, which a LoRA "
        "applied at run time cannot do; merge it into a FLUX.1 [dev] bundle with `pictor lora merge --model "
        "BUNDLE --lora FILE --out NEW`, then generate with `--model NEW --control PICTURE`"
    )


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """``"native"``, ``"diffusers"``, ``"kohya"`` or ``"flat"`` (LyCORIS' flattened names); a key of no known
    layout, or a mix, is an error, and so is BFL's Canny / Depth LoRA (it can only be merged)."""
    control = control_lora_key(sd)
    if control is not None:
        raise control_lora_error("the LoRA", control)
    groups = _group(sd)
    if not groups:
        raise LoRAError("the LoRA has no weights")
    kinds: dict[str, str] = {}
    text = [m for m in groups if m.startswith(KOHYA_TEXT_PREFIXES)]
    for module, mod in groups.items():
        if module in text and len(text) < len(groups):
            continue  # a text encoder's keys (kohya, OneTrainer): the transformer's decide the layout
        kind = _kind(module)
        if kind == "unknown":
            raise LoRAError(
                f"LoRA key '{mod.key}' names no FLUX module in a known layout "
                "(FLUX.1 names such as double_blocks.N.img_attn.qkv, diffusers names such as "
                "transformer_blocks.N.attn.to_q, kohya's lora_unet_..., or LyCORIS' lycoris_...)"
            )
        kinds.setdefault(kind, module)
    if len(kinds) > 1:
        quoted = ", ".join(f"'{m}' ({k})" for k, m in kinds.items())
        raise LoRAError(f"the LoRA mixes key layouts: {quoted}")
    return next(iter(kinds))


# ------------------------------------------------------------------------------------------ alphas


def _tensor_alpha(mod: _Module) -> float | None:
    if "alpha" not in mod.entries:
        return None
    key, alpha = mod.entries["alpha"]
    if alpha.numel() != 1:
        raise LoRAError(f"{key} holds {alpha.numel()} numbers; a LoRA's alpha is one number per layer")
    return float(alpha.float().item())


def _native_alpha(module: str, rank: int, meta: Mapping[str, str]) -> float:
    per_module = json.loads(meta["lora_alphas"]) if "lora_alphas" in meta else {}
    if module in per_module:
        return float(per_module[module])
    if "lora_alpha" in meta:
        return float(meta["lora_alpha"])
    return float(rank)


def _diffusers_alpha(module: str, rank: int, meta: Mapping[str, str]) -> float:
    """PEFT's lora_alpha / alpha_pattern from diffusers' ``lora_adapter_metadata`` header, else rank."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return float(rank)
    cfg = json.loads(raw)
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    alpha = float(cfg.get("lora_alpha", rank))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
    return alpha


# ------------------------------------------------------------------------------------- conversion


def _check(update: LayerUpdate, path: str, shape: tuple[int, int]) -> None:
    in_f, out_f = shape
    out, inputs = update.shape  # one width for all parts of a fused layer: _fuse_parts checked it
    if inputs != in_f or out != out_f:
        raise LoRAError(
            f"LoRA key '{update.source}': update for '{path}' is [{out} x {inputs}] "
            f"but the layer is [{out_f} x {in_f}] (out x in): the LoRA was made for another model size"
        )


def _unmatched(key: str, where: str) -> LoRAError:
    return LoRAError(f"LoRA key '{key}' matches no layer of the model ({where})")


def _layer_update(mod: _Module, lora_alpha: float | None) -> LayerUpdate:
    """The module's update: LoRA and LoHa as A/B factors, LoKr as its Kronecker factors, either inside a
    :class:`DoRAUpdate` when the module has a DoRA scale. ``lora_alpha`` is a plain LoRA's alpha when the
    file has no alpha tensor (the layout's default)."""
    alpha = _tensor_alpha(mod)
    inner: LoRAUpdate | FactoredUpdate
    if mod.algo in ("loha", "lokr"):
        piece = loha_piece(mod.entries, alpha) if mod.algo == "loha" else lokr_piece(mod.entries, alpha)
        inner = FactoredUpdate([piece], piece.rows, mod.key)
    else:
        a, b = mod.tensor("A"), mod.tensor("B")
        inner = LoRAUpdate(a, b, alpha or lora_alpha or float(a.shape[0]), mod.key)
    out, inputs = inner.shape
    for role in ("magnitude", "dora_scale"):  # NaN means "no DoRA on this row" once parts are fused
        if role in mod.entries and not bool(torch.isfinite(mod.tensor(role)).all()):
            raise LoRAError(
                f"LoRA key '{mod.entries[role][0]}' holds NaN or infinite values; the file is broken"
            )
    if "magnitude" in mod.entries:  # PEFT: one magnitude per output row
        key, magnitude = mod.entries["magnitude"]
        if tuple(magnitude.shape) != (out,):
            raise LoRAError(f"LoRA key '{key}' is {tuple(magnitude.shape)}; a DoRA magnitude here is [{out}]")
        return DoRAUpdate(inner, magnitude.float().reshape(out, 1), on_out=True)
    if "dora_scale" not in mod.entries:
        return inner
    key, scale = mod.entries["dora_scale"]
    if scale.ndim == 2 and tuple(scale.shape) == (out, 1):
        return DoRAUpdate(inner, scale.float(), on_out=True)
    if scale.ndim == 2 and tuple(scale.shape) == (1, inputs):
        return DoRAUpdate(inner, scale.float(), on_out=False)
    raise LoRAError(
        f"LoRA key '{key}' is {tuple(scale.shape)}, but a DoRA scale for this [{out} x {inputs}] update is "
        f"[{out}, 1] (per output row) or [1, {inputs}] (per input column)"
    )


def to_flux_updates(
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    linears: Mapping[str, tuple[int, int]],
    strict: bool = True,
) -> tuple[dict[str, LayerUpdate], list[str]]:
    """Any supported file -> ({FLUX module path: update}, skipped keys).

    ``linears`` maps each linear layer of the model to ``(in_features, out_features)``. With ``strict``
    every key must land on a layer; otherwise keys that do not are returned as skipped (never silently).
    """
    fmt = detect_format(sd)
    groups = _group(sd)
    kohya = {KOHYA_PREFIX + path.replace(".", "_"): path for path in linears}
    flat = flat_names(linears) if fmt == "flat" else {}
    whole: dict[str, LayerUpdate] = {}
    parts: dict[str, dict[int, LayerUpdate]] = {}
    sources: dict[tuple[str, int | None], str] = {}
    skipped: list[str] = []

    def miss(mod: _Module, where: str) -> None:
        if strict:
            raise _unmatched(mod.key, where)
        skipped.extend(mod.keys())

    for module, mod in groups.items():
        rank = mod.rank or 0
        kind, name = fmt, module
        if module.startswith(KOHYA_TEXT_PREFIXES):
            if strict:
                raise LoRAError(
                    f"LoRA key '{mod.key}' is for a text encoder; pictor applies LoRAs to the "
                    "transformer only (load with strict=False to skip text-encoder keys)"
                )
            miss(mod, "text encoder")
            continue
        if fmt == "flat":
            found = flat.get(strip_prefix(module, FLAT_PREFIXES))
            if found is None:
                miss(mod, "no FLUX or diffusers layer of the model has this flattened name")
                continue
            kind, name = found
        if kind == "kohya":
            if module not in kohya:
                miss(mod, "no FLUX linear has this kohya name")
                continue
            path, part, default = kohya[module], None, None
        elif kind == "native":
            path, part = strip_prefix(name, NATIVE_PREFIXES), None
            if path not in linears:
                miss(mod, f"the model has no linear layer '{path}'")
                continue
            default = _native_alpha(path, rank, metadata) if fmt == "native" else None
        else:
            target = diffusers_target(name)
            if target is None or target[0] not in linears:
                miss(mod, "no FLUX layer corresponds to this diffusers module")
                continue
            path, part = target
            dotted = strip_prefix(name, ("transformer.",))
            default = _diffusers_alpha(dotted, rank, metadata) if fmt == "diffusers" else None
        clash = [k for (p, q), k in sources.items() if p == path and (q == part or None in (q, part))]
        if clash:
            raise LoRAError(
                f"LoRA keys '{clash[0]}' and '{mod.key}' both update '{path}'; the file is broken"
            )
        sources[(path, part)] = mod.key
        update = _layer_update(mod, default)
        if part is None:
            whole[path] = swapped_halves(update) if kind == "diffusers" and path in SWAP_HALVES else update
        else:
            parts.setdefault(path, {})[part] = update
    for path, fused in parts.items():
        whole[path] = fuse_parts(dict(sorted(fused.items())), fused_split_sizes(path, linears[path]), path)
    for path, update in whole.items():
        _check(update, path, linears[path])
    return whole, skipped
