"""FLUX.1 Redux [dev]'s image embedder: SigLIP's patch features projected into the transformer's text space.

Two linear layers with a SiLU between them (BFL's flux ``ReduxImageEncoder``, diffusers' of the same name):
[B, N, siglip_dim] -> [B, N, 3 * context_dim] -> [B, N, context_dim]. Its output tokens are appended to the
prompt's T5 tokens (`pictor.redux_images`), so the image speaks to the transformer as text does.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class ReduxEncoder(nn.Module):
    """redux_down(silu(redux_up(x))), with BFL's key names (redux_up, redux_down): files load as they are."""

    def __init__(self, siglip_dim: int, context_dim: int) -> None:
        super().__init__()
        self.redux_up = nn.Linear(siglip_dim, 3 * context_dim)
        self.redux_down = nn.Linear(3 * context_dim, context_dim)

    @property
    def siglip_dim(self) -> int:
        return self.redux_up.in_features

    @property
    def context_dim(self) -> int:
        return self.redux_down.out_features

    def forward(self, features: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(features)))


def redux_shapes(state_dict: dict[str, Tensor]) -> tuple[int, int] | None:
    """(siglip_dim, context_dim) a Redux state dict was made for, or None when its keys or shapes are not
    a Redux embedder's (two linear layers, the first 3 x context_dim wide)."""
    want = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    if set(state_dict) != want:
        return None
    up, down = state_dict["redux_up.weight"], state_dict["redux_down.weight"]
    if up.ndim != 2 or down.ndim != 2 or down.shape[1] != up.shape[0] or up.shape[0] != 3 * down.shape[0]:
        return None
    if state_dict["redux_up.bias"].shape != (up.shape[0],) or state_dict["redux_down.bias"].shape != (
        down.shape[0],
    ):
        return None
    return int(up.shape[1]), int(down.shape[0])
