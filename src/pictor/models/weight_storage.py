"""Weights stored narrower than they compute: FP8 linear layers, upcast one layer at a time.

FLUX.1's transformer is 11.9B parameters, 23.8 GB in bf16; its blocks' linear layers hold all but about
1% of them. Stored as float8 (e4m3fn, the layout of the ``flux1-dev-fp8`` files ComfyUI and others
share), they take half that, and each layer's weight is cast to the compute dtype only while the layer
runs, so at most one layer's wide copy exists at a time (diffusers calls this layerwise casting,
ComfyUI "weight dtype fp8"). Everything else (embedders, norms, biases, the final layer) stays in the
compute dtype: they are small and the most sensitive to rounding.

``store_fp8`` turns a model's block linears into :class:`StoredLinear`; ``place`` moves a model to a
device and compute dtype while leaving stored weights in their storage dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
FP8_STORAGE = torch.float8_e4m3fn  # what `pictor convert dtype --dtype fp8` writes
FP8_MAX = float(torch.finfo(FP8_STORAGE).max)  # 448: torch saturates larger values silently
STORED_PREFIXES = ("double_blocks.", "single_blocks.")


class _NarrowWeightLinear(torch.autograd.Function):
    """``x W^T + b`` with a frozen narrow (FP8) ``W``, widened for the product only.

    Plain autograd would keep each layer's widened copy for the backward pass (the input gradient needs
    ``W``), so a LoRA trained on an FP8 base would hold the whole base in the wide dtype again. Here the
    backward pass keeps the FP8 parameter itself (no extra memory) and widens it once more.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(x, weight.to(_compute_dtype(x)), None if bias is None else bias.to(_compute_dtype(x)))
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What the product runs in: autocast's dtype under autocast (no wide float32 detour), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def narrow_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, with an FP8-stored weight cast per call (and kept narrow for the backward pass)."""
    if not is_fp8(weight):
        return F.linear(x, weight, bias)  # autocast handles mixed dtypes, as for any nn.Linear
    if torch.is_grad_enabled():
        if weight.requires_grad:
            raise RuntimeError(
                "weights stored in FP8 are frozen: train a LoRA on them, or widen the model first"
            )
        return _NarrowWeightLinear.apply(x, weight, bias)
    dtype = _compute_dtype(x)
    return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` (same keys) whose weight may be stored in FP8 and is cast per call."""

    casts_weight = True  # `place` keeps this module's `weight` in its storage dtype

    def forward(self, x: Tensor) -> Tensor:
        return narrow_linear(x, self.weight, self.bias)


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def stored_linear_paths(model: nn.Module) -> list[str]:
    """The linear layers that FP8 storage covers: those inside the double and single blocks."""
    return [
        path
        for path, module in model.named_modules()
        if path.startswith(STORED_PREFIXES) and isinstance(module, nn.Linear)
    ]


def fp8_problem(name: str, t: Tensor) -> str | None:
    """Why ``t`` cannot be stored in FP8 (e4m3fn), or None: torch clips values past 448 without a word."""
    t = t.float()  # one tensor at a time; FP8 itself has few operators
    finite = t[torch.isfinite(t)]
    biggest = float(finite.abs().max()) if finite.numel() else 0.0
    if finite.numel() != t.numel():
        return f"{name} holds non-finite values"
    if biggest > FP8_MAX:
        return f"{name} holds {biggest:.4g}, beyond FP8's range ({FP8_MAX:g})"
    return None


def store_fp8(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Make the block linears :class:`StoredLinear`; with ``dtype`` (an FP8 dtype) also cast their weights.

    Without ``dtype`` only layers whose weights already are FP8 (an FP8 file, loaded with ``assign=True``)
    are turned, so a model loaded from an fp32/bf16 file is left as it is. Returns how many were turned.
    """
    if dtype is not None and dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an FP8 dtype")
    turned = 0
    for path in stored_linear_paths(model):
        module = model.get_submodule(path)
        assert isinstance(module, nn.Linear)
        if dtype is None and not is_fp8(module.weight):
            continue
        weight = module.weight.requires_grad_(False)  # FP8 weights are never trained
        if dtype is not None and weight.dtype != dtype:
            problem = fp8_problem(path + ".weight", weight.detach())
            if problem:
                raise ValueError(f"{problem}; keep this model in bf16")
            weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        with torch.device("meta"):
            stored = StoredLinear(module.in_features, module.out_features, bias=module.bias is not None)
        stored.weight = weight
        stored.bias = module.bias
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, stored)
        turned += 1
    return turned


def stored_dtype(model: nn.Module) -> torch.dtype | None:
    """The FP8 dtype the model's stored weights are in, or None when nothing is stored narrow."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "casts_weight", False) and isinstance(weight, Tensor) and is_fp8(weight):
            return weight.dtype
    return None


def place(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``model.to(device, dtype)``, except that the FP8 weights of layers that cast per call stay FP8
    (``Module.to`` would widen them: FP8 counts as floating point). Any other FP8 tensor is widened."""
    keep = {
        id(module.weight)
        for module in model.modules()
        if getattr(module, "casts_weight", False) and is_fp8(module.weight)
    }

    def move(t: Tensor) -> Tensor:
        if id(t) in keep:
            return t.to(device)
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return model._apply(move)
