"""A DoRA (weight-decomposed) update as an adapter of :class:`pictor.models.lora_layers.LoRALinear`.

At strength s the layer's weight becomes ``W + s * (r * (W + dW) - W)``, ``r = m / |W + dW|`` per output row
or per input column (see :class:`pictor.models.lora_updates.DoRAUpdate`; strength 0 is the base layer, 1 the
decomposed weight, as ComfyUI applies ``dora_scale``). Unmerged, the change of the output is

- per output row: ``s * ((r - 1) * (x W^T) + r * dW(x))``;
- per input column: ``s * ((x * (r - 1)) W^T + dW(x * r))``;

so it costs one more product with the layer's weight (merge it for full speed). ``r`` is computed once, when
the file is applied, against the layer's base weight: each DoRA is decomposed against the base, whatever other
adapters the layer carries. Hence on a layer with a DoRA the adapters are merged all together or not at all
(:meth:`pictor.models.lora_layers.LoRALinear.merge` says so), so that the weight the forward reads is the
base.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pictor.models.lora_updates import dora_delta, dora_ratio
from pictor.models.weight_storage import dense, narrow_linear

__all__ = ["DoRAAdapter"]


class DoRAAdapter(nn.Module):
    """``inner`` (a LoRA, LoKr or LoHa adapter at scale 1) with ``d = r - 1``, the decomposition's ratio less
    one, kept in float32 whatever the model's dtype: near 1, bf16's steps (0.004) are as large as a DoRA's
    typical change of a row's norm, so ``r`` itself in bf16 would round most of it away. Every product with
    ``d`` is therefore taken in float32, and nothing is multiplied by ``r`` in the model's dtype."""

    decomposed = True  # LoRALinear keeps it from being unmerged beside merged adapters

    def __init__(
        self, inner: nn.Module, magnitude: Tensor, on_out: bool, layer: nn.Module, scale: float
    ) -> None:
        super().__init__()
        self.inner = inner
        self.on_out = on_out
        self.scale = float(scale)
        self._layer = [layer]  # the LoRALinear it belongs to (a list: not registered as a submodule)
        # Not in state dicts (base checkpoints load into a model carrying it, like a LoRA's); the magnitude
        # stays so that d can be computed again for new base weights (LoRALinear's load hook: refresh).
        weight = layer.weight
        self.register_buffer("magnitude", magnitude.float().reshape(-1).to(weight.device), persistent=False)
        self.register_buffer("d", torch.zeros_like(self.magnitude), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """``d = m / |W + dW| - 1`` against the layer's base weight now (float64, kept in float32)."""
        layer = self._layer[0]
        if layer.merged or self.magnitude.is_meta or layer.weight.is_meta:
            return  # a merged layer's weight is not its base; a meta one has no numbers yet
        ratio = dora_ratio(
            self.magnitude, dense(layer.weight).detach(), self.inner.delta_weight(), self.on_out
        )
        self.d = (ratio - 1).float().to(self.d.device)

    def _apply(self, fn: Any, recurse: bool = True) -> DoRAAdapter:
        kept = {name: getattr(self, name) for name in ("magnitude", "d")}
        super()._apply(fn, recurse)
        for name, before in kept.items():  # they move with the model but stay float32
            after = getattr(self, name)
            source = after if before.is_meta or after.is_meta else before
            setattr(self, name, source.to(device=after.device, dtype=torch.float32))
        return self

    @property
    def rank(self) -> int:
        return int(getattr(self.inner, "rank", 0))

    def forward(self, x: Tensor) -> Tensor:
        # r = 1 + d: rows   (r - 1) (x W^T) + r dW(x)    = d (x W^T + dW(x)) + dW(x)
        #            columns ((x (r - 1)) W^T + dW(x r)) = (x d) W^T + dW(x) + dW(x d)
        weight = self._layer[0].weight
        inner = self.inner(x)
        if self.on_out:
            out = (narrow_linear(x, weight, None) + inner).float() * self.d + inner.float()
        else:
            xd = (x.float() * self.d).to(x.dtype)  # small numbers: bf16 holds them to its relative precision
            out = narrow_linear(xd, weight, None).float() + inner.float() + self.inner(xd).float()
        return (out * self.scale).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """The update to the layer's base weight (before any merge) at this strength, in float64."""
        layer = self._layer[0]
        original = layer._original if layer._original is not None else dense(layer.weight).detach()
        w = original.to(self.d.device)
        return self.scale * dora_delta(1 + self.d.double(), w, self.inner.delta_weight(), self.on_out)
