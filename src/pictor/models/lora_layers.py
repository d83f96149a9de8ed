"""LoRA layers: :class:`LoRALinear`, an ``nn.Linear`` that carries named adapters, and the plain
:class:`LoRAAdapter` (DoRA and LyCORIS' LoKr / LoHa adapters: :mod:`pictor.models.dora_adapter`,
:mod:`pictor.models.factored_adapter`).

A targeted ``nn.Linear`` is replaced by a :class:`LoRALinear` that holds the Linear's own ``weight`` and
``bias`` Parameters under the same names, plus any number of named adapters, each with its own scale::

    y = x W^T + b + sum over adapters of  scale * alpha / rank * B (A dropout(x))

so ``model.state_dict()`` keeps exactly the base model's keys (adapters are left out of it and are not
expected by ``load_state_dict``), and base checkpoints still load. Adapters are ordinary registered
modules otherwise: ``.to()``, ``named_parameters()``, DDP and optimizers see them. A starts
kaiming-uniform, B at zero, so a fresh adapter changes nothing (microsoft/LoRA, PEFT, kohya).

Merging writes ``W + scale * alpha / rank * B @ A`` (computed in float64) into the weight and keeps the
weight from before the first merge (on the CPU), so unmerging restores it bit for bit.

Two of kohya's regularisers act on plain adapters while they train (``self.training`` and gradients on;
never in eval mode, under ``no_grad`` / ``inference_mode``, nor in saved files): rank dropout zeroes each
sample's rank channels of ``A x`` with probability ``rank_dropout`` and divides the factor by
``1 - rank_dropout``, module dropout leaves the whole adapter out of a layer's forward with probability
``module_dropout`` (kohya's ``LoRAModule.forward`` in ``networks/lora_flux.py``).

Putting adapters on a model, merging, removing: :mod:`pictor.models.lora`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pictor.models.lora_formats import LoRAError
from pictor.models.weight_storage import (
    GGML_TYPE_KEY,
    QuantizedLinear,
    StoredLinear,
    ggml_format,
    is_fp8,
    is_quantized,
    is_stored,
    narrow_linear,
    tag_weight,
    type_id_of,
)

__all__ = ["LoRAAdapter", "LoRALinear", "adapter_dtype"]


class _Factor(nn.Module):
    """One LoRA matrix as ``.weight``, so keys read ``lora_A.weight``; deliberately not an ``nn.Linear``
    (target selection and init code that look for Linears must not find the adapters' matrices)."""

    def __init__(self, rows: int, cols: int, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))


class LoRAAdapter(nn.Module):
    """``scale * alpha / rank * B (A dropout(x))`` with A ``[rank, in]`` and B ``[out, rank]``.

    ``rank_dropout`` and ``module_dropout`` (kohya's network_args of the same names) are training-time
    settings, not state: they are in no state dict or file. While training, the draws come from torch's
    global RNG in this order: the layer's module-dropout draw ``torch.rand(1)`` (CPU; see
    :meth:`LoRALinear.forward`), the input dropout's mask, then the rank mask ``torch.rand(batch, rank)`` on
    the input's device.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)
        self.scale = float(scale)
        self.lora_A = _Factor(rank, in_features, device, dtype)
        self.lora_B = _Factor(out_features, rank, device, dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.rank

    def training_draws(self) -> bool:
        """Whether kohya's rank and module dropout act now: training mode with gradients on (a preview,
        an eval or a pipeline runs without them, whatever mode a module was left in)."""
        return self.training and torch.is_grad_enabled()

    def dropped(self) -> bool:
        """Module dropout: whether this forward leaves the adapter out (kohya: ``torch.rand(1) < p``)."""
        p = self.module_dropout
        return p > 0 and self.training_draws() and bool(torch.rand(1) < p)

    def forward(self, x: Tensor) -> Tensor:
        # Adapters may be kept in float32 on a bf16 base (training); the casts are no-ops otherwise.
        # The factor multiplies the rank-wide intermediate: the cheapest place for it.
        factor = self.factor
        h = F.linear(self.dropout(x).to(self.lora_A.weight.dtype), self.lora_A.weight)  # [..., rank]
        p = self.rank_dropout
        if p > 0 and self.training_draws():
            # kohya's rank dropout: one mask per sample over the rank channels (shared by its tokens), and
            # the factor divided by 1 - p "as if the rank were changed", so the update's mean is kept.
            keep = torch.rand((h.shape[0], self.rank), device=h.device) > p  # [B, rank]
            h = h * keep.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank).to(h.dtype)
            factor = factor / (1.0 - p)
        return F.linear(h * factor, self.lora_B.weight).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """The update to the base weight, in float64: ``factor * B @ A`` ``[out, in]``."""
        return self.factor * (self.lora_B.weight.detach().double() @ self.lora_A.weight.detach().double())


class _HiddenAdapters(nn.ModuleDict):
    """Adapters by name; they take no part in the owner's state_dict (the base keys stay unchanged)."""

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        return destination if destination is not None else OrderedDict()


def _keep_adapters(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # A base state dict has no adapter keys: offer the adapters' own tensors, so loading leaves them as
    # they are and strict loading does not report them missing.
    for name, param in module.adapters.named_parameters():  # type: ignore[union-attr]
        state_dict.setdefault(f"{prefix}adapters.{name}", param)


def _refresh_adapters(module: nn.Module, incompatible: Any) -> None:
    # New base weights: adapters computed from the old ones (a DoRA's ratio) are computed again.
    for adapter in module.adapters.values():  # type: ignore[union-attr]
        refresh = getattr(adapter, "refresh", None)
        if refresh is not None:
            refresh()


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """The dtype new adapter matrices take beside ``weight``: its own, but never FP8 or GGML blocks (stored
    formats)."""
    return torch.float32 if is_stored(weight) or not weight.is_floating_point() else weight.dtype


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (same ``weight``/``bias`` Parameters, same keys) plus named LoRA adapters."""

    casts_weight = True  # an FP8-stored weight stays FP8 (weight_storage.place) and is cast per call

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            base.tag()  # a copied layer's weight may have lost its format
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        # A quantized base: its format, to tag the weight again after a copy or a load, and its type buffer,
        # so that the wrapped model's state dict still says the layer is quantized.
        self.ggml_format = ggml_format(base.weight)
        if self.ggml_format is not None:
            self.register_buffer(GGML_TYPE_KEY, getattr(base, GGML_TYPE_KEY))
        self.adapters = _HiddenAdapters()
        self.merged: set[str] = set()
        self._original: Tensor | None = None  # the weight before the first merge, on the CPU
        self.register_load_state_dict_pre_hook(_keep_adapters)
        self.register_load_state_dict_post_hook(_refresh_adapters)

    def forward(self, x: Tensor) -> Tensor:
        if self.ggml_format is not None and not is_quantized(self.weight):
            tag_weight(self.weight, self.ggml_format, (self.out_features, self.in_features))
        out = narrow_linear(x, self.weight, self.bias)  # F.linear, unless the weight is stored narrow
        for name, adapter in self.adapters.items():
            if name not in self.merged and adapter.scale != 0.0:
                dropped = getattr(adapter, "dropped", None)  # kohya's module dropout (plain LoRA only)
                if dropped is None or not dropped():
                    out = out + adapter(x)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, merged={sorted(self.merged)}"
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's Parameters (adapters must be gone or unmerged); a
        :class:`StoredLinear` when the weight is stored FP8, a :class:`QuantizedLinear` when it is GGML
        blocks, so it is still widened per call."""
        fmt = self.ggml_format
        with torch.device("meta"):
            if fmt is not None:
                linear: nn.Linear = QuantizedLinear(
                    self.in_features, self.out_features, self.bias is not None, fmt
                )
            else:
                kind = StoredLinear if is_fp8(self.weight) else nn.Linear
                linear = kind(self.in_features, self.out_features, bias=self.bias is not None)
        if fmt is not None:  # the type buffer is the layer's own; the weight and bias are this layer's
            linear.ggml_type = torch.tensor(type_id_of(fmt), dtype=torch.int32, device=self.weight.device)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @torch.no_grad()
    def _rewrite(self) -> None:
        """weight = original + sum of the merged adapters' updates (float64), or the exact original."""
        if self._original is None:
            if not self.merged:
                return
            self._original = self.weight.detach().to("cpu", copy=True)
        original = self._original.to(self.weight.device)
        if not self.merged:
            self.weight.copy_(original)
            self._original = None
            return
        total = original.double()
        for name in sorted(self.merged):
            total = total + self.adapters[name].delta_weight().to(total.device)
        self.weight.copy_(total.to(self.weight.dtype))

    def _check_merged(self, merged: set[str]) -> None:
        """An unmerged DoRA adapter reads the layer's weight as its base: nothing else may be merged then."""
        dora = sorted(
            n for n, a in self.adapters.items() if getattr(a, "decomposed", False) and n not in merged
        )
        if dora and merged:
            raise LoRAError(
                f"this layer carries the DoRA adapter '{dora[0]}', which is decomposed against the base "
                "weight: merge all of the layer's adapters together (merge_lora(model)) or none of them"
            )

    def check_merge(self, merged: set[str]) -> None:
        """Raise :class:`LoRAError` unless the adapters ``merged`` can be the merged ones."""
        if merged - self.merged and is_stored(self.weight):
            kind = ggml_format(self.weight) or "FP8"
            raise LoRAError(
                f"a LoRA cannot be merged into {kind}-stored weights (storing rounds most of its changes "
                "away); keep it unmerged, which is exact, or widen the model first"
            )
        self._check_merged(merged)

    def merge(self, names: str | set[str]) -> None:
        names = {names} if isinstance(names, str) else names
        if not names <= self.merged:
            self.check_merge(self.merged | names)
            self.merged |= names
            self._rewrite()

    def unmerge(self, names: str | set[str]) -> None:
        names = {names} if isinstance(names, str) else names
        if names & self.merged:
            self._check_merged(self.merged - names)
            self.merged -= names
            self._rewrite()
