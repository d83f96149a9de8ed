"""Trainable LyCORIS adapters: LoKr, LoHa, and DoRA on any of them or on a plain LoRA, for
:class:`pictor.models.lora_layers.LoRALinear`, with the shapes, initialisation and scales LyCORIS gives them.

Each adapter's parameters are named as LyCORIS (and kohya's sd-scripts with ``--network_module
lycoris.kohya``) saves them (``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a/_b``, ``hada_w1_a`` ...,
``lora_down.weight`` / ``lora_up.weight``, ``dora_scale``, and ``alpha`` as a buffer), and
:func:`add_lycoris` returns them in a flat tree whose children are kohya's module names
(``lora_unet_double_blocks_0_img_attn_qkv``), so the tree's state dict IS the file: pictor's own loader
(:mod:`pictor.models.lora_formats`) and LyCORIS' ``create_lycoris_from_weights`` read it back.

- LoKr (``algo=lokr``): ``dW = alpha / r * kron(w1, w2)``, each dimension split by LyCORIS' ``factorization``;
  w2 is split into rank-r factors when r < max(w2's sides) / 2, else whole, and with both factors whole the
  scale is 1 whatever alpha says (LyCORIS' rule, which it saves as alpha = r). w1 is kaiming-uniform, w2 (or
  w2_b) zero.
- LoHa (``algo=loha``): ``dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``; w1_a ~ N(0, 0.1), w1_b and w2_b
  ~ N(0, 1), w2_a zero.
- DoRA (LyCORIS' ``dora_wd``, per output row as its default ``wd_on_out``): ``W' = m / (|W + dW| + eps) *
  (W + dW)`` with m (``dora_scale``) starting at the base rows' norms. The norm is not detached (as LyCORIS).

Every adapter starts as a no-op: w2 / w2_b / w2_a / lora_up are zero. With DoRA the start is ``W * |W| / (|W|
+ eps)``, LyCORIS' own: within float32's eps of the base, not bit-identical to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pictor.models.lora import LoRAError, select_targets, wrap_linear
from pictor.models.weight_storage import dense

__all__ = ["ALGOS", "KOHYA_PREFIX", "LycorisAdapter", "add_lycoris", "factorization", "kohya_name"]

ALGOS = ("lora", "lokr", "loha")
KOHYA_PREFIX = "lora_unet_"  # kohya's sd-scripts (and LyCORIS under it) name the transformer's modules so
EPS = torch.finfo(torch.float32).eps  # LyCORIS adds float32's eps to DoRA's norm; so does pictor's loader


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of ``dimension`` into (m, n), m <= n, m * n = dimension: m = ``factor`` when it divides
    the dimension, else the most balanced split with m <= factor (-1: no limit, as balanced as possible)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kohya_name(path: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return KOHYA_PREFIX + path.replace(".", "_")


class _Factor(nn.Module):
    """A matrix as ``.weight`` (``lora_down.weight``); not an ``nn.Linear``, so target selection skips it."""

    def __init__(self, rows: int, cols: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))


class _LayerRef:
    """The layer an adapter belongs to, unregistered; a deep copy (the EMA's) shares it rather than copy the
    frozen base weight it holds."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __deepcopy__(self, memo: dict[int, Any]) -> _LayerRef:
        return self


def _param(rows: int, cols: int, device: Any, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))


class LycorisAdapter(nn.Module):
    """One layer's trainable LoKr, LoHa or LoRA (the last only with DoRA), optionally weight-decomposed."""

    def __init__(
        self,
        layer: nn.Module,
        algo: str,
        rank: int,
        alpha: float | None,
        dora: bool = False,
        factor: int = -1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if algo not in ALGOS:
            raise LoRAError(f"unknown LyCORIS algorithm {algo!r}; choose one of {ALGOS}")
        if rank < 1:
            raise LoRAError(f"rank must be >= 1, got {rank}")
        self.algo, self.rank, self.scale, self.lokr_factor = algo, int(rank), 1.0, int(factor)
        self._ref = _LayerRef(layer)
        out_f, in_f = int(layer.out_features), int(layer.in_features)  # type: ignore[arg-type]
        device = layer.weight.device
        alpha = float(alpha) if alpha else float(rank)
        self.network_alpha = alpha  # the run's alpha (kohya's --network_alpha), even where a layer's differs
        self.whole = False  # LoKr with both factors whole: scale 1
        if algo == "lokr":
            (a, c), (b, d) = factorization(out_f, factor), factorization(in_f, factor)
            self.lokr_w1 = _param(a, b, device, dtype)
            if rank < max(c, d) / 2:
                self.lokr_w2_a = _param(c, rank, device, dtype)
                self.lokr_w2_b = _param(rank, d, device, dtype)
            else:
                self.whole = True
                self.lokr_w2 = _param(c, d, device, dtype)
                alpha = float(rank)  # what LyCORIS saves for this mode
        elif algo == "loha":
            self.hada_w1_a = _param(out_f, rank, device, dtype)
            self.hada_w1_b = _param(rank, in_f, device, dtype)
            self.hada_w2_a = _param(out_f, rank, device, dtype)
            self.hada_w2_b = _param(rank, in_f, device, dtype)
        else:
            self.lora_down = _Factor(rank, in_f, device, dtype)
            self.lora_up = _Factor(out_f, rank, device, dtype)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        magnitude = None
        if dora:  # the base rows' norms (float64, kept float32 as LyCORIS keeps it): r = 1 at the start
            norm = dense(layer.weight).detach().to(torch.float64).norm(dim=1, keepdim=True)  # [out, 1]
            magnitude = nn.Parameter(norm.to(device=device, dtype=torch.float32))
        self.register_parameter("dora_scale", magnitude)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LyCORIS' init (draws from torch's global RNG): the update starts at exactly zero."""
        if self.algo == "lokr":
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
            if self.whole:
                nn.init.zeros_(self.lokr_w2)
            else:
                nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
                nn.init.zeros_(self.lokr_w2_b)
        elif self.algo == "loha":
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)
        else:
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)

    @property
    def factor(self) -> float:
        """alpha / rank, or 1 for a LoKr of two whole factors."""
        return 1.0 if self.whole else float(self.alpha) / self.rank

    @property
    def decomposed(self) -> bool:  # LoRALinear: a DoRA is merged with all of a layer's adapters or none
        return self.dora_scale is not None

    def delta(self) -> Tensor:
        """The update at strength 1 (before any DoRA), ``[out, in]``, differentiable, in the adapter dtype."""
        if self.algo == "lokr":
            w2 = self.lokr_w2 if self.whole else self.lokr_w2_a @ self.lokr_w2_b
            return torch.kron(self.lokr_w1, w2) * self.factor
        if self.algo == "loha":
            return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.factor
        return (self.lora_up.weight @ self.lora_down.weight) * self.factor

    def _update(self, x: Tensor) -> Tensor:
        """``x dW^T`` for x ``[N, in]`` without forming dW where the factors allow."""
        if self.algo == "lokr":  # kron(w1, w2) x = w1 X w2^T with x viewed as X [b, d]
            xr = x.reshape(x.shape[0], self.lokr_w1.shape[1], -1)
            z = xr @ self.lokr_w2.T if self.whole else (xr @ self.lokr_w2_b.T) @ self.lokr_w2_a.T
            return torch.matmul(self.lokr_w1, z).reshape(x.shape[0], -1) * self.factor
        if self.algo == "loha":
            # The dense update, as LyCORIS trains it: one more product of the layer's size, and autograd
            # through two small products (the factored form of HadaPiece.apply loops over the rank instead).
            return F.linear(x, self.delta())
        return F.linear(F.linear(x, self.lora_down.weight) * self.factor, self.lora_up.weight)

    def _base_weight(self) -> Tensor:
        layer = self._ref.layer
        original = getattr(layer, "_original", None)  # the weight before any merge
        return (original if original is not None else dense(layer.weight)).detach()  # GGML blocks widened

    def _decomposed_delta(self) -> Tensor:
        """``W' - W`` with ``W' = m / (|W + dW| + eps) * (W + dW)`` per output row (float32)."""
        assert self.dora_scale is not None
        w = self._base_weight().to(device=self.dora_scale.device, dtype=torch.float32)
        merged = w + self.delta().float()
        norm = merged.norm(dim=1, keepdim=True) + EPS
        return merged * (self.dora_scale / norm) - w

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if self.dora_scale is None:
            out = self._update(flat.to(self._dtype()))
        else:
            out = F.linear(flat.float(), self._decomposed_delta())
        return (out * self.scale).reshape(*lead, -1).to(x.dtype)

    def _dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters())

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The update to the base weight at this strength, float64 (LoRALinear's merge)."""
        delta = self._decomposed_delta() if self.dora_scale is not None else self.delta()
        return self.scale * delta.double()


def add_lycoris(
    model: nn.Module,
    name: str,
    targets: str,
    algo: str,
    rank: int,
    alpha: float | None,
    dora: bool = False,
    factor: int = -1,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Add a trainable LyCORIS adapter ``name`` to the targeted linears; returns the flat tree of the adapters
    under kohya's module names, whose state dict is the LyCORIS file (``alpha`` buffers included)."""
    if algo == "lora" and not dora:
        raise LoRAError(
            "a plain LoRA is pictor.models.lora.add_lora's; add_lycoris trains LoKr, LoHa or DoRA"
        )
    tree = nn.Module()
    for path in select_targets(model, targets):
        layer = wrap_linear(model, path)
        if name in layer.adapters:
            raise LoRAError(f"'{path}' already has an adapter named '{name}'")
        adapter = LycorisAdapter(layer, algo, rank, alpha, dora, factor, dtype)
        layer.adapters[name] = adapter
        tree.add_module(kohya_name(path), adapter)
    return tree
