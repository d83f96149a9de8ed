"""What a LoRA-like file does to one linear layer, independent of its key layout.

Two kinds of update:

- :class:`LoRAUpdate`: ``W += alpha / rank * B @ A``;
- :class:`FactoredUpdate`: LyCORIS' LoKr (``factor * kron(w1, w2)``, usually of full rank: as a LoRA it
  would be as large as the weight itself) or LoHa (a LoRA of rank r1 r2 exactly, but r1 r2 / (r1 + r2)
  times larger as one than its factors), kept as their factors.

Both give their dense ``delta()`` (float64, for merging into weights) and hold only finite numbers or say
not (:meth:`finite`). Either may be weight-decomposed (:class:`DoRAUpdate`), whose change depends on the
weight it is applied to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "PIECE_KINDS",
    "DoRAUpdate",
    "FactoredUpdate",
    "HadaPiece",
    "KronPiece",
    "LayerUpdate",
    "LoRAError",
    "LoRAUpdate",
    "Piece",
    "dora_delta",
    "dora_ratio",
]


class LoRAError(ValueError):
    """A LoRA that does not fit the model or cannot be read; the message names the offending key."""


@dataclass
class LoRAUpdate:
    """One layer's update: ``W += scale * alpha / rank * B @ A`` with A ``[rank, in]``, B ``[out, rank]``."""

    A: Tensor
    B: Tensor
    alpha: float
    source: str  # a file key it came from, for messages

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer it fits."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> Tensor:
        """The update at scale 1, ``[out, in]`` in float64."""
        return (self.alpha / self.rank) * (self.B.double() @ self.A.double())

    def finite(self) -> bool:
        factors = bool(torch.isfinite(self.A).all() and torch.isfinite(self.B).all())
        return factors and bool(torch.isfinite(torch.tensor(self.alpha)))


@dataclass
class KronPiece:
    """LoKr: ``factor * kron(w1, w2)`` on output rows ``offset`` .. ``offset + rows``, w2 given whole
    ``[c, d]`` or as ``w2_a [c, r] @ w2_b [r, d]``. w1 is ``[a, b]``: the piece has a*c rows, b*d inputs."""

    offset: int
    w1: Tensor
    w2: Tensor | None
    w2_a: Tensor | None
    w2_b: Tensor | None
    factor: float
    kind = "lokr"
    fields = ("w1", "w2", "w2_a", "w2_b")

    @property
    def rows(self) -> int:
        c = self.w2.shape[0] if self.w2 is not None else self.w2_a.shape[0]  # type: ignore[union-attr]
        return int(self.w1.shape[0] * c)

    @property
    def inputs(self) -> int:
        d = self.w2.shape[1] if self.w2 is not None else self.w2_b.shape[1]  # type: ignore[union-attr]
        return int(self.w1.shape[1] * d)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.w1, self.w2, self.w2_a, self.w2_b) if t is not None]

    def dense(self) -> Tensor:
        """``factor * kron(w1, w2)`` in float64."""
        w2 = self.w2.double() if self.w2 is not None else self.w2_a.double() @ self.w2_b.double()  # type: ignore[union-attr]
        return self.factor * torch.kron(self.w1.double(), w2)

    def rank_bound(self) -> int:
        """rank(kron(w1, w2)) = rank(w1) rank(w2), bounded by the factors' smaller sides."""
        r2 = min(self.w2.shape) if self.w2 is not None else self.w2_a.shape[1]  # type: ignore[union-attr]
        return int(min(self.w1.shape) * r2)

    def apply(self, x: Tensor) -> Tensor:
        """``x [N, in] -> [N, rows]`` without the product: with x's rows viewed as ``X [b, d]``, the output
        viewed as ``[a, c]`` is ``w1 X w2^T``."""
        xr = x.reshape(x.shape[0], self.w1.shape[1], -1)  # [N, b, d]
        # [N, b, c]: w2 applied to each of the b rows of X (through its rank-r factors when split)
        z = xr @ self.w2.T if self.w2 is not None else (xr @ self.w2_b.T) @ self.w2_a.T  # type: ignore[union-attr]
        return torch.matmul(self.w1, z).reshape(x.shape[0], -1) * self.factor


@dataclass
class HadaPiece:
    """LoHa: ``factor * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise) on output rows ``offset`` ..

    It is a LoRA of rank r1 r2 exactly (:meth:`as_lora`), but one that holds r1 r2 (out + in) numbers where
    the factors hold (r1 + r2) (out + in): 16 times more at rank 16, so runs keep the factors (:meth:`apply`).
    """

    offset: int
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    factor: float
    kind = "loha"
    fields = ("w1_a", "w1_b", "w2_a", "w2_b")

    @property
    def rows(self) -> int:
        return int(self.w1_a.shape[0])

    @property
    def inputs(self) -> int:
        return int(self.w1_b.shape[1])

    def tensors(self) -> list[Tensor]:
        return [self.w1_a, self.w1_b, self.w2_a, self.w2_b]

    def dense(self) -> Tensor:
        return (
            self.factor
            * (self.w1_a.double() @ self.w1_b.double())
            * (self.w2_a.double() @ self.w2_b.double())
        )

    def rank_bound(self) -> int:
        return int(self.w1_b.shape[0] * self.w2_b.shape[0])

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """(A [r1 r2, in], B [out, r1 r2]) with ``B @ A`` this piece (factor folded into B): entry (i, j) is
        ``sum_{p,q} w1_a[i,p] w2_a[i,q] w1_b[p,j] w2_b[q,j]``, so B and A are the row- and column-wise
        Khatri-Rao products of the factors."""
        r1, r2 = self.w1_b.shape[0], self.w2_b.shape[0]
        b = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).reshape(self.rows, r1 * r2) * self.factor
        a = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).reshape(r1 * r2, self.inputs)
        return a, b

    def apply(self, x: Tensor) -> Tensor:
        """``x [N, in] -> [N, rows]`` as the rank-r1 r2 LoRA, one of w1's r1 ranks at a time (never more
        than an input- or output-sized intermediate per token)."""
        out = x.new_zeros(x.shape[0], self.rows, dtype=torch.float32)  # r1 terms: summed in float32
        for p in range(self.w1_b.shape[0]):
            h = (x * self.w1_b[p]) @ self.w2_b.T  # [N, r2]: sum_j x_j w1_b[p,j] w2_b[q,j]
            out += ((h @ self.w2_a.T) * self.w1_a[:, p]).float()  # sum_q w2_a[i,q] h_q, times w1_a[i,p]
        return (out * self.factor).to(x.dtype)


Piece = KronPiece | HadaPiece
PIECE_KINDS: dict[str, type[KronPiece] | type[HadaPiece]] = {"lokr": KronPiece, "loha": HadaPiece}


@dataclass
class FactoredUpdate:
    """One layer's LoKr or LoHa update, kept as its factors: pieces on row ranges of the output (one piece
    for a layer named whole; one per part for q/k/v trained apart and fused here), then the output rows
    reordered by ``perm`` when the file's layer orders them differently (diffusers' final layer: (scale,
    shift) against FLUX's (shift, scale))."""

    pieces: list[Piece]
    out_features: int
    source: str
    perm: Tensor | None = field(default=None)

    @property
    def kind(self) -> str:
        return self.pieces[0].kind

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.pieces[0].inputs

    @property
    def rank(self) -> int:
        """An upper bound of the update's rank (what listings show as a LoKr's or LoHa's rank)."""
        out, inputs = self.shape
        return min(out, inputs, sum(p.rank_bound() for p in self.pieces))

    def delta(self) -> Tensor:
        out, inputs = self.shape
        total = torch.zeros(out, inputs, dtype=torch.float64, device=self.pieces[0].tensors()[0].device)
        for p in self.pieces:
            total[p.offset : p.offset + p.rows] = p.dense()
        return total if self.perm is None else total[self.perm.to(total.device)]

    def as_lora(self) -> LoRAUpdate | None:
        """The same update as a LoRA, exactly (LoHa: rank r1 r2 per piece); None for LoKr, whose product is
        usually of full rank."""
        if not all(isinstance(p, HadaPiece) for p in self.pieces):
            return None
        factors = [p.as_lora() for p in self.pieces if isinstance(p, HadaPiece)]
        a = torch.cat([f[0] for f in factors])
        b = a.new_zeros(self.out_features, a.shape[0])
        col = 0
        for p, (pa, pb) in zip(self.pieces, factors, strict=True):
            b[p.offset : p.offset + p.rows, col : col + pa.shape[0]] = pb
            col += pa.shape[0]
        if self.perm is not None:
            b = b[self.perm]
        return LoRAUpdate(a, b, float(a.shape[0]), self.source)

    def finite(self) -> bool:
        tensors = [t for p in self.pieces for t in p.tensors()]
        return all(bool(torch.isfinite(t).all()) for t in tensors) and all(
            bool(torch.isfinite(torch.tensor(p.factor))) for p in self.pieces
        )


@dataclass
class DoRAUpdate:
    """A weight-decomposed update (DoRA: LyCORIS' ``dora_scale``, PEFT's ``lora_magnitude_vector``): the
    layer becomes ``W + s * (m / |W + dW| * (W + dW) - W)`` at strength s, ``dW`` the inner LoRA/LoHa/LoKr
    update and the norm taken per output row (``on_out``, magnitude ``[out, 1]``) or per input column
    (``[1, in]``). Rows whose magnitude is NaN take no decomposition (parts of a fused layer the file left
    without one): there the update is plain ``dW``."""

    inner: LoRAUpdate | FactoredUpdate
    magnitude: Tensor
    on_out: bool

    @property
    def source(self) -> str:
        return self.inner.source

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def rank(self) -> int:
        return self.inner.rank

    def merged_delta(self, weight: Tensor) -> Tensor:
        """The update at strength 1 on base weight ``weight``: ``ratio * (W + dW) - W`` (float64)."""
        w, delta = weight.double(), self.inner.delta().to(weight.device)
        return dora_delta(dora_ratio(self.magnitude, w, delta, self.on_out), w, delta, self.on_out)

    def finite(self) -> bool:
        # NaN rows are the fused parts without DoRA (file values were checked finite when read)
        return self.inner.finite() and not bool(torch.isinf(self.magnitude).any())


LayerUpdate = LoRAUpdate | FactoredUpdate | DoRAUpdate


def dora_delta(ratio: Tensor, weight: Tensor, delta: Tensor, on_out: bool) -> Tensor:
    """DoRA's change of the weight at strength 1, ``ratio * (W + dW) - W`` (float64), the ratio per output row
    or per input column."""
    w = weight.double()
    r = ratio.double()
    return (r[:, None] if on_out else r[None, :]) * (w + delta.double()) - w


def dora_ratio(magnitude: Tensor, weight: Tensor, delta: Tensor, on_out: bool) -> Tensor:
    """DoRA's ``m / (|W + dW| + eps)`` as a float64 vector (per output row, or per input column), eps being
    float32's as LyCORIS adds it; NaN magnitudes (rows without DoRA) give 1."""
    merged = weight.to(torch.float64, copy=True)  # a copy even of a float64 weight: it is added to in place
    merged += delta.to(merged.device)  # in place: a FLUX.1 layer in float64 is half a gigabyte
    norm = merged.norm(dim=1) if on_out else merged.norm(dim=0)
    del merged
    ratio = magnitude.double().to(weight.device).reshape(-1) / (norm + torch.finfo(torch.float32).eps)
    return torch.where(torch.isnan(ratio), torch.ones_like(ratio), ratio)
