"""LoRA adapters on the linear layers of a model: inject, train, merge / unmerge, remove, load, save.

The model surgery: pick the target layers (:data:`TARGET_GROUPS`, globs, regexes), wrap them, add, list,
scale, merge / unmerge and remove named adapters across a model. The layers themselves (:class:`LoRALinear`
and the plain :class:`LoRAAdapter`: how adapters add to a Linear's output, merge bit-exactly, and kohya's
rank and module dropout): :mod:`pictor.models.lora_layers`.

:func:`max_norm_adapters` is kohya's max-norm regularisation (``--scale_weight_norms``), applied after an
optimizer step.

Files (apply, save, hashes): :mod:`pictor.lora_files`; the native, diffusers/PEFT and kohya key
layouts: :mod:`pictor.models.lora_formats`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from pictor.models.lora_formats import LoRAError
from pictor.models.lora_layers import LoRAAdapter, LoRALinear, adapter_dtype

__all__ = [
    "TARGET_GROUPS",
    "LoRAError",
    "adapter_tree",
    "add_lora",
    "check_adapter_name",
    "linear_layers",
    "list_loras",
    "max_norm_adapters",
    "merge_lora",
    "remove_lora",
    "select_targets",
    "set_lora_scale",
    "unmerge_lora",
    "unwrap_if_empty",
    "wrap_linear",
]

# Named target groups (FLUX.1 module names). "blocks" is kohya's default: every linear in the blocks.
_ATTN = [
    "double_blocks.*.img_attn.qkv",
    "double_blocks.*.img_attn.proj",
    "double_blocks.*.txt_attn.qkv",
    "double_blocks.*.txt_attn.proj",
    "single_blocks.*.linear1",  # fused q, k, v (+ MLP input)
    "single_blocks.*.linear2",  # attention output (+ MLP output)
]
_MLP = [
    "double_blocks.*.img_mlp.0",
    "double_blocks.*.img_mlp.2",
    "double_blocks.*.txt_mlp.0",
    "double_blocks.*.txt_mlp.2",
]
_MOD = ["double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin"]
TARGET_GROUPS: dict[str, list[str]] = {
    "attn": _ATTN,
    "mlp": _MLP,
    "mod": _MOD,
    "blocks": _ATTN + _MLP + _MOD,
    "all": ["*"],
}


# ------------------------------------------------------------------------------------ model surgery


def _wrappers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer (plain or already wrapped) by path; adapters' own matrices are not Linears."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}


def wrap_linear(model: nn.Module, path: str) -> LoRALinear:
    """The :class:`LoRALinear` at ``path``, replacing the plain Linear there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise LoRAError(f"'{path}' is a {type(module).__name__}, not a linear layer")
    wrapper = LoRALinear(module)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, wrapper)
    return wrapper


def unwrap_if_empty(model: nn.Module, path: str) -> None:
    """Turn the :class:`LoRALinear` at ``path`` back into a plain Linear if it carries no adapters."""
    module = model.get_submodule(path)
    if isinstance(module, LoRALinear) and not len(module.adapters):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.to_linear())


def select_targets(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Paths of the linear layers matched by ``patterns``: group names (:data:`TARGET_GROUPS`), fnmatch
    globs over module paths (``*.img_attn.qkv``) or ``re:REGEX`` (full match). Comma-separated in a string.

    A pattern that matches no linear layer is an error (a typo must not train nothing).
    """
    items = [p.strip() for p in patterns.split(",")] if isinstance(patterns, str) else list(patterns)
    items = [p for p in items if p]
    if not items:
        raise LoRAError("no LoRA target patterns given")
    paths = list(linear_layers(model))
    chosen: set[str] = set()
    for item in items:
        globs = TARGET_GROUPS.get(item, [item])
        if item.startswith("re:"):
            regex = re.compile(item[3:])
            hits = {p for p in paths if regex.fullmatch(p)}
        else:
            hits = {p for p in paths if any(fnmatchcase(p, g) for g in globs)}
        if not hits:
            raise LoRAError(
                f"LoRA target '{item}' matches no linear layer; groups are {sorted(TARGET_GROUPS)}, and "
                f"layer names look like {', '.join(paths[:4])}"
            )
        chosen |= hits
    return [p for p in paths if p in chosen]  # model order


def add_lora(
    model: nn.Module,
    name: str = "default",
    targets: str | Sequence[str] = "blocks",
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
) -> nn.Module:
    """Add a fresh, trainable adapter to the targeted layers; returns its :func:`adapter_tree`.

    The new matrices live on the base weights' device, in ``dtype`` (default: the base weights'; train
    in float32 on a bf16 base). A is drawn from torch's global RNG. ``rank_dropout`` and
    ``module_dropout``: kohya's, while training only (see :class:`LoRAAdapter`).
    """
    check_adapter_name(model, name)
    for path in select_targets(model, targets):
        wrapper = wrap_linear(model, path)
        w = wrapper.weight
        wrapper.adapters[name] = LoRAAdapter(
            wrapper.in_features,
            wrapper.out_features,
            rank,
            alpha,
            scale,
            dropout,
            w.device,
            dtype or adapter_dtype(w),
            rank_dropout,
            module_dropout,
        )
    return adapter_tree(model, name)


@torch.no_grad()
def max_norm_adapters(module: nn.Module, max_norm: float) -> tuple[int, float, float]:
    """kohya's max-norm regularisation (``--scale_weight_norms``; ``apply_max_norm_regularization`` in
    sd-scripts' ``networks/lora_flux.py``) on every :class:`LoRAAdapter` in ``module``, in place.

    Each adapter's update ``alpha / rank * B @ A`` (its strength ``scale`` left out, as kohya leaves out the
    multiplier) has its Frobenius norm capped at ``max_norm``: past it, A and B are both multiplied by
    ``sqrt(max_norm / norm)``. Returns kohya's three numbers: how many adapters were scaled, and the mean
    and the largest norm after the step. The norm is ``sqrt(sum((A A^T) * (B^T B)))``, in float64: the same
    number as ``||B @ A||`` without forming the ``[out, in]`` product.
    """
    if not max_norm > 0:
        raise LoRAError(f"max_norm must be > 0, got {max_norm}")
    scaled, norms = 0, []
    for adapter in module.modules():
        if not isinstance(adapter, LoRAAdapter):
            continue
        a, b = adapter.lora_A.weight, adapter.lora_B.weight
        a64, b64 = a.detach().double(), b.detach().double()
        gram = ((a64 @ a64.T) * (b64.T @ b64)).sum().clamp(min=0.0)
        norm = float(gram.sqrt()) * adapter.alpha / adapter.rank
        # kohya: norm clamped below at max / 2, desired = min(norm, max), ratio = desired / norm: 1 up to
        # the cap, max / norm past it
        clamped = max(norm, max_norm / 2)
        ratio = min(clamped, max_norm) / clamped
        if ratio != 1:
            scaled += 1
            a.mul_(ratio**0.5)
            b.mul_(ratio**0.5)
        norms.append(norm * ratio)
    if not norms:
        raise LoRAError("max-norm regularisation: no LoRA adapters (lora_A / lora_B) to scale")
    return scaled, sum(norms) / len(norms), max(norms)


def check_adapter_name(model: nn.Module, name: str) -> None:
    """Raise :class:`LoRAError` unless ``name`` can name a new adapter of ``model``."""
    if not name or "." in name or hasattr(nn.ModuleDict, name):
        raise LoRAError(
            f"adapter name must be non-empty, contain no '.' and not be a torch Module attribute "
            f"(train, to, ...), got {name!r}"
        )
    if name in list_loras(model):
        raise LoRAError(
            f"the model already has a LoRA adapter named '{name}'; remove it or pick another name"
        )


def adapter_tree(model: nn.Module, name: str) -> nn.Module:
    """A module holding adapter ``name``'s adapters at their layers' paths (no other state).

    Its ``state_dict()`` keys are the native file keys (``double_blocks.0.img_attn.qkv.lora_A.weight``)
    and its parameters ARE the live adapter parameters: train, checkpoint or EMA it like a model.
    """
    root = nn.Module()
    found = False
    for path, wrapper in _wrappers(model):
        if name in wrapper.adapters:
            node = root
            *parents, leaf = path.split(".")
            for part in parents:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]  # type: ignore[assignment]
            node.add_module(leaf, wrapper.adapters[name])
            found = True
    if not found:
        raise LoRAError(f"the model has no LoRA adapter named '{name}' (it has {sorted(list_loras(model))})")
    return root


def list_loras(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Adapters on the model: name -> {layers, scale, merged}."""
    info: dict[str, dict[str, Any]] = {}
    for _, wrapper in _wrappers(model):
        for name, adapter in wrapper.adapters.items():
            entry = info.setdefault(name, {"layers": 0, "scale": adapter.scale, "merged": False})
            entry["layers"] += 1
            entry["merged"] = entry["merged"] or name in wrapper.merged
    return info


def _layers_of(model: nn.Module, name: str | None) -> Iterator[tuple[str, LoRALinear, str]]:
    """(path, layer, adapter name) for every layer carrying adapter ``name`` (every adapter when None)."""
    have = list_loras(model)
    if name is not None and name not in have:
        raise LoRAError(f"the model has no LoRA adapter named '{name}' (it has {sorted(have)})")
    for path, wrapper in list(_wrappers(model)):
        for n in [n for n in wrapper.adapters if name in (None, n)]:
            yield path, wrapper, n


def _by_layer(model: nn.Module, name: str | None) -> dict[int, tuple[LoRALinear, set[str]]]:
    layers: dict[int, tuple[LoRALinear, set[str]]] = {}
    for _, wrapper, n in _layers_of(model, name):
        layers.setdefault(id(wrapper), (wrapper, set()))[1].add(n)
    return layers


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (all when None) into the base weights; forward then skips it. A refusal (a
    DoRA beside it, FP8 weights) comes before any layer changes."""
    layers = _by_layer(model, name).values()
    for wrapper, names in layers:
        wrapper.check_merge(wrapper.merged | names)
    for wrapper, names in layers:
        wrapper.merge(names)  # a layer's adapters at once: with a DoRA among them, one at a time is refused


def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    """Undo :func:`merge_lora`; with nothing left merged a layer gets its original weight back exactly."""
    layers = _by_layer(model, name).values()
    for wrapper, names in layers:
        if names & wrapper.merged:
            wrapper._check_merged(wrapper.merged - names)
    for wrapper, names in layers:
        wrapper.unmerge(names)


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change an adapter's strength (a merged adapter is re-merged at the new scale)."""
    for _, wrapper, n in _layers_of(model, name):
        wrapper.adapters[n].scale = float(scale)
        if n in wrapper.merged:
            wrapper._rewrite()


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name`` (all when None); layers left without adapters become plain Linears again."""
    for wrapper, names in _by_layer(model, name).values():
        wrapper.unmerge(names)
    for path, wrapper, n in _layers_of(model, name):
        del wrapper.adapters[n]
        if not len(wrapper.adapters):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapper.to_linear())
