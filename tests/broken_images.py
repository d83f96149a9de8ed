"""Image files that defeat a fast scan: shared by the data and training tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def undecodable_png(path: Path, size: int = 32) -> None:
    """A PNG whose chunks are all intact (CRCs right, so a scan's verify() passes) but whose pixel data is
    noise that zlib cannot inflate: it fails only when decoded."""
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at : at + 4])
    body = bytes(rng.integers(0, 256, length, dtype=np.uint8))
    chunk = struct.pack(">I", length) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    path.write_bytes(data[:at] + chunk + data[at + 12 + length :])
