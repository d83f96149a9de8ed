"""A DoRA (weight-decomposed) update as an adapter of :class:`pictor.models.lora.LoRALinear`.

At strength s the layer's weight becomes ``W + s * (r * (W + dW) - W)``, ``r = m / |W + dW|`` per output row
or per input column (see :class:`pictor.models.lora_updates.DoRAUpdate`; strength 0 is the base layer, 1 the
decomposed weight, as ComfyUI applies ``dora_scale``). Unmerged, the change of the output is

- per output row: ``s * ((r - 1) * (x W^T) + r * dW(x))``;
- per input column: ``s * ((x * (r - 1)) W^T + dW(x * r))``;

so it costs one more product with the layer's weight (merge it for full speed). ``r`` is computed once, when
the file is applied, against the weight the layer had then.
"""

from __future__ import annotations

from torch import Tensor, nn

from pictor.models.weight_storage import narrow_linear

__all__ = ["DoRAAdapter"]


class DoRAAdapter(nn.Module):
    """``inner`` (a LoRA or LoKr adapter at scale 1) with the decomposition's ratio ``r`` (float32)."""

    def __init__(self, inner: nn.Module, ratio: Tensor, on_out: bool, layer: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.on_out = on_out
        self.scale = float(scale)
        self.register_buffer("ratio", ratio.float().reshape(-1))
        self._layer = [layer]  # the LoRALinear it belongs to (a list: not registered as a submodule)

    @property
    def rank(self) -> int:
        return int(getattr(self.inner, "rank", 0))

    def _weight(self) -> Tensor:
        return self._layer[0].weight

    def forward(self, x: Tensor) -> Tensor:
        r = self.ratio.to(x.dtype)
        if self.on_out:
            base = narrow_linear(x, self._weight(), None)
            out = (r - 1) * base + r * self.inner(x)
        else:
            out = narrow_linear(x * (r - 1), self._weight(), None) + self.inner(x * r)
        return out * self.scale

    def delta_weight(self) -> Tensor:
        """The update to the layer's weight before any merge, at this strength (float64)."""
        layer = self._layer[0]
        original = layer._original if layer._original is not None else layer.weight.detach()
        w = original.to(self.ratio.device).double()
        r = self.ratio.double()
        r = r[:, None] if self.on_out else r[None, :]
        return self.scale * (r * (w + self.inner.delta_weight()) - w)
