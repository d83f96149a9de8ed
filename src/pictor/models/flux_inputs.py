"""The checks of :meth:`pictor.models.flux.Flux.forward`'s arguments: shapes, dtypes and batch sizes.

Every check raises a ValueError that names the argument, and brings ids / t / guidance to batched form, so
the forward itself reads as FLUX.1's. They are methods of a mixin, not free functions, because they read the
model's params and block counts as ``self``; the mixin holds no state and no modules, so it adds no
parameters and the model's ``state_dict`` keys stay FLUX.1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pictor.models.block_bias import BlockBias
from pictor.models.control_residuals import ControlResiduals
from pictor.models.input_checks import batched_ids, batched_scalar, shape_of
from pictor.models.ip_adapter import IPAttention

if TYPE_CHECKING:
    from pictor.models.flux import FluxParams

__all__ = ["FluxInputChecks"]


class FluxInputChecks:
    """Checks of `Flux.forward`'s arguments against the model they are given to (mixed into `Flux`)."""

    params: FluxParams
    double_blocks: nn.ModuleList
    single_blocks: nn.ModuleList

    def _check_residuals(self, residuals: Sequence[Tensor] | None, img: Tensor) -> Sequence[Tensor] | None:
        if residuals is None:
            return None
        n = len(self.double_blocks) + len(self.single_blocks)
        if len(residuals) != n:
            raise ValueError(
                f"Flux: img_residuals must hold one tensor per block ({n}), got {len(residuals)}"
            )
        for r in residuals:
            if not isinstance(r, Tensor) or r.shape != img.shape:
                raise ValueError(
                    f"Flux: each img_residuals tensor must be {list(img.shape)} (the embedded image tokens), "
                    f"got {shape_of(r)}"
                )
        return residuals

    def _check_mask(
        self, mask: Tensor | BlockBias | None, img: Tensor, txt: Tensor
    ) -> Tensor | BlockBias | None:
        if mask is None:
            return None
        if isinstance(mask, BlockBias):
            self._check_mask(mask.masked, img, txt)
            self._check_mask(mask.base, img, txt)
            return mask.cast(img.dtype)
        b, s = img.shape[0], txt.shape[1] + img.shape[1]
        if (
            not isinstance(mask, Tensor)
            or mask.ndim != 4
            or mask.shape[0] not in (1, b)
            or mask.shape[1:] != (1, s, s)
        ):
            raise ValueError(
                f"Flux: attn_mask must be [{b} or 1, 1, {s}, {s}] (a bias over the text and image tokens), "
                f"got {shape_of(mask)}"
            )
        if not mask.is_floating_point():
            raise ValueError(f"Flux: attn_mask must be a float bias (-inf: not seen), got {mask.dtype}")
        return mask.to(img.dtype)  # once here, not in every block

    def _check_ip_adapter(self, ipa: IPAttention | None, img: Tensor) -> IPAttention | None:
        if ipa is None:
            return None
        if not isinstance(ipa, IPAttention):
            raise ValueError(f"Flux: ip_adapter must be an IPAttention, got {type(ipa).__name__}")
        p = self.params
        if len(ipa.keys) != len(self.double_blocks) or len(ipa.values) != len(self.double_blocks):
            raise ValueError(
                f"Flux: the IP-Adapter has keys for {len(ipa.keys)} double blocks, but this model has "
                f"{len(self.double_blocks)}; it was made for another model"
            )
        want = (p.num_heads, p.head_dim)
        for x in [*ipa.keys, *ipa.values]:
            if x.ndim != 4 or (x.shape[1], x.shape[3]) != want or img.shape[0] % x.shape[0]:
                raise ValueError(
                    f"Flux: each IP-Adapter key and value must be [b, {p.num_heads}, T, {p.head_dim}] with b "
                    f"dividing the batch {img.shape[0]}, got {shape_of(x)}"
                )
        return ipa

    def _check_control(self, control: ControlResiduals | None, img: Tensor) -> ControlResiduals | None:
        if control is None:
            return None
        if not isinstance(control, ControlResiduals):
            raise ValueError(f"Flux: controlnet must be a ControlResiduals, got {type(control).__name__}")
        if len(control.double) > len(self.double_blocks) or len(control.single) > len(self.single_blocks):
            raise ValueError(
                f"Flux: the ControlNet has {len(control.double)} double and {len(control.single)} single "
                f"blocks, more than this model's {len(self.double_blocks)} and {len(self.single_blocks)}; "
                "it was made for a larger model"
            )
        for r in [*control.double, *control.single]:
            if (
                not isinstance(r, Tensor)
                or r.ndim != 3
                or r.shape[1:] != img.shape[1:]
                or r.shape[0] < 1
                or img.shape[0] % r.shape[0]
            ):
                raise ValueError(
                    f"Flux: each ControlNet residual must be {list(img.shape)} (the embedded image tokens), "
                    f"got {shape_of(r)}; was the ControlNet made for a model of another width?"
                )
        return control

    def _check_inputs(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Validate shapes (errors name the argument) and bring ids / t / guidance to batched form."""
        p = self.params
        if img.ndim != 3 or img.shape[-1] != p.in_channels:
            raise ValueError(
                f"Flux: img must be [B, N, {p.in_channels}] (packed latent tokens), got {shape_of(img)}"
            )
        batch, n_img = img.shape[:2]
        if txt.ndim != 3 or txt.shape[0] != batch or txt.shape[-1] != p.context_in_dim:
            raise ValueError(f"Flux: txt must be [{batch}, L, {p.context_in_dim}], got {shape_of(txt)}")
        n_txt = txt.shape[1]
        img_ids = batched_ids("Flux", "img_ids", img_ids, batch, n_img)
        txt_ids = batched_ids("Flux", "txt_ids", txt_ids, batch, n_txt)
        if img_ids.shape[0] != txt_ids.shape[0]:  # one shared, one per-sample: broadcast the shared one
            img_ids = img_ids.expand(batch, -1, -1)
            txt_ids = txt_ids.expand(batch, -1, -1)
        if y.ndim != 2 or y.shape[0] != batch or y.shape[1] != p.vec_in_dim:
            raise ValueError(
                f"Flux: y must be [{batch}, {p.vec_in_dim}] (pooled text vector), got {shape_of(y)}"
            )
        timesteps = batched_scalar("Flux", "timesteps", timesteps, batch)
        if p.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "Flux: this model has guidance_embed=True (guidance-distilled, like FLUX.1-dev); "
                    "pass guidance=[B] tensor of guidance scales"
                )
            guidance = batched_scalar("Flux", "guidance", guidance, batch)
        return img_ids, txt_ids, timesteps, guidance
