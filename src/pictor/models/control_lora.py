"""BFL's FLUX.1 Canny / Depth [dev] LoRAs (``flux1-canny-dev-lora``, ``flux1-depth-dev-lora``): what they
hold and how they turn FLUX.1 [dev] into a control model (:mod:`pictor.control_images`).

As BFL's reference code builds the model (flux ``util.load_flow_model`` with ``optionally_expand_state_dict``,
``modules/lora.py`` ``LinearLora``, ``model.FluxLoraWrapper``; diffusers'
``_convert_bfl_flux_control_lora_to_diffusers`` and ``_maybe_expand_transformer_param_shape_or_error_`` do
the same):

- FLUX.1 [dev]'s ``img_in`` weight ``[hidden, C]`` is zero-padded to ``[hidden, 2C]``: the input then reads
  the noisy tokens (the first C channels, as before) and a control picture's packed latents (the new ones);
- every linear layer runs ``base(x) + scale * lora_B(lora_A(x))``, where ``lora_B`` has a bias: its keys
  are ``<layer>.lora_A.weight`` ``[r, in]``, ``<layer>.lora_B.weight`` ``[out, r]`` and
  ``<layer>.lora_B.bias`` ``[out]``, on FLUX.1's own names (pictor's), with no alpha (scale 1);
- the file's ``*.norm.query_norm.scale`` / ``*.norm.key_norm.scale`` replace the model's qk-norm scales
  (``load_state_dict`` over them), whatever the LoRA's scale (BFL's ``set_lora_scale`` scales the LoRA
  outputs only).

So merged for good, each layer becomes ``W' = pad(W) + scale * B @ A`` and ``b' = b + scale * bias_B``
(exactly the reference's output, since a linear is linear in its weight and bias), and the norm scales the
file's. Pure tensors here; the bundle around it is :func:`pictor.lora_merge.merge_loras`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pictor.models.lora_formats import CONTROL_NORM_SUFFIXES
from pictor.models.lora_names import NATIVE_PREFIXES
from pictor.models.lora_updates import LoRAError

__all__ = ["BiasedLoRA", "ControlLoRA", "control_kind_in_name", "control_weights", "read_control_lora"]

WIDENED = "img_in"  # the one layer whose input the LoRA widens
_ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias"}


@dataclass
class BiasedLoRA:
    """One linear layer's part of the file: ``out += lora_B(lora_A(x))``, lora_B with an optional bias."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    bias: Tensor | None  # [out]
    source: str  # a key of the file, for messages

    def delta(self) -> Tensor:
        """The weight's change at scale 1, ``[out, in]`` in float64."""
        return self.B.double() @ self.A.double()


@dataclass
class ControlLoRA:
    """A whole file: per linear layer (FLUX.1 path) its update, and the norm scales it replaces (state-dict
    key -> value)."""

    layers: dict[str, BiasedLoRA]
    norms: dict[str, Tensor]


def control_kind_in_name(name: str) -> str | None:
    """ "canny" or "depth" when a file's name says exactly one of them (flux1-canny-dev-lora), else None."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    found = [kind for kind in ("canny", "depth") if kind in words]
    return found[0] if len(found) == 1 else None


def _strip(key: str) -> str:
    for prefix in NATIVE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _finite(key: str, value: Tensor) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise LoRAError(f"LoRA key '{key}' holds NaN or infinite values; the file is broken")


def read_control_lora(sd: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> ControlLoRA:
    """The file's tensors checked against the base model's transformer (``shapes``: its state dict's shapes,
    before widening). Every key must be a LoRA part of a linear layer or a qk-norm scale of the model, with
    the shape that layer needs (``img_in``'s lora_A twice the model's input); every mismatch names its key."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    norms: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = _strip(key)
        _finite(key, value)
        if name.endswith(CONTROL_NORM_SUFFIXES):
            if name not in shapes:
                raise LoRAError(f"LoRA key '{key}' names no qk-norm scale of the model")
            if tuple(value.shape) != tuple(shapes[name]):
                raise LoRAError(
                    f"LoRA key '{key}' is {list(value.shape)}, but the model's scale is "
                    f"{list(shapes[name])}: the LoRA was made for another model size"
                )
            norms[name] = value
            continue
        suffix = next((s for s in _ROLES if name.endswith(s)), None)
        if suffix is None:
            raise LoRAError(
                f"LoRA key '{key}' is not part of BFL's Canny/Depth LoRA format (<layer>.lora_A.weight, "
                ".lora_B.weight, .lora_B.bias and <block>.norm.query_norm.scale / .key_norm.scale)"
            )
        parts.setdefault(name[: -len(suffix)], {})[_ROLES[suffix]] = (key, value)
    layers: dict[str, BiasedLoRA] = {}
    for path, roles in parts.items():
        layers[path] = _layer(path, roles, shapes)
    if WIDENED not in layers:
        raise LoRAError(
            f"the file has no {WIDENED}.lora_A.weight: BFL's Canny/Depth LoRA widens {WIDENED} to read a "
            "control picture; this file does not, so it is not one"
        )
    return ControlLoRA(layers, norms)


def _layer(
    path: str, roles: Mapping[str, tuple[str, Tensor]], shapes: Mapping[str, tuple[int, ...]]
) -> BiasedLoRA:
    any_key = next(iter(roles.values()))[0]
    weight = shapes.get(f"{path}.weight")
    if weight is None or len(weight) != 2:
        raise LoRAError(f"LoRA key '{any_key}' names no linear layer of the model ('{path}')")
    for role in ("A", "B"):
        if role not in roles:
            raise LoRAError(f"LoRA key '{any_key}': layer '{path}' has no lora_{role}.weight")
    (key_a, a), (key_b, b) = roles["A"], roles["B"]
    out_f, in_f = weight
    wanted_in = 2 * in_f if path == WIDENED else in_f
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise LoRAError(
            f"LoRA key '{key_a}': A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair "
            "(A [r, in], B [out, r])"
        )
    if a.shape[1] != wanted_in:
        why = (
            f"twice the model's {in_f} input channels (the noise and the control picture)"
            if path == WIDENED
            else f"the layer's {in_f} inputs"
        )
        raise LoRAError(
            f"LoRA key '{key_a}' takes {a.shape[1]} inputs, but it must take {wanted_in}: {why}"
            + ("" if path == WIDENED else "; the LoRA was made for another model size")
        )
    if b.shape[0] != out_f:
        raise LoRAError(
            f"LoRA key '{key_b}' has {b.shape[0]} output rows, but '{path}' has {out_f}: the LoRA was made "
            "for another model size"
        )
    bias = None
    if "bias" in roles:
        key_bias, bias = roles["bias"]
        if f"{path}.bias" not in shapes:
            raise LoRAError(f"LoRA key '{key_bias}': layer '{path}' has no bias in this model to add it to")
        if tuple(bias.shape) != (out_f,):
            raise LoRAError(f"LoRA key '{key_bias}' is {list(bias.shape)}; the layer's bias is [{out_f}]")
    return BiasedLoRA(a, b, bias, key_a)


def control_weights(
    path: str, weight: Tensor, bias: Tensor | None, update: BiasedLoRA, scale: float
) -> tuple[Tensor, Tensor | None]:
    """One layer merged, in float64: ``pad(W) + scale * B @ A`` (``img_in`` zero-padded on its input side to
    the LoRA's width, as BFL's ``optionally_expand_state_dict`` does) and ``b + scale * bias_B``."""
    total = weight.double()
    if path == WIDENED:
        total = torch.nn.functional.pad(total, (0, update.A.shape[1] - total.shape[1]))  # zero columns
    total = total + scale * update.delta()
    if bias is None or update.bias is None:
        return total, None if bias is None else bias.double()
    return total, bias.double() + scale * update.bias.double()
