"""bitsandbytes' 4-bit weights (NF4 and FP4, as in Forge's ``flux1-dev-bnb-nf4`` files and diffusers' models
saved with ``BitsAndBytesConfig(load_in_4bit=True)``), read and dequantized in plain torch, bit for bit.

bitsandbytes quantizes a weight flattened, in blocks of ``blocksize`` values (64 by default): each value is
the index of the nearest of 16 codes (NF4's normal quantiles or FP4's tiny floats, both in [-1, 1]) times
the block's absmax; two indices share a byte, the first in the high nibble. With ``compress_statistics``
("nested" or double quantization) the float32 absmaxes are themselves stored as uint8 indices into a
256-entry dynamic map, in blocks of 256, with a float32 absmax per block and an offset (their mean):
``absmax = nested_quant_map[q] * nested_absmax[i // 256] + offset``. A file holds, per weight ``W``: ``W``
(uint8 ``[n/2, 1]``, or the same bytes in another ``quant_storage`` dtype), ``W.absmax``, ``W.quant_map``,
optional ``W.nested_absmax`` / ``W.nested_quant_map``, and ``W.quant_state.bitsandbytes__nf4`` (or
``__fp4``): the UTF-8 bytes of a JSON object with the
``quant_type``, ``blocksize``, ``dtype``, ``shape`` and the nested ``nested_blocksize`` / ``nested_offset``.

pictor keeps such weights 4-bit in memory in its own row layout (formats ``NF4`` and ``FP4``): each row is
blocks of 64 values, each block a float32 absmax (4 bytes, the nested absmax already dequantized, exactly)
then 32 bytes of nibbles in bitsandbytes' order, 4.5 bits a weight. Rows are whole, so fused projections
are rows put together and a layer dequantizes alone, like GGML's formats (:mod:`pictor.models.ggml_quants`).
A bitsandbytes block of 64 * k values is k such blocks with one absmax, so any blocksize of 64 or more
converts exactly when a row is a whole number of 64-blocks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# bitsandbytes' `get_4bit_type` tables (float32; FP4 divided by its largest magnitude as bitsandbytes does).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
FP4_CODE = (
    torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32)
    / 12.0
)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STATE_PREFIX = "quant_state.bitsandbytes__"
# Tensors beside a quantized weight W, under "W.<suffix>".
SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

ROW_BLOCK = 64  # values per block of pictor's NF4 / FP4 rows
ROW_BLOCK_BYTES = 4 + ROW_BLOCK // 2  # float32 absmax + nibbles
FORMAT_OF = {"nf4": "NF4", "fp4": "FP4"}
CODE_OF_FORMAT = {"NF4": NF4_CODE, "FP4": FP4_CODE}


_BYTES = torch.arange(256)
# byte -> (code of its high nibble, code of its low nibble): bitsandbytes' order, first value high
BYTE_CODES = {fmt: torch.stack((c[_BYTES >> 4], c[_BYTES & 0xF]), dim=1) for fmt, c in CODE_OF_FORMAT.items()}


class BnbError(ValueError):
    """A bitsandbytes quant state that is missing, damaged or of a kind pictor does not read."""


@dataclass(frozen=True)
class QuantState4bit:
    """One weight's bitsandbytes 4-bit quant state, checked (what ``QuantState.from_dict`` reads)."""

    quant_type: str  # "nf4" or "fp4"
    blocksize: int
    dtype: torch.dtype  # the dtype the weight had, and dequantize_4bit's default output
    shape: tuple[int, ...]
    absmax: Tensor  # float32 per block, or uint8 indices when nested
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    nested_blocksize: int = 256
    nested_offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def state_key(keys: Mapping[str, object] | list[str], weight: str) -> str | None:
    """The ``W.quant_state.bitsandbytes__*`` key of weight ``W`` among ``keys``, or None."""
    prefix = f"{weight}.{STATE_PREFIX}"
    found = [k for k in keys if k.startswith(prefix)]
    if len(found) > 1:
        raise BnbError(f"{weight}: {len(found)} quant states ({', '.join(found)}); bitsandbytes reads one")
    return found[0] if found else None


def read_quant_state(tensors: Mapping[str, Tensor], weight: str) -> QuantState4bit:
    """Parse and check the quant state of weight ``weight`` from a file's tensors (its ``.absmax``, ...)."""
    key = state_key(list(tensors), weight)
    if key is None:
        raise BnbError(
            f"{weight}: no {weight}.{STATE_PREFIX}nf4 (or __fp4) key: not a bitsandbytes 4-bit weight"
        )
    kind = key[len(f"{weight}.{STATE_PREFIX}") :]
    try:
        info = json.loads(bytes(tensors[key].to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BnbError(
            f"{key}: not the JSON text of a bitsandbytes quant state; the file is damaged"
        ) from None
    if not isinstance(info, dict):
        raise BnbError(f"{key}: not the JSON object of a bitsandbytes quant state; the file is damaged")
    quant_type = info.get("quant_type", kind)
    if quant_type not in CODES or kind not in CODES:
        raise BnbError(
            f"{key}: quant_type {quant_type!r}: pictor reads bitsandbytes' 4-bit nf4 and fp4 weights only; "
            "dequantize this file to bf16 with bitsandbytes, or use an NF4, GGUF or FP8 file of the model"
        )
    blocksize, shape, dtype = info.get("blocksize"), info.get("shape"), DTYPES.get(str(info.get("dtype")))
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise BnbError(f"{key}: blocksize {blocksize!r}; bitsandbytes writes one of {BLOCKSIZES}")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise BnbError(f"{key}: shape {shape!r} is no list of positive sizes; the file is damaged")
    if dtype is None:
        raise BnbError(
            f"{key}: dtype {info.get('dtype')!r}; bitsandbytes 4-bit weights are float32/16 or bf16"
        )
    for suffix in ("absmax", "quant_map"):
        if f"{weight}.{suffix}" not in tensors:
            raise BnbError(
                f"{weight}.{suffix} is missing; the file is incomplete (re-save it with bitsandbytes)"
            )
    _check_quant_map(tensors[f"{weight}.quant_map"], quant_type, f"{weight}.quant_map")
    fields: dict[str, object] = {}
    if "nested_offset" in info or f"{weight}.nested_absmax" in tensors:
        for suffix in ("nested_absmax", "nested_quant_map"):
            if f"{weight}.{suffix}" not in tensors:
                raise BnbError(
                    f"{weight}.{suffix} is missing for a nested quant state; the file is incomplete"
                )
        nested_blocksize, offset = info.get("nested_blocksize"), info.get("nested_offset")
        if (
            not isinstance(nested_blocksize, int)
            or nested_blocksize <= 0
            or not isinstance(offset, (int, float))
        ):
            raise BnbError(f"{key}: nested_blocksize / nested_offset missing or wrong; the file is damaged")
        fields = {
            "nested_absmax": tensors[f"{weight}.nested_absmax"].float().reshape(-1),
            "nested_quant_map": tensors[f"{weight}.nested_quant_map"].float().reshape(-1),
            "nested_blocksize": nested_blocksize,
            # bitsandbytes stores the float32 offset as a JSON double and reads it back into float32
            "nested_offset": float(torch.tensor(float(offset), dtype=torch.float32)),
        }
    state = QuantState4bit(
        quant_type=quant_type,
        blocksize=blocksize,
        dtype=dtype,
        shape=tuple(shape),
        absmax=tensors[f"{weight}.absmax"].reshape(-1),
        **fields,  # type: ignore[arg-type]
    )
    _check_sizes(state, tensors[weight], weight)
    return state


def _check_quant_map(code: Tensor, quant_type: str, where: str) -> None:
    # bitsandbytes' kernels use their own tables, not the file's: a file whose map differs is not one
    # they would dequantize as it says, so it is refused rather than read either way.
    if code.numel() != 16 or not torch.equal(code.float().reshape(-1), CODES[quant_type]):
        raise BnbError(
            f"{where}: not bitsandbytes' {quant_type} table; the file is damaged or of another kind"
        )


def packed_bytes(packed: Tensor) -> Tensor:
    """A 4-bit weight's packed nibbles as flat uint8 bytes. bitsandbytes' ``quant_storage`` (uint8 unless
    chosen otherwise, e.g. bf16 for FSDP) is only the dtype the same bytes are stored in: it packs as uint8,
    then views them as that dtype."""
    if packed.dtype == torch.uint8:
        return packed.reshape(-1)
    return packed.contiguous().reshape(-1).view(torch.uint8)


def _check_sizes(state: QuantState4bit, packed: Tensor, weight: str) -> None:
    n, blocks = state.numel, -(-state.numel // state.blocksize)
    if packed.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise BnbError(
            f"{weight}: {packed.dtype} values cannot hold packed 4-bit weights; the file is damaged"
        )
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise BnbError(
            f"{weight}: {packed.numel()} {packed.dtype} values ({nbytes} bytes) for {n} 4-bit weights of "
            f"shape {state.shape}, which take {(n + 1) // 2} bytes; the file is damaged or truncated"
        )
    if state.absmax.numel() != blocks:
        raise BnbError(
            f"{weight}.absmax has {state.absmax.numel()} values for {blocks} blocks; the file is damaged"
        )
    if not state.nested and not state.absmax.is_floating_point():
        raise BnbError(
            f"{weight}.absmax is {state.absmax.dtype} (nested indices) but the quant state has no "
            "nested_absmax / nested_offset; the file is damaged"
        )
    if state.nested:
        assert state.nested_absmax is not None and state.nested_quant_map is not None
        if state.absmax.dtype != torch.uint8 or state.nested_quant_map.numel() != 256:
            raise BnbError(f"{weight}: a nested quant state needs uint8 absmax and 256 nested codes")
        if state.nested_absmax.numel() != -(-blocks // state.nested_blocksize):
            raise BnbError(f"{weight}.nested_absmax does not fit {blocks} blocks; the file is damaged")


def block_absmax(state: QuantState4bit) -> Tensor:
    """Each block's absmax as float32, the nested ones dequantized as bitsandbytes does (code times the
    nested block's absmax in float32, then plus the offset)."""
    if not state.nested:
        return state.absmax.float()
    assert state.nested_absmax is not None and state.nested_quant_map is not None
    q = state.nested_quant_map[state.absmax.long()]
    scale = state.nested_absmax.repeat_interleave(state.nested_blocksize)[: q.numel()]
    return q * scale + torch.tensor(state.nested_offset, dtype=torch.float32)


def dequantize_4bit(packed: Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """What ``bitsandbytes.functional.dequantize_4bit`` returns: ``code[index] * absmax`` in float32, cast to
    ``dtype`` (default: the quant state's)."""
    n = state.numel
    table = BYTE_CODES[FORMAT_OF[state.quant_type]].to(packed.device)  # high nibble first
    values = F.embedding(packed_bytes(packed).to(torch.int32), table).reshape(-1)[:n]
    scale = block_absmax(state).repeat_interleave(state.blocksize)[:n]
    return (values * scale).reshape(state.shape).to(dtype or state.dtype)


# ------------------------------------------------------------------------------------ pictor's rows


def row_bytes(cols: int) -> int:
    if cols % ROW_BLOCK:
        raise BnbError(f"a row of {cols} values is not a whole number of {ROW_BLOCK}-value blocks")
    return cols // ROW_BLOCK * ROW_BLOCK_BYTES


def fits_rows(state: QuantState4bit) -> bool:
    """Whether the weight converts exactly to pictor's rows: 2-D, rows of whole 64-blocks, and bitsandbytes
    blocks of a multiple of 64 (its blocks then never split one of pictor's)."""
    return len(state.shape) == 2 and state.shape[1] % ROW_BLOCK == 0 and state.blocksize % ROW_BLOCK == 0


def to_rows(packed: Tensor, state: QuantState4bit) -> Tensor:
    """A bitsandbytes 4-bit weight in pictor's row layout (uint8 ``[out, row_bytes(in)]``): the same
    nibbles, each 64-block preceded by the float32 absmax of the bitsandbytes block it lies in."""
    if not fits_rows(state):
        raise BnbError(
            f"a {state.shape} weight in blocks of {state.blocksize} does not fit pictor's 4-bit rows"
        )
    rows, cols = state.shape
    chunks = rows * cols // ROW_BLOCK
    absmax = block_absmax(state).repeat_interleave(state.blocksize // ROW_BLOCK)[:chunks].contiguous()
    nibbles = packed_bytes(packed).reshape(chunks, ROW_BLOCK // 2)
    return torch.cat((absmax.view(torch.uint8).reshape(chunks, 4), nibbles), dim=1).reshape(rows, -1)


def dequantize_rows(blocks: Tensor, fmt: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """pictor's NF4 / FP4 rows (uint8 ``[out, row_bytes(in)]``) as a ``dtype`` ``[out, in]`` matrix."""
    rows, cols = shape
    if blocks.shape != (rows, row_bytes(cols)):
        raise BnbError(f"{fmt} blocks of shape {tuple(blocks.shape)} do not hold a {shape} weight")
    b = blocks.reshape(rows, cols // ROW_BLOCK, ROW_BLOCK_BYTES)
    absmax = b[..., :4].contiguous().view(torch.float32)  # [out, blocks, 1]
    # One lookup per byte (both nibbles' codes at once) rather than per nibble: twice as fast on a CPU.
    pairs = F.embedding(b[..., 4:].to(torch.int32), BYTE_CODES[fmt].to(blocks.device))  # [out, blocks, 32, 2]
    return pairs.view(rows, cols // ROW_BLOCK, ROW_BLOCK).mul_(absmax).view(rows, cols).to(dtype)


# ------------------------------------------------------------------------------------ quantizing


def quantize_4bit(weight: Tensor, quant_type: str, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """bitsandbytes' ``quantize_4bit`` without nesting, byte for byte (its default kernel: the index of the
    nearest code by the midpoints between sorted codes): (packed uint8 ``[n/2, 1]``, float32 absmax)."""
    code = CODES[quant_type]
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    scaled = torch.clamp(
        flat[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1
    )
    scaled = scaled.reshape(-1)
    if n % blocksize:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    q = order[q].to(torch.uint8) if quant_type != "nf4" else q.to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def quantize_rows(weight: Tensor, fmt: str) -> Tensor:
    """A wide ``[out, in]`` weight in pictor's NF4 / FP4 rows, quantized as bitsandbytes does (64-blocks)."""
    rows, cols = weight.shape
    row_bytes(cols)
    packed, absmax = quantize_4bit(weight, fmt.lower(), ROW_BLOCK)
    state = QuantState4bit(fmt.lower(), ROW_BLOCK, torch.float32, (rows, cols), absmax)
    return to_rows(packed, state)
