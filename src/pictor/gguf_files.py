"""GGUF files: llama.cpp's container, in which ComfyUI-GGUF users share quantized FLUX.1 transformers
(city96's ``flux1-dev-Q4_K_S.gguf`` and the like), read without unpickling anything and without copying.

A GGUF file is a little-endian header (magic ``GGUF``, version, tensor and key-value counts), typed
key-value metadata, one record per tensor (name, dimensions innermost first, GGML type, offset), then the
tensors' bytes, each aligned (``general.alignment``, 32 by default). :func:`read_gguf` parses the header
with ``struct`` and maps the data with numpy's ``memmap``: each tensor is a uint8 view of its bytes, so a
7 GB file costs no memory until a layer is read. :func:`write_gguf` writes the same layout (version 3), so
pictor's models go to ComfyUI-GGUF and llama.cpp's tools as they come from them.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pictor.checkpoint import CheckpointError, sha256_file, staged_file
from pictor.models.ggml_quants import FORMATS, GGMLError, dequantize, format_by_id, row_bytes

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
GGML_MAX_NAME = 64  # llama.cpp's buffer for a tensor's name, its terminating zero included
# ComfyUI-GGUF's converter stores a tensor of more than GGUF's four dimensions flattened and records its
# shape under this key followed by the tensor's name.
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# Value types of the key-value section: struct codes of the fixed-size ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8  # GGML has four; a larger count means a damaged header, not a bigger tensor


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its GGML format, its torch-order shape (outermost first) and its bytes."""

    name: str
    format: str
    shape: tuple[int, ...]
    data: torch.Tensor  # uint8, a view into the memory-mapped file

    @property
    def is_dense(self) -> bool:
        return self.format in ("F32", "F16", "BF16")

    def to_tensor(self) -> torch.Tensor:
        """The values as a torch tensor: dense formats as stored (F32/F16/BF16), block formats dequantized
        to float32."""
        if self.is_dense:
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[self.format]
            data = self.data
            if data.storage_offset() % dtype.itemsize:  # a file with general.alignment 1 may misalign it
                data = data.clone()
            return data.view(dtype).reshape(self.shape)
        return dequantize(self.data, self.format, self.shape, torch.float32)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Reader:
    """Little-endian fields of the header, with errors that say where the file ends too soon."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where = f, where

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.where}: the header ends early (truncated or not a GGUF file)")
        return data

    def scalar(self, code: str) -> Any:
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        if n > 1 << 24:
            raise CheckpointError(f"{self.where}: a header string claims {n} bytes; the file is damaged")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.where}: a header string is not UTF-8; the file is damaged"
            ) from None

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, n = self.scalar("I"), self.scalar("Q")
            if n > 1 << 26:
                raise CheckpointError(f"{self.where}: a header array claims {n} items; the file is damaged")
            return [self.value(item) for _ in range(n)]
        raise CheckpointError(f"{self.where}: unknown metadata value type {vtype}; the file is damaged")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file (versions 2 and 3) and map its tensors; only the header is read into memory."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    with open(path, "rb") as f:
        r = _Reader(f, where)
        if f.read(4) != MAGIC:
            raise CheckpointError(f"{where}: not a GGUF file (it does not start with 'GGUF')")
        version = r.scalar("I")
        if version not in (2, 3):
            hint = " (a big-endian file)" if version > 0xFFFF else ""
            raise CheckpointError(f"{where}: GGUF version {version}{hint}; pictor reads versions 2 and 3")
        n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise CheckpointError(f"{where}: the header claims {n_tensors} tensors; the file is damaged")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(
                    f"{where}: tensor {name!r} has {n_dims} dimensions; the file is damaged"
                )
            dims = [r.scalar("Q") for _ in range(n_dims)]
            infos.append((name, dims, r.scalar("I"), r.scalar("Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{where}: general.alignment is {alignment}; it must be a power of two")
        start = -(-f.tell() // alignment) * alignment
    size = path.stat().st_size
    mapped = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
    # mode "c" (copy on write) gives torch a writable view without ever writing the file.
    data = torch.from_numpy(mapped)
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in infos:
        if name in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} appears twice; the file is damaged")
        try:
            fmt = format_by_id(type_id).name
            shape = tuple(int(d) for d in reversed(dims))  # GGML lists dimensions innermost first
            nbytes = math.prod(shape[:-1]) * row_bytes(fmt, shape[-1])
        except GGMLError as exc:
            raise CheckpointError(f"{where}: tensor {name!r}: {exc}") from None
        begin = start + offset
        if offset % alignment or begin + nbytes > size:
            raise CheckpointError(
                f"{where}: tensor {name!r} lies outside the file ({begin + nbytes} > {size} bytes); "
                "the file is truncated or damaged"
            )
        orig = metadata.get(ORIG_SHAPE_PREFIX + name)
        if orig is not None:
            if not (isinstance(orig, list) and orig and all(_is_int(d) and d >= 1 for d in orig)):
                raise CheckpointError(
                    f"{where}: {ORIG_SHAPE_PREFIX}{name} is {orig!r}, not a list of positive sizes; "
                    "the file is damaged"
                )
            orig = tuple(orig)
            if math.prod(orig) != math.prod(shape) or orig[-1] != shape[-1]:
                raise CheckpointError(f"{where}: {ORIG_SHAPE_PREFIX}{name} {orig} does not fit {shape}")
            shape = orig
        tensors[name] = GGUFTensor(name, fmt, shape, data[begin : begin + nbytes])
    return GGUFFile(path, version, metadata, tensors)


def _pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pack_value(value: Any) -> bytes:
    """A metadata value with its type: str, bool, int (uint32 when it fits, else int64), float (float32),
    or a list of one of those."""
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _pack_string(value)
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value) if 0 <= value < 1 << 32 else struct.pack("<Iq", 11, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, list) and value:
        items = [_pack_value(v) for v in value]
        kinds = {item[:4] for item in items}
        if len(kinds) != 1:
            raise CheckpointError(f"GGUF metadata array {value!r} mixes types")
        return struct.pack("<IIQ", _ARRAY, struct.unpack("<I", items[0][:4])[0], len(items)) + b"".join(
            item[4:] for item in items
        )
    raise CheckpointError(f"GGUF metadata value {value!r}: use a string, bool, int, float or a list of one")


def write_gguf(
    path: str | os.PathLike[str],
    tensors: dict[str, tuple[str, tuple[int, ...], torch.Tensor]],
    metadata: dict[str, Any],
) -> str:
    """Write a GGUF file (version 3, 32-byte alignment) atomically; returns its SHA-256.

    ``tensors``: name -> (GGML format, torch-order shape, the bytes as uint8 or the values as a tensor of the
    format's dtype). Metadata keys go first in the order given (put ``general.architecture`` first)."""
    path = Path(path)
    blobs: list[tuple[str, str, tuple[int, ...], torch.Tensor]] = []
    for name, (fmt, shape, data) in tensors.items():
        if not shape:
            raise CheckpointError(f"{name}: a 0-d tensor; GGUF tensors have 1 to 4 dimensions")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise CheckpointError(
                f"{name}: {len(name)} characters; llama.cpp reads tensor names of at most 63"
            )
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        expected = math.prod(shape[:-1]) * row_bytes(fmt, shape[-1])
        if raw.numel() != expected:
            raise CheckpointError(
                f"{name}: {raw.numel()} bytes for a {fmt} tensor of shape {shape} ({expected})"
            )
        blobs.append((name, fmt, shape, raw))
    header = bytearray(MAGIC + struct.pack("<IQQ", 3, len(blobs), len(metadata)))
    for key, value in metadata.items():
        header += _pack_string(key) + _pack_value(value)
    offset = 0
    for name, fmt, shape, raw in blobs:
        header += _pack_string(name) + struct.pack("<I", len(shape))
        header += struct.pack(f"<{len(shape)}Q", *reversed(shape))  # GGML lists dimensions innermost first
        header += struct.pack("<IQ", FORMATS[fmt].type_id, offset)
        offset += -(-raw.numel() // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % DEFAULT_ALIGNMENT))
        for _, _, _, raw in blobs:
            f.write(raw.numpy().data)  # a view, not a copy of a layer
            f.write(b"\0" * (-raw.numel() % DEFAULT_ALIGNMENT))
    return sha256_file(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with GGUF's magic (so a misnamed file is still recognized)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
