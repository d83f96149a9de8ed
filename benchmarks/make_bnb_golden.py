"""Make tests/bnb_golden.safetensors ONCE with real bitsandbytes (not run by the tests).

Run with a Python that has bitsandbytes (0.50.2 was used, CPU backend) and torch:

    /tmp/bnbv/bin/python benchmarks/make_bnb_golden.py tests/bnb_golden.safetensors

Each case is a ``bnb.nn.Linear4bit`` quantized on the CPU; its state dict (the keys Forge's and diffusers'
bnb files hold: ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) is saved under ``<case>.``, beside
bitsandbytes' own ``dequantize_4bit`` of it in the weight's dtype (``<case>.dq_bf16`` ...; float32 too for the
first two cases; for rows that are not a whole number of blocks ``<case>.dq_ref_*`` instead, the output of
bitsandbytes' reference kernel, see below; for the one big case only some rows, ``<case>.dq_rows``, and every
block's dequantized absmax, ``<case>.absmax_dq``) and, for the quantizer, the wide weight some were made from
(``<case>.source``). safetensors is written by hand (the format is an 8-byte header length, a JSON header
and the raw bytes) so that the venv needs nothing more.
"""

from __future__ import annotations

import json
import struct
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bf
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

# (name, out, in, quant_type, blocksize, nested, source dtype, quant_storage)
CASES = [
    ("nf4_b64", 4, 128, "nf4", 64, False, torch.bfloat16, torch.uint8),
    ("fp4_b64", 4, 128, "fp4", 64, False, torch.float16, torch.uint8),
    # 257 blocks of 64: the absmax of two nested blocks of 256 (the second holds one)
    ("nf4_b64_nested", 257, 64, "nf4", 64, True, torch.bfloat16, torch.uint8),
    ("fp4_b64_nested", 4, 256, "fp4", 64, True, torch.float16, torch.uint8),
    ("nf4_b128_nested", 4, 192, "nf4", 128, True, torch.float32, torch.uint8),
    ("nf4_b256", 2, 256, "nf4", 256, False, torch.bfloat16, torch.uint8),
    ("fp4_b4096_nested", 2, 1024, "fp4", 4096, True, torch.bfloat16, torch.uint8),  # one partial block
    ("nf4_b32", 4, 64, "nf4", 32, False, torch.bfloat16, torch.uint8),
    ("nf4_b64_straddle", 6, 96, "nf4", 64, True, torch.bfloat16, torch.uint8),  # blocks cross rows
    ("fp4_b64_partial", 3, 50, "fp4", 64, False, torch.float16, torch.uint8),  # 150 values: last block 22
    # quant_storage other than uint8 (bitsandbytes' option for FSDP): the same bytes in another dtype
    ("nf4_b64_bf16_storage", 2, 128, "nf4", 64, True, torch.bfloat16, torch.bfloat16),
    ("fp4_b64_f32_storage", 2, 128, "fp4", 64, False, torch.float16, torch.float32),
]
# big enough for two nested blocks, so only some rows' dequantized values are kept (beside every block's
# dequantized absmax, `<case>.absmax_dq`): rows either side of the nested blocks' boundary
ROWS_KEPT = {"nf4_b64_nested": [0, 1, 255, 256]}
KEEP_SOURCE = (
    "nf4_b64",
    "fp4_b64",
    "nf4_b256",
    "nf4_b32",
    "nf4_b64_straddle",
    "fp4_b64_partial",
)  # quantizer checks
_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int32: "I32",
}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    header: dict[str, object] = {"__metadata__": {"made_by": f"bitsandbytes {bnb.__version__}"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def reference_dequantize(packed: torch.Tensor, state: bf.QuantState) -> torch.Tensor:
    absmax = state.absmax
    if state.nested:
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(
        packed.reshape(-1).view(torch.uint8), absmax, code, state.blocksize, state.shape, state.dtype
    )


def main(path: str) -> None:
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, rows, cols, qt, bs, nested, dtype, storage in CASES:
        w = (torch.randn(rows, cols) * 0.05).to(dtype)
        w[0, :3] = torch.tensor([0.0, 0.3, -0.3])  # zeros and a row's extremes
        layer = bnb.nn.Linear4bit(
            cols,
            rows,
            bias=False,
            compress_statistics=nested,
            quant_type=qt,
            quant_storage=storage,
            compute_dtype=dtype,
        )
        layer.weight = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            blocksize=bs,
            compress_statistics=nested,
            quant_type=qt,
            quant_storage=storage,
        )
        layer = layer.to("cpu")
        layer.weight = layer.weight._quantize("cpu") if not layer.weight.bnb_quantized else layer.weight
        state = layer.weight.quant_state
        for key, value in layer.state_dict().items():
            out[f"{name}.{key}"] = value
        if name in KEEP_SOURCE:
            out[f"{name}.source"] = w
        # bitsandbytes' dequantization in the file's dtype, and in float32 for the first two cases
        wanted = {dtype, torch.float32} if name in ("nf4_b64", "fp4_b64") else {dtype}
        for tag, d in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if d not in wanted:
                continue
            state.dtype = d
            out[f"{name}.dq_{tag}"] = bf.dequantize_4bit(layer.weight.data, state)
            if name in ROWS_KEPT:
                out[f"{name}.dq_{tag}"] = out[f"{name}.dq_{tag}"][ROWS_KEPT[name]].clone()
            # bitsandbytes' reference (pure torch "default") kernel, which the CUDA kernel agrees with: it
            # reads blocks over the flattened weight. The CPU kernel of 0.50.2 reads them per row, which
            # differs (and is wrong) when a row is not a whole number of blocks: then only the reference's
            # values are kept.
            ref = reference_dequantize(layer.weight.data, state)
            if (cols % bs) == 0:
                assert torch.equal(ref[ROWS_KEPT.get(name, slice(None))], out[f"{name}.dq_{tag}"]), name
            else:  # only the reference kernel's values are kept
                del out[f"{name}.dq_{tag}"]
                out[f"{name}.dq_ref_{tag}"] = ref
        state.dtype = dtype
        if name in ROWS_KEPT:
            out[f"{name}.dq_rows"] = torch.tensor(ROWS_KEPT[name], dtype=torch.int32)
            out[f"{name}.absmax_dq"] = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    write_safetensors(path, out)
    print(path, len(out), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
