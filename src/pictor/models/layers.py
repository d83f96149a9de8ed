"""Building blocks of the FLUX.1 transformer.

Module and parameter names follow black-forest-labs/flux ``src/flux/modules/layers.py`` so that the official
FLUX.1 weights load key for key. The arithmetic is the same; the layout differs where it saves work:

- Rotary embeddings are computed once per forward as ``(cos, sin)`` pairs, ``pe [B, 1, L, D/2, 2]``.
- q and k are QK-normed straight from head-major views of the fused qkv output, so the norm writes them in
  the ``[B, H, L, D]`` layout SDPA takes and FLUX's separate rearrange copy disappears.
- In eager mode RoPE is one complex multiply (a single vectorised kernel) instead of FLUX's
  reshape/multiply/add chain; under ``torch.compile`` the real-arithmetic form is used, which inductor fuses.
- Modulate and gate+residual use ``addcmul``: one pass over the activations instead of two.
- GELU(tanh) is evaluated as ``x * sigmoid(2u)`` on CPU, where torch's tanh kernel is the slow part.
- In inference (no autograd), the single-stream block writes the attention output into the spent ``v``
  slot of its ``linear1`` output and applies GELU in place, so ``linear2`` reads ``[attn | gelu(mlp)]`` as a
  strided view instead of FLUX's ``torch.cat`` copy of a ``(1 + mlp_ratio) * hidden``-wide tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pictor.models.block_bias import BlendedBias

__all__ = [
    "DoubleStreamBlock",
    "EmbedND",
    "LastLayer",
    "MLPEmbedder",
    "Modulation",
    "ModulationOut",
    "QKNorm",
    "RMSNorm",
    "SelfAttention",
    "SingleStreamBlock",
    "apply_rope",
    "attention",
    "gelu_tanh",
    "merge_heads",
    "mlp",
    "modulate",
    "rope",
    "split_qkv",
    "timestep_embedding",
]


# --------------------------------------------------------------------------------------------------- RoPE


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotary angles for one position axis: ``pos [B, L]`` -> ``[B, L, dim/2, 2]`` holding (cos, sin).

    float64 as in FLUX: positions up to a few thousand times frequencies near 1 lose digits in float32.
    """
    if dim % 2:
        raise ValueError(f"rope: axis dim must be even, got {dim}")
    # The float64 result is cast to float32 below; MPS has no float64, so build it on the CPU there.
    work_device = torch.device("cpu") if pos.device.type == "mps" else pos.device
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=work_device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    angles = pos.to(work_device, torch.float64).unsqueeze(-1) * omega  # [B, L, dim/2]
    out = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return out.to(device=pos.device, dtype=torch.float32)


class EmbedND(nn.Module):
    """Multi-axis RoPE: each id axis gets its own slice of the head dim (FLUX: index, row, column)."""

    def __init__(self, dim: int, theta: float, axes_dim: list[int]) -> None:
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(f"EmbedND: sum(axes_dim)={sum(axes_dim)} must equal the head dim {dim}")
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [B, L, n_axes]`` -> ``pe [B, 1, L, dim/2, 2]`` (cos, sin); the 1 broadcasts over heads."""
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"EmbedND: ids have {ids.shape[-1]} axes, expected {len(self.axes_dim)}")
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-2)
        return pe.unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of ``x [B, H, L, D]`` by the angles in ``pe``.

    Computed in float32 (as FLUX does) and returned in ``x``'s dtype.
    """
    xf = x.float()
    if torch.compiler.is_compiling():
        # Plain real arithmetic: inductor fuses it into one kernel (it handles complex tensors poorly).
        x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = pe.unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
        return out.type_as(x)
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()
    # (x0 + i x1) * (cos + i sin) is exactly the pairwise rotation, done by one vectorised kernel.
    rotated = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * torch.view_as_complex(pe)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def attention(
    q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask: Tensor | BlendedBias | None = None
) -> Tensor:
    """RoPE + SDPA on head-major tensors: q, k, v ``[B, H, L, D]`` -> ``[B, H, L, D]`` (heads not merged).

    mask: None (every token sees every token, FLUX.1's attention), or a float bias ``[B, 1, L, L]`` in q's
    dtype added to the attention logits (-inf: not seen), as regional attention (`pictor.regional_attention`)
    gives; `Flux` casts it once per forward, not once per block. A `pictor.models.block_bias.BlendedBias`
    (anything with ``attend(q, k, v)``): its blend of a masked and an unmasked attention."""
    if mask is None or isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=mask)
    return mask.attend(apply_rope(q, pe), apply_rope(k, pe), v)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, L, D]`` -> contiguous ``[B, L, H*D]`` (the one copy attention output needs anyway)."""
    return x.transpose(1, 2).flatten(2)


# --------------------------------------------------------------------------------------------- embedders


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` (cos half first, as FLUX).

    ``t`` lives in [0, 1]; the ``time_factor`` scaling happens here and nowhere else, so the sinusoid
    frequencies see the 0..1000 range they were designed for.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


# ------------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """RMS norm with a learned ``scale`` (FLUX's parameter name), eps 1e-6.

    ``F.rms_norm`` accumulates the statistics in float32 for low-precision inputs, as FLUX does by hand
    (FLUX also rounds once more, before the scale; that differs by at most one bf16 ulp).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the projections of one stream; the joint attention itself runs in DoubleStreamBlock."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, L, dim]`` -> normed q, k (contiguous) and v (a strided view), each ``[B, H, L, D]``."""
        return split_qkv(self.qkv(x), self.num_heads, self.norm)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(attention(q, k, v, pe)))


def split_qkv(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, L, 3*H*D]`` -> q, k, v ``[B, H, L, D]``; q and k QK-normed.

    The head-major views are taken before the norm, so the norm writes q and k straight into the layout
    SDPA wants (one pass each) and FLUX's rearrange copy disappears.
    """
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    q, k = norm(q, k, v)
    return q, k, v


# ------------------------------------------------------------------------------------------- modulation


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, dim]
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN: ``vec [B, dim]`` -> 3 (single) or 6 (double) per-channel vectors, each ``[B, 1, dim]``."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def modulate(x_normed: Tensor, mod: ModulationOut) -> Tensor:
    """``(1 + scale) * x + shift`` in one pass over the activations."""
    return torch.addcmul(mod.shift, x_normed, 1 + mod.scale)


# GELU(tanh)(x) = x * 0.5 * (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3).
_GELU_C1 = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


def gelu_tanh(x: Tensor, inplace: bool = False) -> Tensor:
    """FLUX's tanh-approximate GELU, computed as ``x * sigmoid(2u)`` where that is cheaper.

    The two forms are the same function; on CPU, torch's tanh kernel costs about 4x its exp-based sigmoid, so
    the sigmoid form (a few in-place passes in eager inference, one fused kernel under ``torch.compile``) is
    ~1.6x faster there. Elsewhere (CUDA, low precision, autograd) the stock kernel is used. With ``inplace``
    the result is written into ``x`` (any strides), which is only valid when autograd does not need ``x``.
    """
    on_cpu = x.device.type == "cpu"
    if on_cpu and torch.compiler.is_compiling():
        out = x * torch.sigmoid(x * (_GELU_C1 + _GELU_C3 * x * x))
        return x.copy_(out) if inplace else out
    if not on_cpu or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else F.gelu(x, approximate="tanh")
    s = torch.addcmul(x.new_tensor(_GELU_C1), x, x, value=_GELU_C3)  # 2u / x, contiguous scratch
    s.mul_(x).sigmoid_()
    return x.mul_(s) if inplace else s.mul_(x)


def mlp(seq: nn.Sequential, x: Tensor) -> Tensor:
    """FLUX's ``Sequential(Linear, GELU(tanh), Linear)`` with :func:`gelu_tanh` in the middle.

    The Sequential is kept for its state-dict keys (``img_mlp.0`` / ``img_mlp.2``); the linears are still
    called as modules so wrappers such as LoRA keep working.
    """
    return seq[2](gelu_tanh(seq[0](x), inplace=not torch.is_grad_enabled()))


# ----------------------------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and text keep their own weights and meet only in one joint attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False) -> None:
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
        )

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        ip: Callable[[Tensor], Tensor] | None = None,
        mask: Tensor | BlendedBias | None = None,
    ) -> tuple[Tensor, Tensor]:
        """img ``[B, N, dim]``, txt ``[B, L, dim]``, vec ``[B, dim]``, pe for the ``L + N`` joint tokens;
        mask: an attention bias over them (`attention`), None for FLUX.1's.

        ip: an IP-Adapter's attention for this block (`pictor.models.ip_adapter.IPAttention`): given the
        image queries (QK-normed, before RoPE) it returns ``[B, N, dim]``, added after the MLP, ungated."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_mod1))

        # Joint sequence is [txt, img] (the order the ids, and hence pe, were built in).
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, mask)  # [B, H, L + N, D]
        n_txt = txt.shape[1]
        txt_attn, img_attn = merge_heads(attn[:, :, :n_txt]), merge_heads(attn[:, :, n_txt:])

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, mlp(self.img_mlp, modulate(self.img_norm2(img), img_mod2)))
        if ip is not None:
            img = img + ip(img_q)
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, mlp(self.txt_mlp, modulate(self.txt_norm2(txt), txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """DiT block with parallel attention and MLP (one fused input projection ``linear1``).

    ``linear1`` -> ``[q | k | v | mlp_in]``; ``linear2`` <- ``[attn_out | gelu(mlp_in)]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | BlendedBias | None = None) -> Tensor:
        """x ``[B, L, dim]`` (text and image tokens joined) -> same shape; mask: an attention bias
        (`attention`), None for FLUX.1's."""
        mod, _ = self.modulation(vec)
        h = self.hidden_size
        fused = self.linear1(modulate(self.pre_norm(x), mod))  # [B, L, 3h + mlp]
        q, k, v = split_qkv(fused[..., : 3 * h], self.num_heads, self.norm)
        attn = attention(q, k, v, pe, mask)  # [B, H, L, D]

        if torch.is_grad_enabled() or torch.compiler.is_compiling() or fused.stride(-1) != 1:
            # Autograd needs v and the GELU input intact (and inductor fuses the cat on its own).
            out = self.linear2(torch.cat((merge_heads(attn), gelu_tanh(fused[..., 3 * h :])), dim=2))
        else:
            # v is spent: put attn in its slot and GELU the MLP part in place, so columns [2h:] already are
            # [attn | gelu(mlp)] and linear2 reads them as a strided view (no (1 + mlp_ratio)h-wide cat).
            fused[..., 2 * h : 3 * h].unflatten(-1, (self.num_heads, -1)).copy_(attn.transpose(1, 2))
            gelu_tanh(fused[..., 3 * h :], inplace=True)
            out = self.linear2(fused[..., 2 * h :])
        return torch.addcmul(x, mod.gate, out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = torch.addcmul(shift[:, None, :], self.norm_final(x), 1 + scale[:, None, :])
        return self.linear(x)
