"""XLabs' FLUX.1 IP-Adapter: a picture's CLIP image embedding as extra keys and values in the double blocks.

The convention is XLabs' x-flux (``IPDoubleStreamBlockProcessor``, ``ImageProjModel``) and diffusers'
(``FluxIPAdapterAttnProcessor``, ``ImageProjection``): CLIP's projected image embedding [B, image_dim] is
projected to ``num_tokens`` tokens in the text space and layer-normed; in every double block the image
stream's queries (QK-normed, before RoPE) attend to those tokens through the block's own key and value
projections, and the result times a scale is added to the image stream after the block's MLP, ungated. The
single blocks are untouched.

The module's key names are XLabs' (``ip_adapter_proj_model.*``, ``double_blocks.N.processor.*``), so their
``ip_adapter.safetensors`` loads key for key. The keys and values depend on neither the noise nor the time,
so `IPAdapter.attention` computes them once per sampler run (`IPAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["IPAdapter", "IPAttention", "IPBlockAttention", "ip_adapter_shapes"]


class ImageProjection(nn.Module):
    """CLIP's image embedding [B, image_dim] -> ``num_tokens`` layer-normed tokens [B, T, context_dim]."""

    def __init__(self, image_dim: int, context_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        tokens = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(tokens.reshape(embeds.shape[0], self.num_tokens, -1))


class BlockProjections(nn.Module):
    """One double block's key and value projections of the picture's tokens (XLabs' names)."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.ip_adapter_double_stream_k_proj = nn.Linear(context_dim, hidden_size)
        self.ip_adapter_double_stream_v_proj = nn.Linear(context_dim, hidden_size)


class _Processor(nn.Module):
    """Holds `BlockProjections` under the name ``processor``, as XLabs' keys have it."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.processor = BlockProjections(context_dim, hidden_size)


class IPAdapter(nn.Module):
    """The image projection and one key/value pair per double block of the transformer it was made for."""

    def __init__(
        self, image_dim: int, context_dim: int, hidden_size: int, num_tokens: int, depth: int
    ) -> None:
        super().__init__()
        self.ip_adapter_proj_model = ImageProjection(image_dim, context_dim, num_tokens)
        self.double_blocks = nn.ModuleList([_Processor(context_dim, hidden_size) for _ in range(depth)])

    @property
    def image_dim(self) -> int:
        return self.ip_adapter_proj_model.proj.in_features

    @property
    def context_dim(self) -> int:
        return self.ip_adapter_proj_model.norm.normalized_shape[0]

    @property
    def hidden_size(self) -> int:
        first = self.double_blocks[0].processor if self.depth else None
        return first.ip_adapter_double_stream_k_proj.out_features if first is not None else 0

    @property
    def num_tokens(self) -> int:
        return self.ip_adapter_proj_model.num_tokens

    @property
    def depth(self) -> int:
        return len(self.double_blocks)

    def tokens(self, embeds: Tensor) -> Tensor:
        """CLIP's image embeddings [B, image_dim] -> the picture's tokens [B, T, context_dim]."""
        return self.ip_adapter_proj_model(embeds)

    def attention(self, embeds: Tensor, scale: float, num_heads: int) -> IPAttention:
        """The per-block keys and values for pictures with CLIP embeddings [B, image_dim], for a transformer
        with `num_heads` heads; B may be 1 (every row of the batch sees the picture) or divide the batch."""
        tokens = self.tokens(embeds)
        b, t = tokens.shape[:2]
        keys, values = [], []
        for block in self.double_blocks:
            p = block.processor
            keys.append(p.ip_adapter_double_stream_k_proj(tokens).view(b, t, num_heads, -1).transpose(1, 2))
            values.append(p.ip_adapter_double_stream_v_proj(tokens).view(b, t, num_heads, -1).transpose(1, 2))
        return IPAttention(keys=keys, values=values, scale=float(scale))


@dataclass
class IPAttention:
    """One sampler run's picture keys and values ``[b, H, T, D]`` per double block, and their scale.

    b divides the image batch n: row j of the batch reads row ``j // (n / b)`` (so classifier-free
    guidance's halves, which are contiguous, can read a picture and a blank picture from b = 2)."""

    keys: list[Tensor]
    values: list[Tensor]
    scale: float

    def block(self, i: int) -> IPBlockAttention:
        """Double block i's part. An object of its own per block, not this one and an index: a compiled block
        (`Flux.compile`) then guards on tensor shapes only, not on a constant that differs block by block."""
        return IPBlockAttention(self.keys[i], self.values[i], self.scale)

    def rows(self, rows: Tensor, batch: int) -> IPAttention:
        """The same for the chosen `rows` of a `batch`-row batch (the first-block cache's partial passes)."""
        return IPAttention(
            keys=[_rows(k, batch)[rows] for k in self.keys],
            values=[_rows(v, batch)[rows] for v in self.values],
            scale=self.scale,
        )


@dataclass
class IPBlockAttention:
    """One double block's picture keys and values ``[b, H, T, D]`` and the scale (see `IPAttention`)."""

    key: Tensor
    value: Tensor
    scale: float

    def __call__(self, query: Tensor) -> Tensor:
        """What the block adds to the image stream: attention of its image queries ``[n, H, N, D]``
        (QK-normed, before RoPE) to the picture's tokens, heads merged, times the scale."""
        k, v = _rows(self.key, query.shape[0]), _rows(self.value, query.shape[0])
        out = F.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype))
        return out.transpose(1, 2).flatten(2) * self.scale


def _rows(x: Tensor, n: int) -> Tensor:
    """x [b, ...] for a batch of n rows, row j reading row j // (n / b)."""
    b = x.shape[0]
    if b == n:
        return x
    if n % b:
        raise ValueError(f"IPAttention: a picture batch of {b} does not divide the image batch of {n}")
    return x[:, None].expand(b, n // b, *x.shape[1:]).reshape(n, *x.shape[1:])


def ip_adapter_shapes(state_dict: dict[str, Tensor]) -> tuple[int, int, int, int, int] | None:
    """(image_dim, context_dim, hidden_size, num_tokens, depth) an IP-Adapter state dict with XLabs' key
    names was made for, or None when its keys or shapes are not such an adapter's."""
    proj_w = state_dict.get("ip_adapter_proj_model.proj.weight")
    norm_w = state_dict.get("ip_adapter_proj_model.norm.weight")
    if proj_w is None or norm_w is None or proj_w.ndim != 2 or norm_w.ndim != 1:
        return None
    context = int(norm_w.shape[0])
    if context < 1 or proj_w.shape[0] % context:
        return None
    image_dim, num_tokens = int(proj_w.shape[1]), int(proj_w.shape[0]) // context
    depth = 0
    while f"double_blocks.{depth}.processor.ip_adapter_double_stream_k_proj.weight" in state_dict:
        depth += 1
    if depth == 0:
        return None
    k_w = state_dict["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"]
    if k_w.ndim != 2 or k_w.shape[1] != context:
        return None
    hidden = int(k_w.shape[0])
    expected = _expected_shapes(image_dim, context, hidden, num_tokens, depth)
    if set(state_dict) != set(expected):
        return None
    if any(tuple(state_dict[k].shape) != shape for k, shape in expected.items()):
        return None
    return image_dim, context, hidden, num_tokens, depth


def _expected_shapes(
    image_dim: int, context: int, hidden: int, num_tokens: int, depth: int
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "ip_adapter_proj_model.proj.weight": (num_tokens * context, image_dim),
        "ip_adapter_proj_model.proj.bias": (num_tokens * context,),
        "ip_adapter_proj_model.norm.weight": (context,),
        "ip_adapter_proj_model.norm.bias": (context,),
    }
    for i in range(depth):
        for kv in ("k", "v"):
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            shapes[f"{name}.weight"] = (hidden, context)
            shapes[f"{name}.bias"] = (hidden,)
    return shapes
