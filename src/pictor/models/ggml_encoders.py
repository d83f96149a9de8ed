"""llama.cpp's reference quantizers of GGML's simple block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the
BF16 encoding, in torch: `pictor.models.ggml_quants.quantize` writes through them (the K-quants through
`pictor.models.ggml_kquants`). Bit-exact with gguf-py's numpy reference (tests/models/test_ggml_quants.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ---------------------------------------------------------------------------------------------------------
# Encoders: (n_blocks, block_size) float32 -> (n_blocks, type_size) uint8, rounding exactly as gguf-py /
# llama.cpp's reference quantizers: the scale is computed in float32, its reciprocal (0 for an all-zero
# block) multiplies the values, and only the stored scale is rounded to float16.


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # a true float32 division, as numpy's 1 / d; d == 0 (an all-zero block, or for Q4_1 / Q5_1 any constant
    # one) takes reciprocal 0 as in the reference, so every value lands on the zero level
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf: halves away from zero. floor(|x| + 0.5) would misround 0.49999997 (the sum rounds up to 1)."""
    a = x.abs()
    whole = a.floor()
    return (whole + (2 * (a - whole)).floor()).copysign_(x)


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, sign kept (the first one on a tie, like argmax)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 values of 4+ bits -> 16 bytes: low nibble = value i, high nibble = low 4 bits of value 16 + i."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 values -> 4 bytes, value i at bit i of the little-endian u32."""
    bits = ((q >> 4) & 1).view(-1, 4, 8) << torch.arange(8, dtype=torch.uint8, device=q.device)
    return bits.sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is their bitwise or


def _q_signed(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = signed max / -levels, q = trunc(x / d + levels + 0.5) in [0, 2 * levels - 1]."""
    d = _signed_max(blocks) / -levels
    q = torch.trunc(blocks * _inverse(d) + (levels + 0.5)).clamp_(0, 2 * levels - 1).to(torch.uint8)
    return d, q


def _q_affine(blocks: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / top, q = trunc((x - min) / d + 0.5) in [0, top]."""
    lo = blocks.amin(dim=1, keepdim=True)
    d = (blocks.amax(dim=1, keepdim=True) - lo) / top
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp_(0, top).to(torch.uint8)
    return d, lo, q


def _qz_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _q_signed(blocks, 8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q)), dim=1)


def _qz_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, lo, q = _q_affine(blocks, 15)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)), dim=1)


def _qz_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _q_signed(blocks, 16)
    return torch.cat((_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)), dim=1)


def _qz_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, lo, q = _q_affine(blocks, 31)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)), dim=1)


def _qz_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
    return torch.cat((_f16_bytes(d), q.view(torch.uint8)), dim=1)


def bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bytes as ggml_compute_fp32_to_bf16: NaNs made quiet, then round to nearest even."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return torch.stack((n & 0xFF, n >> 8), dim=-1).to(torch.uint8).flatten(-2)


ENCODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _qz_q4_0,
    "Q4_1": _qz_q4_1,
    "Q5_0": _qz_q5_0,
    "Q5_1": _qz_q5_1,
    "Q8_0": _qz_q8_0,
}
