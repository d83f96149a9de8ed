"""GGUF files for the tests, written with llama.cpp's own `gguf` package (the reference writer), holding
FLUX.1-layout transformers whose block linears are quantized in several GGML formats."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from pictor.models.flux import Flux, FluxParams

# Formats gguf's numpy code quantizes, and K-quants that it only dequantizes (their bytes are built here).
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q4_K", "Q6_K")


def k_quant_bytes(rows: int, cols: int, fmt: str, seed: int) -> np.ndarray:
    """Plausible K-quant blocks: random packed values and sub-block scales under small fp16 super-scales, so
    that the weights dequantize to about N(0, 0.05) magnitudes (random fp16 scales would give 1e4s)."""
    qtype = GGMLQuantizationType[fmt]
    block, size = 256, {"Q4_K": 144, "Q6_K": 210}[fmt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if fmt == "Q4_K":  # d, dmin (fp16) then 12 bytes of 6-bit scales and mins, then 128 bytes of nibbles
        raw[:, 0:2] = np.full((len(raw), 1), 0.0004, np.float16).view(np.uint8)
        raw[:, 2:4] = np.full((len(raw), 1), 0.0008, np.float16).view(np.uint8)
    else:  # Q6_K: 128 + 64 bytes of values, 16 int8 scales, then d (fp16) last
        raw[:, 192:208] = rng.integers(-20, 20, size=(len(raw), 16)).astype(np.int8).view(np.uint8)
        raw[:, 208:210] = np.full((len(raw), 1), 0.0002, np.float16).view(np.uint8)
    out = raw.reshape(rows, -1)
    assert dequantize(out, qtype).shape == (rows, cols)
    return out


def block_linear_keys(model: Flux) -> list[str]:
    return [
        f"{path}.weight"
        for path, module in model.named_modules()
        if path.startswith(("double_blocks.", "single_blocks.")) and isinstance(module, torch.nn.Linear)
    ]


def write_flux_gguf(
    model: Flux, path: Path, formats: Mapping[str, str], prefix: str = "", dense: str = "F32"
) -> dict[str, torch.Tensor]:
    """Write the model's weights as a GGUF file (``formats``: key -> GGML format for the quantized ones; the
    rest in ``dense``, F32 or F16). Returns the state dict the file means: every tensor as gguf's reference
    code dequantizes it, in float32."""
    writer = GGUFWriter(str(path), arch="flux")
    writer.add_string("general.name", "tiny flux")
    writer.add_uint32("test.count", 7)
    meant: dict[str, torch.Tensor] = {}
    for seed, (key, value) in enumerate(model.state_dict().items()):
        array = value.detach().float().numpy()
        fmt = formats.get(key)
        if fmt in QUANTIZABLE:
            qtype = GGMLQuantizationType[fmt]
            data = quantize(array, qtype)
        elif fmt in K_QUANTS:
            qtype = GGMLQuantizationType[fmt]
            data = k_quant_bytes(array.shape[0], array.shape[1], fmt, seed)
        elif dense == "F16" and array.ndim == 2:
            qtype, data = GGMLQuantizationType.F16, array.astype(np.float16)
        else:
            qtype, data = GGMLQuantizationType.F32, array
        writer.add_tensor(prefix + key, data, raw_dtype=qtype)
        values = dequantize(data, qtype) if fmt else data.astype(np.float32)
        meant[key] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meant


def gguf_params(**overrides: object) -> FluxParams:
    """A small FLUX.1 whose block linears all take 256-multiples of inputs (K-quants' super-block)."""
    base = {
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 24,
        "context_in_dim": 20,
        "hidden_size": 256,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [16, 56, 56],
        "qkv_bias": True,
        "guidance_embed": False,
    }
    return FluxParams.from_dict({**base, **overrides})
