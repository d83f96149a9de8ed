"""LyCORIS' LoHa and LoKr factors -> layer updates, with the scales LyCORIS trains them with (and ComfyUI,
Forge and A1111 apply them with).

- LoHa (``hada_w1_a/_b``, ``hada_w2_a/_b``): ``dW = alpha / r1 * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise
  product), a LoRA of rank r1 * r2 exactly (:meth:`~pictor.models.lora_updates.HadaPiece.as_lora`).
- LoKr (``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b``): ``dW = factor * kron(w1, w2)``;
  factor = alpha / r, r the inner size of the decomposed factor (w2's if both are), and 1 when neither is
  decomposed (LyCORIS' "full matrix" mode trains them at scale 1 whatever alpha says).

An alpha of 0 or none means alpha = r, as LyCORIS saves it. Tucker (convolution) factors do not apply to
FLUX's linear layers and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from pictor.models.lora_updates import HadaPiece, KronPiece, LoRAError

__all__ = ["LOHA_ROLES", "LOKR_ROLES", "loha_piece", "lokr_piece"]

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

Entries = Mapping[str, tuple[str, Tensor]]  # role -> (file key, tensor)


def _matrix(entries: Entries, role: str) -> Tensor:
    key, t = entries[role]
    if t.ndim != 2:
        raise LoRAError(
            f"LoRA key '{key}' is {t.ndim}-D {tuple(t.shape)}; FLUX's layers are linear, so a LyCORIS factor "
            "must be a matrix (convolution LyCORIS files are for other models)"
        )
    return t.float()


def _product(entries: Entries, a_role: str, b_role: str) -> tuple[Tensor, Tensor]:
    a, b = _matrix(entries, a_role), _matrix(entries, b_role)
    if a.shape[1] != b.shape[0]:
        raise LoRAError(
            f"LoRA keys '{entries[a_role][0]}' {tuple(a.shape)} and '{entries[b_role][0]}' "
            f"{tuple(b.shape)} do not multiply (inner sizes differ); the file is broken"
        )
    return a, b


def _alpha(alpha: float | None, rank: int) -> float:
    return float(alpha) if alpha else float(rank)


def loha_piece(entries: Entries, alpha: float | None) -> HadaPiece:
    """A LoHa module as one piece, its factors as they are."""
    missing = [r for r in LOHA_ROLES if r not in entries]
    if missing:
        key = next(iter(entries.values()))[0]
        raise LoRAError(f"LoRA key '{key}': the LoHa module has no {', '.join(missing)}; the file is broken")
    w1_a, w1_b = _product(entries, "hada_w1_a", "hada_w1_b")
    w2_a, w2_b = _product(entries, "hada_w2_a", "hada_w2_b")
    if w1_a.shape[0] != w2_a.shape[0] or w1_b.shape[1] != w2_b.shape[1]:
        raise LoRAError(
            f"LoRA key '{entries['hada_w1_a'][0]}': the LoHa's two products are "
            f"[{w1_a.shape[0]} x {w1_b.shape[1]}] and [{w2_a.shape[0]} x {w2_b.shape[1]}]; they must match"
        )
    r1 = w1_b.shape[0]
    return HadaPiece(0, w1_a, w1_b, w2_a, w2_b, _alpha(alpha, r1) / r1)


def lokr_piece(entries: Entries, alpha: float | None, offset: int = 0) -> KronPiece:
    """A LoKr module as one Kronecker piece (w1 multiplied out when decomposed: it is the small factor)."""
    key = next(iter(entries.values()))[0]
    rank: int | None = None
    if "lokr_w1" in entries:
        w1 = _matrix(entries, "lokr_w1")
    elif "lokr_w1_a" in entries and "lokr_w1_b" in entries:
        w1_a, w1_b = _product(entries, "lokr_w1_a", "lokr_w1_b")
        w1, rank = w1_a @ w1_b, w1_b.shape[0]
    else:
        raise LoRAError(f"LoRA key '{key}': the LoKr module has no lokr_w1 (nor lokr_w1_a and lokr_w1_b)")
    w2 = w2_a = w2_b = None
    if "lokr_w2" in entries:
        w2 = _matrix(entries, "lokr_w2")
    elif "lokr_w2_a" in entries and "lokr_w2_b" in entries:
        w2_a, w2_b = _product(entries, "lokr_w2_a", "lokr_w2_b")
        rank = w2_b.shape[0]
    else:
        raise LoRAError(f"LoRA key '{key}': the LoKr module has no lokr_w2 (nor lokr_w2_a and lokr_w2_b)")
    factor = 1.0 if rank is None else _alpha(alpha, rank) / rank
    return KronPiece(offset, w1.contiguous(), w2, w2_a, w2_b, factor)
