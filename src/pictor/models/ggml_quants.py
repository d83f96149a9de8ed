"""GGML block formats (the tensor encodings of GGUF files) in pure torch.

GGUF checkpoints of FLUX.1 (city96's, as loaded by ComfyUI-GGUF) keep each weight as raw bytes in one of a
handful of GGML block formats: a row of `cols` values is cut into blocks of 32 (or 256-value "super-blocks"
for the K-quants), and each block stores small integers plus one or two float16 scales. `dequantize` turns
such bytes back into a float tensor; `quantize` writes them all (the K-quants through `ggml_kquants`).

Everything here is bit-exact with gguf-py's numpy reference (`gguf.quants`), which in turn follows
llama.cpp's reference C code: quantizing gives identical bytes, dequantizing gives identical float32 values
(every product of a float16 scale and the small integers is exact in float32, so only the final add of a
block minimum rounds, in the same single place as the reference).

Conventions:
- `shape` is torch order: the last dim is the row that blocks run along (GGUF lists dims the other way
  round, fastest first; reversing them is the caller's business).
- Multi-byte fields are little-endian, as GGUF defines them; torch's dtype views read native order, so this
  assumes a little-endian host (every platform torch ships for).
- Dequantization is whole-tensor vectorized: it runs on every linear layer at every sampling step, so it
  is a handful of byte shifts and one or two float passes, and it works on whatever device the bytes are on.

This module is a leaf: it imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from pictor.models.ggml_encoders import ENCODERS, bf16_bytes
from pictor.models.ggml_kquants import KQUANT_ENCODERS, quantize_k

__all__ = [
    "FORMATS",
    "GGMLError",
    "GGMLFormat",
    "dequantize",
    "format_by_id",
    "quantize",
    "row_bytes",
]


class GGMLError(ValueError):
    """Bytes, shapes or types that do not fit a GGML format, or a format this module does not handle."""


class GGMLFormat(NamedTuple):
    """One GGML tensor type: its name and id in GGUF files, and how many values/bytes a block holds."""

    name: str
    type_id: int
    block_size: int  # values per block
    type_size: int  # bytes per block


_QK_K = 256  # values per K-quant super-block
_K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K

FORMATS: dict[str, GGMLFormat] = {
    f.name: f
    for f in (
        GGMLFormat("F32", 0, 1, 4),
        GGMLFormat("F16", 1, 1, 2),
        GGMLFormat("Q4_0", 2, 32, 2 + 16),
        GGMLFormat("Q4_1", 3, 32, 2 + 2 + 16),
        GGMLFormat("Q5_0", 6, 32, 2 + 4 + 16),
        GGMLFormat("Q5_1", 7, 32, 2 + 2 + 4 + 16),
        GGMLFormat("Q8_0", 8, 32, 2 + 32),
        GGMLFormat("Q2_K", 10, _QK_K, _QK_K // 16 + _QK_K // 4 + 2 + 2),
        GGMLFormat("Q3_K", 11, _QK_K, _QK_K // 8 + _QK_K // 4 + 12 + 2),
        GGMLFormat("Q4_K", 12, _QK_K, 2 + 2 + _K_SCALE_SIZE + _QK_K // 2),
        GGMLFormat("Q5_K", 13, _QK_K, 2 + 2 + _K_SCALE_SIZE + _QK_K // 8 + _QK_K // 2),
        GGMLFormat("Q6_K", 14, _QK_K, _QK_K // 2 + _QK_K // 4 + _QK_K // 16 + 2),
        GGMLFormat("BF16", 30, 1, 2),
    )
}
_BY_ID: dict[int, GGMLFormat] = {f.type_id: f for f in FORMATS.values()}

# Names of the GGML types this module does not handle, so that an error about a real GGUF file can say
# which type it met ("IQ4_XS") rather than only a number. Ids 4, 5, 31-33 and 36-38 were retired upstream.
_OTHER_TYPE_NAMES: dict[int, str] = {
    9: "Q8_1",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
}

_QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *KQUANT_ENCODERS)


def _supported() -> str:
    return ", ".join(FORMATS)


def format_by_id(type_id: int) -> GGMLFormat:
    """The format with GGML type id `type_id` (as stored in a GGUF tensor header)."""
    fmt = _BY_ID.get(type_id)
    if fmt is None:
        known = _OTHER_TYPE_NAMES.get(type_id)
        what = f"GGML type id {type_id}" + (f" ({known})" if known else "")
        raise GGMLError(f"{what} is not supported; supported types: {_supported()}")
    return fmt


def _format(fmt: str) -> GGMLFormat:
    found = FORMATS.get(fmt.upper()) if isinstance(fmt, str) else None
    if found is None:
        raise GGMLError(f"unknown GGML format {fmt!r}; supported types: {_supported()}")
    return found


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes that one row of `cols` values takes in format `fmt`."""
    f = _format(fmt)
    if cols < 0 or cols % f.block_size:
        raise GGMLError(f"{f.name} rows must hold a multiple of {f.block_size} values, got {cols}")
    return cols // f.block_size * f.type_size


# ---------------------------------------------------------------------------------------------------------
# Byte helpers. All work on `blocks`, a (n_blocks, type_size) uint8 tensor, and broadcast over blocks.


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 field at byte `start` of every block, as float32 of shape (n_blocks, 1)."""
    # Every type size and float16 offset is even, so the rows view as float16 (`dequantize` aligns the
    # bytes) and the field is one strided column: a plain gather, where copying out (n, 2) byte pairs
    # first was slow (torch loops over the 2-byte rows).
    return blocks.view(torch.float16)[:, start // 2 : start // 2 + 1].to(torch.float32)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of `packed` (..., k) into its 8 // bits fields, lowest bits first: (..., 8 // bits, k).

    This is the GGML layout throughout: field j of byte i belongs to value j * k + i of the group, so the
    fields of one shift form a contiguous run of k values.
    """
    # One op per field with a Python-int shift: torch vectorizes scalar shifts of uint8, while a broadcast
    # tensor of shift amounts takes a slow elementwise path (several times slower on FLUX-size weights).
    # The top field needs no mask and the bottom one no shift.
    mask = (1 << bits) - 1
    fields = [packed & mask]
    fields += [(packed >> shift) & mask for shift in range(bits, 8 - bits, bits)]
    fields.append(packed >> (8 - bits))
    return torch.stack(fields, dim=-2)


def _finish(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scale * q (+ offset): the one float32 allocation of a decode, then updated in place.

    q holds small integers, so any offset they carry (Q4_0's -8, ...) is applied before this, in 8 bits.
    """
    out = q.to(torch.float32).mul_(scale)
    return out if offset is None else out.add_(offset)


# ---------------------------------------------------------------------------------------------------------
# Decoders: (n_blocks, type_size) uint8 -> float32 with n_blocks * block_size values, block-major.
# The order of the float operations follows gguf-py (and llama.cpp): d * q exactly, then + m / - dmin * m.


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | 16 bytes: value i in the low nibble of byte i, value 16 + i in the high nibble
    q = _unpack(b[:, 2:], 4).view(-1, 32).view(torch.int8) - 8
    return _finish(q, _f16(b, 0))


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | m(f16) | 16 nibble bytes as in Q4_0, unsigned: x = d * q + m
    return _finish(_unpack(b[:, 4:], 4).view(-1, 32), _f16(b, 0), _f16(b, 2))


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values: low 4 bits as in Q4_0, bit 4 of value i is bit i of the little-endian u32 `qh`."""
    high = _unpack(qh, 1).transpose(-1, -2).reshape(-1, 32)  # byte i // 8, bit i % 8
    return _unpack(qs, 4).view(-1, 32) | high.mul_(16)


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | qh(4) | qs(16)
    q = _five_bit(b[:, 2:6], b[:, 6:]).view(torch.int8) - 16
    return _finish(q, _f16(b, 0))


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | m(f16) | qh(4) | qs(16)
    return _finish(_five_bit(b[:, 4:8], b[:, 8:]), _f16(b, 0), _f16(b, 2))


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | 32 int8; viewing as int8 (same element size) needs no copy even on the strided slice
    return _finish(b[:, 2:].view(torch.int8), _f16(b, 0))


def _dq_q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales(16: low nibble scale, high nibble min, one per 16 values) | qs(64) | d(f16) | dmin(f16).
    # qs: two 32-byte halves, each holding 4 x 32 values as 2-bit fields, lowest bits first.
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F).to(torch.float32)).unsqueeze(-1)
    ml = (_f16(b, 82) * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = _unpack(b[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    return _finish(q, dl, ml.neg_())


def _dq_q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask(32) | qs(64) | scales(12) | d(f16). Value = 2 low bits from qs (as Q2_K) minus 4 unless its
    # hmask bit is set; hmask bit j of byte i belongs to value 32 * j + i.
    n = b.shape[0]
    low = _unpack(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    high = _unpack(b[:, :32], 1).reshape(n, 16, 16)
    q = (low | high << 2).view(torch.int8) - 4  # low - 4 * (1 - high)
    # 16 six-bit scales, offset by 32: low 4 bits are nibbles of bytes 0-7 (low nibbles = scales 0-7, high
    # = 8-15), high 2 bits are 2-bit fields of bytes 8-11 (field j of byte i = scale 4 * j + i).
    s = b[:, 96:108]
    lo = _unpack(s[:, :8], 4).reshape(n, 16)
    hi = _unpack(s[:, 8:], 2).reshape(n, 16)
    scales = (lo | hi << 4).to(torch.float32).sub_(32)
    return _finish(q, (_f16(b, 108) * scales).unsqueeze(-1))


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-value multipliers d * scale and offsets -(dmin * min) of a Q4_K/Q5_K block: (n, 8, 1) each.

    The eight 6-bit scales and mins (llama.cpp's get_scale_min_k4) are packed in 12 bytes: bytes 0-3 hold
    scales 0-3 in their low 6 bits and bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from
    the low/high nibbles of bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-3 (scales)
    and 4-7 (mins).
    """
    # The same per-byte rule holds for all four bytes of each group, so it is applied to them at once as
    # one little-endian int32 word per group, with per-byte masks. Ops over (n, 4) byte slices instead
    # loop over 4-byte rows and cost more than unpacking all 256 values. Shifts of at most 4 never carry a
    # bit across a byte that the mask keeps, so the arithmetic shift of a negative word does no harm.
    words = b[:, 4 : 4 + _K_SCALE_SIZE].contiguous().view(torch.int32)  # (n, 3): bytes 0-3, 4-7, 8-11
    a, m, c = words[:, 0], words[:, 1], words[:, 2]
    scales = torch.stack((a & 0x3F3F3F3F, (c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030)), dim=1)
    mins = torch.stack((m & 0x3F3F3F3F, ((c >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)), dim=1)
    scale = _f16(b, 0) * scales.view(torch.uint8).to(torch.float32)  # (n, 8): scale j is byte j
    offset = _f16(b, 2) * mins.view(torch.uint8).to(torch.float32)
    return scale.unsqueeze(-1), offset.neg_().unsqueeze(-1)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | dmin(f16) | scales(12) | qs(128): four 32-byte chunks, low nibbles = 32 values, high = next 32
    scale, offset = _k4_scales(b)
    q = _unpack(b[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    return _finish(q, scale, offset)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    # d(f16) | dmin(f16) | scales(12) | qh(32) | qs(128): nibbles as Q4_K; bit j of qh byte i is the fifth
    # bit of value 32 * j + i.
    scale, offset = _k4_scales(b)
    n = b.shape[0]
    low = _unpack(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _unpack(b[:, 16:48], 1)
    return _finish(low | high.mul_(16), scale, offset)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql(128) | qh(64) | scales(16 x int8, one per 16 values) | d(f16), in two halves of 128 values. Per
    # half, ql is 64 bytes whose low nibbles give values 0-63 and high nibbles 64-127; qh is 32 bytes whose
    # 2-bit fields j give the top bits of values 32 * j + i.
    n = b.shape[0]
    low = _unpack(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 2, 4, 32)
    high = _unpack(b[:, 128:192].reshape(n, 2, 32), 2)
    q = (low | high << 4).view(n, 16, 16).view(torch.int8) - 32
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    return _finish(q, (_f16(b, 208) * scales).unsqueeze(-1))


_DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _dq_q4_0,
    "Q4_1": _dq_q4_1,
    "Q5_0": _dq_q5_0,
    "Q5_1": _dq_q5_1,
    "Q8_0": _dq_q8_0,
    "Q2_K": _dq_q2_k,
    "Q3_K": _dq_q3_k,
    "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k,
    "Q6_K": _dq_q6_k,
}


def _aligned(flat: torch.Tensor, size: int) -> torch.Tensor:
    """Contiguous bytes `flat` starting on a multiple of `size` (a fresh copy only if they do not already)."""
    if not flat.is_contiguous() or flat.data_ptr() % size:
        flat = flat.clone()  # new storage: contiguous and aligned for any dtype
    return flat


def _as_dtype(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret flat bytes as `dtype`, copying first when the view would be unaligned or strided."""
    return _aligned(flat, torch.empty((), dtype=dtype).element_size()).view(dtype)


def dequantize(
    data: torch.Tensor,
    fmt: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode the raw bytes `data` (uint8, any layout) of a `fmt` tensor of `shape` to `dtype`, on its device.

    Only the byte count of `data` matters: it must be prod(shape[:-1]) * row_bytes(fmt, shape[-1]).
    The result is always new memory, never a view of `data` (which may be a read-only file mapping).
    """
    f = _format(fmt)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise GGMLError("shape must have at least one dimension (the row)")
    if data.dtype != torch.uint8:
        raise GGMLError(f"data must be a uint8 tensor of raw bytes, got {data.dtype}")
    if not dtype.is_floating_point:
        raise GGMLError(f"dtype must be a floating-point type, got {dtype}")
    expected = math.prod(shape[:-1]) * row_bytes(f.name, shape[-1])
    if data.numel() != expected:
        raise GGMLError(
            f"{f.name} tensor of shape {list(shape)} takes {expected} bytes, but data holds {data.numel()}"
        )
    flat = data.reshape(-1).contiguous()
    if f.name == "F32":
        out = _as_dtype(flat, torch.float32)
    elif f.name == "F16":
        out = _as_dtype(flat, torch.float16).to(torch.float32)
    elif f.name == "BF16":
        # bf16 is the top half of a float32, so widening is exact (and keeps NaN payloads)
        out = _as_dtype(flat, torch.bfloat16).to(torch.float32)
    else:
        # the decoders read float16 fields through a float16 view of the rows (see _f16)
        out = _DECODERS[f.name](_aligned(flat, 2).view(-1, f.type_size))
    # F32 to float32 would otherwise come back as a view of the bytes
    return out.reshape(shape).to(dtype, copy=f.name == "F32")


def quantize(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """Encode a float tensor [..., cols] as `fmt` bytes: uint8 [..., row_bytes(fmt, cols)] on t's device.

    Values are taken as float32 first, as gguf-py does (for F16 it rounds float64 directly instead). The
    bytes equal gguf-py's, except that a NaN written as F16 is torch's canonical quiet NaN (still a NaN); the
    K-quants, which gguf-py does not write, equal llama.cpp's reference quantizers' (`ggml_kquants`).
    """
    f = _format(fmt)
    if f.name not in _QUANTIZABLE:
        raise GGMLError(
            f"quantizing to {f.name} is not supported; quantizable types: {', '.join(_QUANTIZABLE)}"
        )
    if t.dim() == 0 or not t.is_floating_point():
        raise GGMLError(
            f"quantize needs a floating-point tensor with a row dimension, got {t.dtype} {t.shape}"
        )
    lead, cols = tuple(t.shape[:-1]), t.shape[-1]
    out_shape = (*lead, row_bytes(f.name, cols))
    x = t.detach().to(torch.float32).contiguous()
    if f.name == "F32":
        out = x.view(torch.uint8).clone()  # x may be t itself: the bytes must not alias the input
    elif f.name == "F16":
        out = x.to(torch.float16).view(torch.uint8)
    elif f.name == "BF16":
        out = bf16_bytes(x)
    elif f.name in KQUANT_ENCODERS:  # llama.cpp's K-quant searches, byte-exact (see ggml_kquants)
        out = quantize_k(x.view(-1, f.block_size), f.name)
    else:
        out = ENCODERS[f.name](x.view(-1, f.block_size))
    return out.reshape(out_shape)
