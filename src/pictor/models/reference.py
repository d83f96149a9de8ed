"""Reference (image-prompt) conditioning: a picture says what to draw, the prompt may add the rest.

In the manner of FLUX.1 Redux: features of the reference image become extra tokens after the prompt's
token states, which the frozen transformer reads through its text stream; only the small encoder that
makes them is trained. The features here are the model's own autoencoder latents (no separate image
encoder ships offline): the packed 2x2 latent patches of the reference, mixed by a few pre-norm
self-attention layers with fixed 2-D sin-cos positions (one patch alone cannot say "circle"), then
projected to the text encoder's width. In the transformer the tokens get position id 0, like text, so
they tell it *what* is in the reference, not where: the new image may arrange it anew.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ReferenceParams:
    latent_dim: int  # channels of a packed latent token (4 x the autoencoder's z_channels)
    context_dim: int  # the text encoder's token width, which the transformer's txt_in reads
    width: int = 128
    depth: int = 2
    num_heads: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceParams:
        try:
            return cls(**{k: int(d[k]) for k in ("latent_dim", "context_dim", "width", "depth", "num_heads")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                "reference adapter params need integer latent_dim, context_dim, width, depth and num_heads, "
                f"got {d}"
            ) from exc


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos positions [grid_h * grid_w, dim] (MAE's): half the channels for y, half for x, so
    any grid size works without learned tables."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, device=device, dtype=torch.float32),
        torch.arange(grid_w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angles = pos[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=-1)
    return F.pad(out, (0, dim - out.shape[-1]))


class _Block(nn.Module):
    """Pre-norm self-attention and MLP over the reference tokens."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ReferenceAdapter(nn.Module):
    """Packed reference latents [B, N, latent_dim] on a (grid_h, grid_w) token grid -> context tokens
    [B, N, context_dim] to append to the prompt's token states."""

    def __init__(self, params: ReferenceParams) -> None:
        super().__init__()
        if params.width % params.num_heads or params.width % 4:
            raise ValueError(f"reference adapter width {params.width} must divide by num_heads and by 4")
        self.params = params
        self.img_in = nn.Linear(params.latent_dim, params.width)
        self.blocks = nn.ModuleList(_Block(params.width, params.num_heads) for _ in range(params.depth))
        self.norm = nn.LayerNorm(params.width)
        self.out = nn.Linear(params.width, params.context_dim)

    def init_weights(self) -> ReferenceAdapter:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, ref: Tensor, grid_h: int, grid_w: int) -> Tensor:
        if ref.shape[1] != grid_h * grid_w:
            raise ValueError(f"{ref.shape[1]} reference tokens do not fill a {grid_h}x{grid_w} grid")
        x = self.img_in(ref) + sincos_2d(grid_h, grid_w, self.params.width, ref.device).to(ref.dtype)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def append_reference(txt: Tensor, txt_ids: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    """The prompt's token states followed by the reference's tokens, all at position id 0 (as text)."""
    b = txt.shape[0]
    ctx = context.to(txt.dtype).expand(b, -1, -1) if context.shape[0] == 1 else context.to(txt.dtype)
    ids = torch.zeros(b, ctx.shape[1], txt_ids.shape[-1], device=txt_ids.device, dtype=txt_ids.dtype)
    return torch.cat([txt, ctx], dim=1), torch.cat([txt_ids, ids], dim=1)
