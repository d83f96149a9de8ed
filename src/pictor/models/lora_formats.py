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

Every key must be used: one that names no module of the model is an error that quotes it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LoRAError",
    "LoRAUpdate",
    "detect_format",
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
}
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
FLUX_ROOTS = frozenset(
    {
        "double_blocks",
        "single_blocks",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "final_layer",
    }
)
DIFFUSERS_ROOTS = frozenset(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "norm_out",
        "proj_out",
    }
)
KOHYA_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")

# diffusers module (inside a block) -> (FLUX module inside the block, part index of a fused layer or None)
DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
SWAP_HALVES = frozenset({"final_layer.adaLN_modulation.1"})  # diffusers (scale, shift) vs FLUX (shift, scale)
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


class LoRAError(ValueError):
    """A LoRA that does not fit the model or cannot be read; the message names the offending key."""


@dataclass
class LoRAUpdate:
    """One layer's update: ``W += scale * alpha / rank * B @ A`` with A ``[rank, in]``, B ``[out, rank]``."""

    A: Tensor
    B: Tensor
    alpha: float
    source: str  # a file key it came from, for messages

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class _Pair:
    A: tuple[str, Tensor] | None = None
    B: tuple[str, Tensor] | None = None
    alpha: tuple[str, Tensor] | None = None


def _group(sd: Mapping[str, Tensor]) -> dict[str, _Pair]:
    """Keys -> {module name: its A, B and alpha}. A key with another suffix, or half a pair, is an error."""
    groups: dict[str, _Pair] = {}
    for key, value in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise LoRAError(
                f"LoRA key '{key}' is not a LoRA weight (expected names ending in .lora_A.weight / "
                ".lora_B.weight, .lora_down.weight / .lora_up.weight or .alpha); DoRA, LoKr and other "
                "variants are not supported"
            )
        setattr(groups.setdefault(key[: -len(suffix)], _Pair()), _SUFFIXES[suffix], (key, value))
    for module, pair in groups.items():
        if pair.A is None or pair.B is None:
            present = next(p for p in (pair.A, pair.B, pair.alpha) if p is not None)[0]
            raise LoRAError(
                f"LoRA key '{present}': module '{module}' has no matching {'B' if pair.B is None else 'A'}"
            )
        if pair.A[1].ndim != 2 or pair.B[1].ndim != 2 or pair.A[1].shape[0] != pair.B[1].shape[1]:
            raise LoRAError(
                f"LoRA key '{pair.A[0]}': A {tuple(pair.A[1].shape)} and B {tuple(pair.B[1].shape)} are not "
                "a rank-r pair (A [r, in], B [out, r]); convolutional LoRAs do not apply to FLUX"
            )
        if pair.A[1].shape[0] < 1:
            raise LoRAError(f"LoRA key '{pair.A[0]}' has rank 0: it changes nothing; the file is broken")
    return groups


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _kind(module: str) -> str:
    if module.startswith(KOHYA_PREFIX) or module.startswith(KOHYA_TEXT_PREFIXES):
        return "kohya"
    root = _strip(module, NATIVE_PREFIXES).split(".")[0]
    if root in FLUX_ROOTS:
        return "native"
    if root in DIFFUSERS_ROOTS:
        return "diffusers"
    return "unknown"


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """``"native"``, ``"diffusers"`` or ``"kohya"``; a key of no known layout, or a mix, is an error."""
    groups = _group(sd)
    if not groups:
        raise LoRAError("the LoRA has no weights")
    kinds: dict[str, str] = {}
    for module, pair in groups.items():
        kind = _kind(module)
        if kind == "unknown":
            assert pair.A is not None  # _group checked the pairs
            raise LoRAError(
                f"LoRA key '{pair.A[0]}' names no FLUX module in a known layout "
                "(FLUX.1 names such as double_blocks.N.img_attn.qkv, diffusers names such as "
                "transformer_blocks.N.attn.to_q, or kohya's lora_unet_...)"
            )
        kinds.setdefault(kind, module)
    if len(kinds) > 1:
        quoted = ", ".join(f"'{m}' ({k})" for k, m in kinds.items())
        raise LoRAError(f"the LoRA mixes key layouts: {quoted}")
    return next(iter(kinds))


# ------------------------------------------------------------------------------------------ alphas


def _tensor_alpha(pair: _Pair) -> float | None:
    if pair.alpha is None:
        return None
    key, alpha = pair.alpha
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


def _check(update: LoRAUpdate, path: str, shape: tuple[int, int]) -> None:
    in_f, out_f = shape
    if update.A.shape[1] != in_f or update.B.shape[0] != out_f:
        raise LoRAError(
            f"LoRA key '{update.source}': update for '{path}' is [{update.B.shape[0]} x {update.A.shape[1]}] "
            f"but the layer is [{out_f} x {in_f}] (out x in): the LoRA was made for another model size"
        )


def _fuse(parts: dict[int, tuple[str, Tensor, Tensor, float]], sizes: list[int], path: str) -> LoRAUpdate:
    """Split parts (index -> key, A, B, alpha) -> one update of the fused layer, scales folded into B."""
    keys = [p[0] for p in parts.values()]
    for i, (key, _a, b, _alpha) in parts.items():
        if b.shape[0] != sizes[i]:
            raise LoRAError(
                f"LoRA key '{key}': has {b.shape[0]} output rows, but part {i} of '{path}' has {sizes[i]}"
            )
    scaled = {i: (a.float(), b.float() * (alpha / a.shape[0])) for i, (_k, a, b, alpha) in parts.items()}
    first_a = next(iter(scaled.values()))[0]
    if all(a.shape == first_a.shape and torch.equal(a, first_a) for a, _ in scaled.values()):
        # The parts share one A (a fused LoRA that a converter split): keep the rank, stack the B's.
        rank = first_a.shape[0]
        rows = [
            scaled[i][1] if i in scaled else first_a.new_zeros(size, rank) for i, size in enumerate(sizes)
        ]
        return LoRAUpdate(first_a, torch.cat(rows), float(rank), keys[0])
    a_cat = torch.cat([a for a, _ in scaled.values()])  # [sum r_i, in]
    b_diag = first_a.new_zeros(sum(sizes), a_cat.shape[0])
    col = 0
    for i, (a, b) in scaled.items():
        row = sum(sizes[:i])
        b_diag[row : row + sizes[i], col : col + a.shape[0]] = b
        col += a.shape[0]
    return LoRAUpdate(a_cat, b_diag, float(a_cat.shape[0]), keys[0])


def _diffusers_target(module: str) -> tuple[str, int | None] | None:
    name = _strip(module, ("transformer.",))
    if name in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[name], None
    m = _BLOCK.match(name)
    if m is None:
        return None
    kind, index, rest = m.groups()
    table, ours = (
        (DIFFUSERS_DOUBLE, "double_blocks")
        if kind == "transformer_blocks"
        else (DIFFUSERS_SINGLE, "single_blocks")
    )
    if rest not in table:
        return None
    inner, part = table[rest]
    return f"{ours}.{index}.{inner}", part


def fused_split_sizes(path: str, shape: tuple[int, int]) -> list[int]:
    in_f, out_f = shape
    if path.endswith(".linear1"):  # [q | k | v | mlp_in], q/k/v as wide as the hidden size (= in)
        return [in_f, in_f, in_f, out_f - 3 * in_f]
    return [out_f // 3] * 3  # qkv


def _unmatched(key: str, where: str) -> LoRAError:
    return LoRAError(f"LoRA key '{key}' matches no layer of the model ({where})")


def to_flux_updates(
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    linears: Mapping[str, tuple[int, int]],
    strict: bool = True,
) -> tuple[dict[str, LoRAUpdate], list[str]]:
    """Any supported LoRA -> ({FLUX module path: update}, skipped keys).

    ``linears`` maps each linear layer of the model to ``(in_features, out_features)``. With ``strict``
    every key must land on a layer; otherwise keys that do not are returned as skipped (never silently).
    """
    fmt = detect_format(sd)
    groups = _group(sd)
    updates: dict[str, LoRAUpdate] = {}
    skipped: list[str] = []

    def miss(pair: _Pair, where: str) -> None:
        assert pair.A is not None
        if strict:
            raise _unmatched(pair.A[0], where)
        skipped.extend(entry[0] for entry in (pair.A, pair.B, pair.alpha) if entry is not None)

    if fmt == "kohya":
        by_name = {KOHYA_PREFIX + path.replace(".", "_"): path for path in linears}
        for module, pair in groups.items():
            assert pair.A is not None and pair.B is not None
            if module.startswith(KOHYA_TEXT_PREFIXES):
                if strict:
                    raise LoRAError(
                        f"LoRA key '{pair.A[0]}' is for a text encoder; pictor applies LoRAs to the "
                        "transformer only (load with strict=False to skip text-encoder keys)"
                    )
                miss(pair, "text encoder")
                continue
            if module not in by_name:
                miss(pair, "no FLUX linear has this kohya name")
                continue
            alpha = _tensor_alpha(pair)
            rank = pair.A[1].shape[0]
            updates[by_name[module]] = LoRAUpdate(pair.A[1], pair.B[1], alpha if alpha else rank, pair.A[0])
    elif fmt == "native":
        for module, pair in groups.items():
            assert pair.A is not None and pair.B is not None
            path = _strip(module, NATIVE_PREFIXES)
            if path not in linears:
                miss(pair, f"the model has no linear layer '{path}'")
                continue
            rank = pair.A[1].shape[0]
            alpha = _tensor_alpha(pair) or _native_alpha(path, rank, metadata)
            updates[path] = LoRAUpdate(pair.A[1], pair.B[1], alpha, pair.A[0])
    else:
        fused: dict[str, dict[int, tuple[str, Tensor, Tensor, float]]] = {}
        for module, pair in groups.items():
            assert pair.A is not None and pair.B is not None
            target = _diffusers_target(module)
            if target is None or target[0] not in linears:
                miss(pair, "no FLUX layer corresponds to this diffusers module")
                continue
            path, part = target
            rank = pair.A[1].shape[0]
            name = _strip(module, ("transformer.",))
            alpha = _tensor_alpha(pair) or _diffusers_alpha(name, rank, metadata)
            if part is None:
                b = pair.B[1]
                if path in SWAP_HALVES:
                    scale, shift = b.chunk(2, dim=0)
                    b = torch.cat([shift, scale])
                updates[path] = LoRAUpdate(pair.A[1], b, alpha, pair.A[0])
            else:
                fused.setdefault(path, {})[part] = (pair.A[0], pair.A[1], pair.B[1], alpha)
        for path, parts in fused.items():
            sizes = fused_split_sizes(path, linears[path])
            updates[path] = _fuse(dict(sorted(parts.items())), sizes, path)
    for path, update in updates.items():
        _check(update, path, linears[path])
    return updates, skipped
